import os

import pytest

# Tests run on the CPU unless a GPU test asks otherwise; keep XLA from grabbing every core
# twice over when pytest and XLA both parallelize.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Four CPU devices, so sharded code runs on a real (if host-simulated) mesh.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=4").strip()
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



@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
    """Drop each module's compiled programs when it ends. XLA's CPU backend maps every
    compiled program's code into the process (several memory maps each); kept for the whole
    suite they passed the kernel's limit of 65,530 maps and compilation failed with "Cannot
    allocate memory" (or crashed) some 320 tests in."""
    yield
    import gc

    import jax
    gc.collect()
    jax.clear_caches()
    gc.collect()
    if os.environ.get("JLORA_TRACE_MAPS"):
        with open("/proc/self/maps") as f:
            print(f"\n[maps] {request.module.__name__}: {sum(1 for _ in f)}", flush=True)
