"""`jlora serve` as a real process on 127.0.0.1 (the tiny preset): the CLI's client commands
against it, and SIGTERM while requests run: they finish, new ones get UNAVAILABLE, health
turns NOT_SERVING, the process exits 0."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from jlora.cli import main
from jlora.generate import generate
from jlora.loader import load_model
from jlora.sampling import SamplingParams
from serving.client import Client

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jlora.cli", "serve", "--model", "tiny", "--port", "0",
         "--max-seqs", "4", "--prefill-budget", "16", "--max-seq-len", "256",
         "--drain-seconds", "120"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []

    def read():
        for line in proc.stderr:
            lines.append(line)
    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + 60
    while not any("listening on" in l for l in lines):
        assert proc.poll() is None and time.monotonic() < end, "".join(lines)
        time.sleep(0.05)
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
    yield proc, f"127.0.0.1:{port}", lines
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_not_serving_while_warming_up(server):
    """The fixture returns as soon as the port is open; the engine then compiles for
    seconds, during which health says NOT_SERVING and requests get UNAVAILABLE."""
    _, address, _ = server
    with Client(address) as c:
        assert c.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as e:
            c.generate([1, 2, 3], max_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "warming up" in e.value.details()
        c.wait_ready(240)
        assert c.health() == c.health("jlora.v1.Jlora") == "SERVING"


def test_cli_generate_and_adapters_commands(server, tmp_path, capsys):
    _, address, _ = server
    reqs = tmp_path / "reqs.jsonl"
    prompts = [[5, 6, 7], [9] * 12, [3]]
    reqs.write_text("\n".join(json.dumps({"prompt_token_ids": p, "max_tokens": 6,
                                          "ignore_eos": True}) for p in prompts))
    assert main(["generate", "--server", address, "--wait", "240", "--json",
                 "--requests", str(reqs)]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    model = load_model("tiny")      # the server's weights: the same preset and seed
    ref = generate(model, prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [l["token_ids"] for l in lines] == [r.token_ids for r in ref]
    assert [l["prompt_tokens"] for l in lines] == [3, 12, 1]
    assert main(["adapters", "list", "--server", address]) == 0
    assert capsys.readouterr().out == ""
    assert main(["adapters", "info", "nope", "--server", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jlora: error: NOT_FOUND:") and "'nope'" in err
    assert main(["generate", "--server", address, "--adapter", "x=/tmp/x", "hi"]) == 2
    assert "with --server, give the NAME" in capsys.readouterr().err


def test_sigterm_drains_then_exits_0(server):
    proc, address, lines = server
    n, max_tokens = 12, 200          # 3 rounds of 4 rows: seconds of work on the CPU
    results, errors = [None] * n, []
    with Client(address) as c:
        c.wait_ready(240)
        calls = [c.generate_stream([4 + i, 5, 6], max_tokens=max_tokens, ignore_eos=True)
                 for i in range(n)]
        first = [next(calls[0])]     # the first request is running

        def drain(i):
            try:
                parts = first + list(calls[0]) if i == 0 else list(calls[i])
                results[i] = (sum(len(p.token_ids) for p in parts), parts[-1].finish_reason)
            except grpc.RpcError as e:
                errors.append((i, e.code(), e.details()))
        readers = [threading.Thread(target=drain, args=(i,)) for i in range(n)]
        for t in readers:
            t.start()
        end = time.monotonic() + 30   # every request has reached the server: all in flight
        while (lambda i: i.num_running + i.num_waiting)(c.server_info()) < n:
            assert time.monotonic() < end and all(r is None for r in results)
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        while c.health() != "NOT_SERVING":
            assert time.monotonic() < end
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as refused:
            c.generate([1, 2, 3], max_tokens=2)
        still_running = sum(r is None for r in results)
        for t in readers:
            t.join(timeout=120)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.value.details()
    assert still_running > 0, "every request had finished before the refusal was checked"
    assert proc.wait(timeout=60) == 0, "".join(lines)
    assert not errors, errors
    assert results == [(max_tokens, "length")] * n
    assert any("draining" in l for l in lines) and "jlora: stopped" in lines[-1]


def test_sigint_during_warm_up_exits_at_once():
    """Ctrl-C while the engine still compiles stops the process then (exit 0), rather than
    after the warm-up it would not use."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jlora.cli", "serve", "--model", "tiny", "--port", "0",
         "--max-seqs", "4", "--prefill-budget", "16", "--max-seq-len", "256"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:   # whatever comes before the server's first line
            if "listening on" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "jlora: stopped during warm-up" in rest and "serving tiny" not in rest, rest
