"""List the GPU kernels a piece of work launches, with their times (CUPTI through torch).

A diagnostic for the benchmarks: it needs torch with CUDA, and prints nothing useful on a
CPU. Kernel names are XLA's fusion names or the Pallas kernel's function name.
"""

from __future__ import annotations


def print_kernels(work, steps: int, title: str, top: int = 20) -> None:
    """Run `work()` `steps` times under the profiler; print kernels by time per step."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                work()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
    except Exception as e:  # profiling is a diagnostic; never lose the timings to it
        print(f"-- {title}: profile failed: {type(e).__name__}: {e}")
        return
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / steps
    print(f"-- {title}: {total:.1f} us of kernel time per step, "
          f"{sum(e.count for e in events) / steps:.0f} launches")
    for e in events[:top]:
        print(f"{e.device_time_total / steps:9.2f} us {e.count / steps:6.1f}x  {e.key[:100]}")
