"""jlora: multi-tenant LoRA serving and fine-tuning in JAX.

The core package: model configs and presets, the Llama-family forward pass as pure
functions, weight and tokenizer loading, sampling and batch generation.
"""

from jlora.config import PRESETS, ModelConfig, RopeScaling, preset
from jlora.generate import Completion, generate
from jlora.loader import Model, load_model
from jlora.sampling import SamplingParams

__all__ = ["PRESETS", "Completion", "Model", "ModelConfig", "RopeScaling", "SamplingParams",
           "generate", "load_model", "preset"]
