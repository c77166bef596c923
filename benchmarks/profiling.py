"""List the GPU kernels a piece of work launches, with their times (CUPTI through torch).

A diagnostic for the benchmarks: it needs torch with CUDA, and prints nothing useful on a
CPU. Kernel names are XLA's fusion names or the Pallas kernel's function name.
"""

from __future__ import annotations

import json


def print_kernels(work, steps: int, title: str, top: int = 20) -> None:
    """Run `work()` `steps` times under the profiler; print kernels by time per step."""
    try:
        events = kernel_trace(work, steps)
    except Exception as e:  # profiling is a diagnostic; never lose the timings to it
        print(f"-- {title}: profile failed: {type(e).__name__}: {e}")
        return
    by_name: dict[str, list] = {}
    for e in events:
        k = by_name.setdefault(e["name"], [0.0, 0])
        k[0] += e["dur"]
        k[1] += 1
    print(f"-- {title}: {sum(e['dur'] for e in events) / steps:.1f} us of kernel time per "
          f"step, {len(events) / steps:.0f} launches")
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{t / steps:9.2f} us {n / steps:6.1f}x  {name[:100]}")


def kernel_trace(work, steps: int) -> list[dict]:
    """The GPU kernels (and copies) of running `work()` `steps` times, in start order: dicts
    of name, cat, ts and dur (microseconds), from torch's profiler (CUPTI)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            work()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    kept = [dict(name=e["name"], cat=e["cat"], ts=float(e["ts"]), dur=float(e["dur"]))
            for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
            and "dur" in e]
    return sorted(kept, key=lambda e: e["ts"])


CATEGORIES = (("lora", ("shrink", "expand", "fused_tokens")),
              ("attention", ("paged_attention", "attention")),
              ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "dot")),
              ("copy", ("memcpy", "memset", "copy")))


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def summarize_trace(events: list[dict], steps: int, title: str, layer_of: str = "attention"
                    ) -> dict:
    """Print where a step's device time goes: per category, kernel time and launches; the gaps
    (device idle between kernels); and the kernels of one layer in order, each with the gap
    before it (a layer: from one `layer_of` kernel to the next, in the middle step)."""
    if not events:
        print(f"-- {title}: no kernel events")
        return {}
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    busy, end = 0.0, events[0]["ts"]
    for e in events:   # union of the kernels' intervals
        start, stop = max(e["ts"], end), e["ts"] + e["dur"]
        busy += max(0.0, stop - start)
        end = max(end, stop)
    per = {}
    for e in events:
        c = per.setdefault(category(e["name"]), [0.0, 0])
        c[0] += e["dur"]
        c[1] += 1
    print(f"-- {title}: {span / steps:.1f} us per step, kernels busy {busy / steps:.1f} us "
          f"({100 * busy / span:.1f}%), {len(events) / steps:.0f} launches per step")
    for c, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        print(f"   {c:9s} {t / steps:9.1f} us  {n / steps:6.0f} launches  "
              f"{t / n:7.2f} us each")
    marks = [i for i, e in enumerate(events) if category(e["name"]) == layer_of]
    layer = []
    if len(marks) > 2:
        mid = len(marks) // 2
        for i in range(marks[mid], marks[mid + 1]):
            gap = events[i]["ts"] - (events[i - 1]["ts"] + events[i - 1]["dur"])
            layer.append(dict(name=events[i]["name"], dur=events[i]["dur"], gap=gap))
        print(f"   one layer ({len(layer)} kernels, {sum(k['dur'] for k in layer):.1f} us "
              f"busy, {sum(k['gap'] for k in layer):.1f} us of gaps):")
        for k in layer:
            print(f"     gap {k['gap']:6.2f}  {k['dur']:7.2f} us  {k['name'][:110]}")
    return dict(span_us=span / steps, busy_us=busy / steps, launches=len(events) / steps,
                categories={c: dict(us=t / steps, launches=n / steps)
                            for c, (t, n) in per.items()}, layer=layer)
