"""Pallas GPU kernels (Triton backend): one op family per file, each with its XLA reference.

Empty until the kernel issue lands its LoRA shrink/expand and paged attention kernels.
"""
