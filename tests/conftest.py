import os

# Tests run on the CPU unless a GPU test asks otherwise; keep XLA from grabbing every core
# twice over when pytest and XLA both parallelize.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
