"""Readers of the file formats models and adapters arrive in (HF directories, GGUF)."""
