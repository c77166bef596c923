"""Fine-tuning LoRA, DoRA and Tied-LoRA adapters with Flax NNX and optax.

Empty until the fine-tuning issue lands.
"""
