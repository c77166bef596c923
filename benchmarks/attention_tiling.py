"""bench_engine with the paged attention kernel's tiling set (the engine has no option for it).

    python -m benchmarks.attention_tiling BLOCK_S NUM_WARPS NUM_STAGES -- [bench_engine args]

Replaces `jlora.paged`'s attention call with one bound to `PagedAttentionBlocks(BLOCK_S,
NUM_WARPS, NUM_STAGES)`, then runs `benchmarks.bench_engine` with the arguments after `--`.
"""

import functools
import runpy
import sys

import jlora.paged
from pallas_kernels import paged_attention as pa


def main():
    if len(sys.argv) < 5 or sys.argv[4] != "--":
        sys.exit(__doc__)
    block_s, num_warps, num_stages = (int(x) for x in sys.argv[1:4])
    blocks = pa.PagedAttentionBlocks(block_s, num_warps, num_stages)
    jlora.paged.paged_attention = functools.partial(pa.paged_attention, blocks=blocks)
    print(f"attention tiling: {blocks}", flush=True)
    sys.argv = ["bench_engine"] + sys.argv[5:]
    runpy.run_module("benchmarks.bench_engine", run_name="__main__")


if __name__ == "__main__":
    main()
