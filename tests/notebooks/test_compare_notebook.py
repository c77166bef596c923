"""notebooks/compare_lora_variants.ipynb: the committed notebook holds the outputs of its
full-size run, and the same code cells run at the tiny size (SmolLM2 cut to one layer, one
rank, 2 steps) in a child process, without a Jupyter kernel."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# in the test extra (CI has it); a machine with only the runtime dependencies skips this file
nbformat = pytest.importorskip("nbformat", reason="nbformat is in the test extra: "
                               "pip install -e '.[test]'")

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


# Run in a child process: the notebook loads SmolLM2 and compiles dozens of programs, and a
# test suite run in one process should not carry that memory to the tests after it.
RUN_CELLS = """
import json, sys, nbformat
ns = {}
cells = [c for c in nbformat.read(sys.argv[1], as_version=4).cells if c.cell_type == "code"]
for i, cell in enumerate(cells):
    exec(compile(cell.source, f"cell {i}", "exec"), ns)
print(json.dumps({
    "size": ns["SIZE"], "layers": ns["cfg"].n_layers,
    "runs": [[*k, len(r["result"].losses), r["result"].evals[-1]["exact_match"]]
             for k, r in ns["runs"].items()],
    "trainable": [[*k, m["trainable"]] for k, m in ns["memory"].items()],
    "throughput": ns["throughput"]}))
"""


def run_cells(size: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JLORA_NOTEBOOK_SIZE": size, "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(PATH.parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", RUN_CELLS, str(PATH)], env=env,
                          capture_output=True, text=True, cwd=PATH.parents[1], timeout=600)


@pytest.mark.slow
def test_the_notebook_runs_at_the_tiny_size():
    proc = run_cells("tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["size"] == "tiny" and out["layers"] == 1
    assert len(out["runs"]) == 2 * 4             # tasks x variants, one rank
    for task, variant, rank, n_losses, exact_match in out["runs"]:
        assert n_losses == 2 and 0 <= exact_match <= 1
    trainable = {(v, r): n for v, r, n in out["trainable"]}
    # one layer: tied A/B hold what one layer's LoRA A/B hold; u, v and DoRA's m add to them
    assert trainable["tied-ab", 4] == trainable["lora", 4] < trainable["dora", 4]
    assert trainable["tied-ab", 4] < trainable["tied-abuv", 4]
    mixed = out["throughput"]["8 adapters, all variants"]
    assert mixed["tokens"] == 8 * 4 and mixed["tokens_per_s"] > 0


def test_an_unknown_size_is_refused(monkeypatch):
    monkeypatch.setenv("JLORA_NOTEBOOK_SIZE", "huge")
    first = code_cells()[0].source.replace("import matplotlib.pyplot as plt\n", "")
    with pytest.raises(ValueError, match="JLORA_NOTEBOOK_SIZE='huge' must be one of"):
        exec(compile(first, "cell 0", "exec"), {})
