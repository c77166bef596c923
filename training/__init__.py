"""Fine-tuning LoRA, DoRA and Tied-LoRA adapters with Flax NNX and optax.

`modules` holds the trainable adapter module (the serving formula, differentiable),
`forward` the training forward and loss, `data` JSONL examples and batches, `loop` the
optimizer loop (`finetune`), `checkpoint` orbax save/resume, `cli` the `jlora train` command.
"""

from training.loop import Result, TrainConfig, finetune
from training.modules import AdapterSpec, Adapters, to_adapter

__all__ = ["AdapterSpec", "Adapters", "Result", "TrainConfig", "finetune", "to_adapter"]
