"""Fine-tuning LoRA, DoRA and Tied-LoRA adapters with Flax NNX and optax.

`modules` holds the trainable adapter module (math shared with serving's formula),
`forward` the training forward and loss.
"""
