"""Pallas GPU kernels (Triton backend): one op family per file, each with its XLA reference.

Every public op takes `impl="pallas"|"xla"`; "xla" is the reference and the CPU path.
"""

import jax


def default_impl() -> str:
    """"pallas" on a GPU, "xla" elsewhere (interpret-mode Pallas is for tests only: slow)."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"
