"""notebooks/compare_lora_variants.ipynb: the committed notebook holds the outputs of its
full-size run, and the same code cells run at the tiny size (SmolLM2 cut to one layer, one
rank, 2 steps) without a Jupyter kernel."""

from pathlib import Path

import matplotlib
import nbformat
import pytest

PATH = Path(__file__).parents[2] / "notebooks" / "compare_lora_variants.ipynb"


def code_cells():
    return [c for c in nbformat.read(PATH, as_version=4).cells if c.cell_type == "code"]


def test_the_committed_notebook_was_run_at_the_full_size():
    cells = code_cells()
    assert all(c.execution_count is not None and c.outputs for c in cells)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    first = "".join(o.get("text", "") for o in cells[0].outputs)
    assert first.startswith("size full:")
    images = [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2                       # the loss curves and the summary plots


@pytest.mark.slow
def test_the_notebook_runs_at_the_tiny_size(monkeypatch):
    matplotlib.use("Agg")                         # no display: figures are drawn and dropped
    monkeypatch.setenv("JLORA_NOTEBOOK_SIZE", "tiny")
    ns: dict = {}
    for i, cell in enumerate(code_cells()):
        exec(compile(cell.source, f"{PATH.name}, cell {i}", "exec"), ns)
    assert ns["SIZE"] == "tiny" and ns["cfg"].n_layers == 1
    assert len(ns["runs"]) == 2 * 4              # tasks x variants, one rank
    for run in ns["runs"].values():
        assert len(run["result"].losses) == 2 and 0 <= run["result"].evals[-1]["exact_match"] <= 1
    trainable = {k: m["trainable"] for k, m in ns["memory"].items()}
    # one layer: tied A/B hold what one layer's LoRA A/B hold; u, v and DoRA's m add to them
    assert trainable["tied-ab", 4] == trainable["lora", 4] < trainable["dora", 4]
    assert trainable["tied-ab", 4] < trainable["tied-abuv", 4]
    mixed = ns["throughput"]["8 adapters, all variants"]
    assert mixed["tokens"] == 8 * 4 and mixed["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="JLORA_NOTEBOOK_SIZE='huge' must be one of"):
        monkeypatch.setenv("JLORA_NOTEBOOK_SIZE", "huge")
        exec(compile(code_cells()[0].source, "cell 0", "exec"), {})
