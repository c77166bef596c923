import os

# Tests run on the CPU unless a GPU test asks otherwise; keep XLA from grabbing every core
# twice over when pytest and XLA both parallelize.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (with the reason shown) elsewhere."""
    import jax
    import pytest
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run with JAX_PLATFORMS=cuda on the "
                                   "GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
