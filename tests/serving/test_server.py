"""The gRPC server over real gRPC on 127.0.0.1, around one tiny-model engine on the CPU.

Two servers share the module's engine: `open_server` (no API keys, metrics on an HTTP port,
a small message limit) and `keyed_server` (API keys, a per-tenant limit). The offline
generator, run one request at a time on a model with the same adapters, is the oracle for
every token streamed.
"""

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jlora.config import preset
from jlora.formats.gguf_file import read_gguf
from jlora.formats.native import write_native
from jlora.generate import generate
from jlora.loader import Model, embedded_model_path, load_adapter
from jlora.model import init_params
from jlora.sampling import SamplingParams
from jlora.tokenizer import Tokenizer
from serving.auth import Identity, KeyRing
from serving.client import AsyncClient, Client, make_request
from serving.engine import Engine, EngineConfig
from serving.server import JloraServer, ServerOptions, ServerThread
from tests.helpers import random_lora_adapter, random_tied_adapter

NAMES = ("lora8", "lora16", "dora", "tied")
CONFIG = EngineConfig(max_seqs=8, page_size=8, num_pages=48, prefill_budget=32, piece=8,
                      decode_buckets=(0, 8), prefill_buckets=(0, 32), impl="xla",
                      max_loras=4, max_lora_rank=16, max_queue=96)
KEYS = {"admin-key-0001": Identity("ops", "admin"), "acme-key-0001": Identity("acme", "user"),
        "globex-key-001": Identity("globex", "user")}
ADMIN, ACME, GLOBEX = KEYS


def make_adapters(cfg):
    return {"lora8": random_lora_adapter(cfg, "lora8", 8, seed=1),
            "lora16": random_lora_adapter(cfg, "lora16", 16, seed=2),
            "dora": random_lora_adapter(cfg, "dora", 8, seed=3, variant="dora"),
            "tied": random_tied_adapter(cfg, "tied", 8, seed=4),
            "extra": random_lora_adapter(cfg, "extra", 8, seed=5, targets=("q", "v"))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(reference model, engine, adapters, the extra adapter's directory)."""
    _, meta = read_gguf(embedded_model_path())
    cfg = preset("tiny").replace(vocab_size=49152, max_seq_len=64, eos_token_ids=(2,))
    params = init_params(cfg, jax.random.key(3), jnp.float32)
    params = jax.tree.map(lambda w: w * 4 if w.ndim == 2 else w, params)  # less uniform
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    adapters = make_adapters(cfg)
    ref = Model(cfg, params, tokenizer, "tiny-reference")
    for a in adapters.values():
        load_adapter(ref, a, max_loras=8, max_lora_rank=16)
    extra_dir = write_native(make_adapters(cfg)["extra"], tmp_path_factory.mktemp("extra"))
    engine = Engine(Model(cfg, params, tokenizer, "tiny"), CONFIG)
    for name in NAMES:
        engine.adapters.load(name, make_adapters(cfg)[name])
    engine.start()
    yield ref, engine, adapters, extra_dir
    engine.close()


@pytest.fixture(scope="module")
def open_server(setup):
    server = ServerThread(setup[1], ServerOptions(port=0, metrics_port=0,
                                                  max_message_bytes=64 << 10))
    port = server.start()
    yield server, f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def keyed_server(setup):
    server = ServerThread(setup[1], ServerOptions(port=0, max_requests_per_tenant=2),
                          KeyRing(KEYS))
    port = server.start()
    yield server, f"127.0.0.1:{port}"
    server.stop()


def alone(ref, prompt, params, adapter, chat=False):
    return generate(ref, [prompt], params, chat=chat, impl="xla", adapters=[adapter])[0]


def wait_idle(engine, timeout=30.0):
    """Until nothing runs or waits; then every KV page must be free."""
    end = time.monotonic() + timeout
    while True:
        m = engine.metrics.snapshot()
        if m["num_running"] == m["num_waiting"] == 0 and not engine.scheduler.running:
            break
        assert time.monotonic() < end, m
        time.sleep(0.02)
    assert engine.pages.num_free == engine.pages.capacity and not engine.pages.tables


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kwargs)
    return e.value


# ---------------------------------------------------------------------- streaming
def test_streamed_tokens_equal_offline_generation(setup, open_server):
    ref, engine, _, _ = setup
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=7, ignore_eos=True)
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    with Client(open_server[1]) as c:
        for adapter in (None, *NAMES):
            for p in (greedy, sampled):
                parts = list(c.generate_stream("Once upon a time", adapter=adapter or "",
                                               raw=True, max_tokens=p.max_tokens,
                                               temperature=p.temperature, top_k=p.top_k,
                                               seed=p.seed, ignore_eos=True))
                want = alone(ref, "Once upon a time", p, adapter)
                assert len(parts) > 2, "tokens should arrive in several messages"
                assert [t for x in parts for t in x.token_ids] == want.token_ids, adapter
                assert "".join(x.text for x in parts) == want.text
                assert np.allclose([lp for x in parts for lp in x.logprobs], want.logprobs,
                                   atol=1e-4)
                last = parts[-1]
                assert last.finish_reason == "length" and not any(
                    x.finish_reason for x in parts[:-1])
                assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
                    len(want.prompt_token_ids), 12)
                assert 0 < last.timings.time_to_first_token <= last.timings.total_seconds
        chat = [{"role": "user", "content": "Say hi"}]
        got = c.generate(chat, adapter="dora", max_tokens=6, ignore_eos=True)
        assert got.token_ids == alone(ref, chat, greedy.replace(max_tokens=6), "dora",
                                      chat=True).token_ids
    wait_idle(engine)


def run_async(coro):
    return asyncio.run(coro)


def test_64_clients_mixed_adapters_cancellations_and_adapter_changes(setup, open_server):
    """64 concurrent clients over the base model and four adapters, 12 cancelled at random
    points, while an admin loads an adapter, uses it, replaces it and unloads it."""
    ref, engine, _, extra_dir = setup
    rng = np.random.default_rng(0)
    n = 64
    prompts = [rng.integers(3, 49152, rng.integers(1, 30)).tolist() for _ in range(n)]
    adapters = [(None, *NAMES)[i] for i in rng.integers(1 + len(NAMES), size=n)]
    params = [SamplingParams(max_tokens=int(rng.integers(2, 20)), ignore_eos=True,
                             seed=int(rng.integers(2**32)),
                             temperature=float(rng.choice([0.0, 0.8])))
              for _ in range(n)]
    cancel_after = {int(i): int(rng.integers(0, 4)) for i in rng.choice(n, 12, replace=False)}
    extra_prompts = [[7, 8, 9 + i] for i in range(4)]
    extra_params = SamplingParams(max_tokens=8, ignore_eos=True)

    async def one(client, i):
        p = params[i]
        call = client.generate_stream(prompts[i], adapter=adapters[i] or "",
                                      max_tokens=p.max_tokens, temperature=p.temperature,
                                      seed=p.seed, ignore_eos=True)
        tokens, reason = [], None
        try:
            async for part in call:
                tokens += part.token_ids
                reason = part.finish_reason or reason
                if i in cancel_after and len(tokens) >= cancel_after[i]:
                    call.cancel()
        except asyncio.CancelledError:
            reason = "client-cancelled"
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.CANCELLED, (i, e)
            reason = "client-cancelled"
        if call.cancelled():
            reason = "client-cancelled"
        return tokens, reason

    async def admin(client):
        info = await client.load_adapter("extra", str(extra_dir))
        assert info.version == 1 and info.rank == 8 and info.variant == "lora"
        outs = await asyncio.gather(*(client.generate(p, adapter="extra", max_tokens=8,
                                                      ignore_eos=True)
                                      for p in extra_prompts))
        info = await client.load_adapter("extra", str(extra_dir), replace=True)
        assert info.version == 2
        await client.unload_adapter("extra")
        names = [a.name for a in await client.list_adapters()]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.generate([1, 2], adapter="extra", max_tokens=2)
        return outs, names, e.value

    async def main():
        async with AsyncClient(open_server[1]) as client:
            return await asyncio.gather(admin(client), *(one(client, i) for i in range(n)))

    (extra_outs, names, gone), *results = run_async(main())
    wait_idle(engine)
    for i, (tokens, reason) in enumerate(results):
        want = alone(ref, prompts[i], params[i], adapters[i]).token_ids
        if reason == "client-cancelled":
            assert i in cancel_after and tokens == want[:len(tokens)], i
        else:
            assert (tokens, reason) == (want, "length"), i
    done = sum(r == "length" for _, r in results)
    assert done >= n - len(cancel_after) and done + sum(
        r == "client-cancelled" for _, r in results) == n           # none lost
    for p, out in zip(extra_prompts, extra_outs):
        assert out.token_ids == alone(ref, p, extra_params, "extra").token_ids
    assert "extra" not in names and set(NAMES) <= set(names)
    assert gone.code() == grpc.StatusCode.NOT_FOUND and "'extra'" in gone.details()


@contextlib.contextmanager
def paused(engine):
    """The engine's loop stopped: requests are accepted and wait, nothing runs."""
    engine.stop()
    try:
        yield
    finally:
        engine.start()


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end
        time.sleep(0.01)


def test_client_cancel_and_abort_free_the_request(setup, open_server):
    _, engine, _, _ = setup
    server = open_server[0].server
    before = engine.metrics.snapshot()["finished"].get("cancelled", 0)
    with Client(open_server[1]) as c:
        call = c.generate_stream([4, 5, 6], max_tokens=50, ignore_eos=True)
        next(call)
        call.cancel()                              # the client goes away
        with paused(engine):                       # so that "abort-me" is surely running
            call = c.generate_stream([4, 5, 7], max_tokens=50, ignore_eos=True,
                                     request_id="abort-me")
            wait_for(lambda: "abort-me" in server._running)
            dup = rpc_error(c.generate, [1], request_id="abort-me", max_tokens=2)
            assert c.abort("abort-me") is True
        parts = list(call)
        missing = rpc_error(c.abort, "abort-me")
    wait_idle(engine)
    assert parts[-1].finish_reason == "cancelled" and parts[-1].request_id == "abort-me"
    assert engine.metrics.snapshot()["finished"]["cancelled"] >= before + 2
    assert dup.code() == grpc.StatusCode.ALREADY_EXISTS and "'abort-me'" in dup.details()
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "not running" in missing.details()


def test_deadline_and_full_queue(setup, open_server):
    """With the engine's loop stopped nothing runs: a call's deadline passes (the engine
    drops the request when it runs again), and then the queue fills up."""
    _, engine, _, _ = setup
    server = open_server[0].server
    engine.stop()
    try:
        with Client(open_server[1]) as c:
            late = rpc_error(c.generate, [4, 5, 6], max_tokens=4, timeout=0.3)
    finally:
        engine.start()
    wait_idle(engine)
    wait_for(lambda: not server._running)     # the handler's cancellation has run
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def fill():
        async with AsyncClient(open_server[1]) as ac:
            calls = [ac.generate_stream([4, 5, i], max_tokens=2)
                     for i in range(CONFIG.max_queue)]
            reads = [asyncio.ensure_future(call.read()) for call in calls]
            while len(server._running) < CONFIG.max_queue:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await ac.generate([1, 2], max_tokens=2)
            for call in calls:
                call.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
            return full.value
    engine.stop()
    try:
        full = run_async(fill())
    finally:
        engine.start()
    wait_idle(engine)
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{CONFIG.max_queue} requests are already waiting" in full.details()
    wait_for(lambda: not server._running)     # every cancelled call's handler has ended


# ---------------------------------------------------------------------- bad input
BAD_REQUESTS = [
    (dict(prompt=[1, 2], adapter="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty"),
    (dict(prompt=None), grpc.StatusCode.INVALID_ARGUMENT, "has no prompt"),
    (dict(prompt=[1, 2], temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature=-1.0 is invalid: must be a finite number >= 0"),
    (dict(prompt=[1, 2], top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p=2.0"),
    (dict(prompt=[1] * 7, max_tokens=60), grpc.StatusCode.INVALID_ARGUMENT,
     "prompt of 7 tokens + max_tokens=60 exceeds the context of 64 tokens"),
    (dict(prompt=[1, 2, 10**6]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    (dict(prompt=[1, 2], top_k=2**31), grpc.StatusCode.INVALID_ARGUMENT,
     "top_k=2147483648 is invalid: must be an integer in [0, 2**31)"),
    (dict(prompt=[40_000] * 40_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
]


def test_bad_requests_get_their_status_and_spare_the_others(setup, open_server):
    ref, engine, _, _ = setup
    p = SamplingParams(max_tokens=16, ignore_eos=True)
    with Client(open_server[1]) as c:
        good = c.generate_stream([4, 5, 6], adapter="lora8", max_tokens=16, ignore_eos=True)
        for kwargs, code, message in BAD_REQUESTS:
            kwargs = dict(max_tokens=4) | kwargs
            prompt = kwargs.pop("prompt")
            if prompt is None:
                from serving.proto.jlora.v1 import jlora_pb2 as pb
                e = rpc_error(lambda: next(c.stub.Generate(pb.GenerateRequest())))
            else:
                e = rpc_error(c.generate, prompt, **kwargs)
            assert e.code() == code and message in e.details(), (kwargs, e)
        tokens = [t for part in good for t in part.token_ids]
    assert tokens == alone(ref, [4, 5, 6], p, "lora8").token_ids
    wait_idle(engine)


def test_adapter_management_errors(setup, open_server, tmp_path):
    cfg = setup[0].config
    big = write_native(random_lora_adapter(cfg, "big", 32, seed=9), tmp_path / "big")
    corrupt = write_native(random_lora_adapter(cfg, "bad", 8, seed=9), tmp_path / "bad")
    (corrupt / "adapter.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    listed = write_native(random_lora_adapter(cfg, "l", 8, seed=9), tmp_path / "listed")
    (listed / "adapter.json").write_text(json.dumps([json.loads(
        (listed / "adapter.json").read_text())]))
    unscaled = write_native(random_lora_adapter(cfg, "u", 8, seed=9), tmp_path / "unscaled")
    meta = json.loads((unscaled / "adapter.json").read_text())
    del meta["modules"][1]["scale"]
    (unscaled / "adapter.json").write_text(json.dumps(meta))
    with Client(open_server[1]) as c:
        cases = [
            (lambda: c.load_adapter("big", str(big)), grpc.StatusCode.INVALID_ARGUMENT,
             "rank"),
            (lambda: c.load_adapter("bad", str(corrupt)), grpc.StatusCode.INVALID_ARGUMENT,
             "not a readable safetensors file"),
            (lambda: c.load_adapter("x", str(tmp_path / "missing")), grpc.StatusCode.NOT_FOUND,
             "does not exist"),
            (lambda: c.load_adapter("x", ""), grpc.StatusCode.INVALID_ARGUMENT, "path is empty"),
            (lambda: c.load_adapter("x", str(listed)), grpc.StatusCode.INVALID_ARGUMENT,
             "adapter.json must hold a JSON object, not a list"),
            (lambda: c.load_adapter("x", str(unscaled)), grpc.StatusCode.INVALID_ARGUMENT,
             "adapter.json: modules[1]: key 'scale' is missing (a number)"),
            (lambda: c.load_adapter("lora8", str(big)), grpc.StatusCode.ALREADY_EXISTS,
             "'lora8' is already loaded"),
            (lambda: c.unload_adapter("nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
            (lambda: c.get_adapter("nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
        ]
        for call, code, message in cases:
            e = rpc_error(call)
            assert e.code() == code and message in e.details(), (message, e.details())
        info = c.get_adapter("tied")
        names = [a.name for a in c.list_adapters()]
    assert (info.variant, info.rank, tuple(info.targets)) == ("tied", 8, ("q", "v", "down"))
    assert info.residency in ("gpu", "loading", "host", "disk") and not info.owner
    assert "big" not in names and "bad" not in names


# ---------------------------------------------------------------------- access
def test_keys_roles_tenants_and_private_adapters(setup, keyed_server):
    ref, engine, _, extra_dir = setup
    address = keyed_server[1]
    with Client(address) as anon, Client(address, api_key="wrong-key-123") as wrong, \
            Client(address, api_key=ADMIN) as admin, Client(address, api_key=ACME) as acme, \
            Client(address, api_key=GLOBEX) as globex:
        for e in (rpc_error(anon.generate, [1, 2], max_tokens=2),
                  rpc_error(wrong.generate, [1, 2], max_tokens=2),
                  rpc_error(wrong.list_adapters)):
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        assert "no API key" in rpc_error(anon.list_adapters).details()
        assert anon.health() == "SERVING"                 # probes need no key
        for e in (rpc_error(acme.load_adapter, "mine", str(extra_dir)),
                  rpc_error(acme.unload_adapter, "lora8")):
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "needs the admin role; tenant 'acme' has role 'user'" in e.details()
        assert admin.load_adapter("mine", str(extra_dir), owner="acme").owner == "acme"
        try:
            got = acme.generate([7, 8, 9], adapter="mine", max_tokens=6, ignore_eos=True)
            assert got.token_ids == alone(ref, [7, 8, 9], SamplingParams(
                max_tokens=6, ignore_eos=True), "extra").token_ids
            denied = [rpc_error(globex.generate, [7, 8], adapter="mine", max_tokens=2),
                      rpc_error(globex.get_adapter, "mine")]
            # an unknown name's refusal lists the adapters the caller may use, no others
            for call in (lambda c: c.generate([7, 8], adapter="typo", max_tokens=2),
                         lambda c: c.get_adapter("typo")):
                theirs, mine = rpc_error(call, globex), rpc_error(call, acme)
                assert theirs.code() == mine.code() == grpc.StatusCode.NOT_FOUND
                assert "'lora8'" in theirs.details() and "'mine'" not in theirs.details()
                assert "'mine'" in mine.details()
            assert [a.name for a in acme.list_adapters()].count("mine") == 1
            assert "mine" not in [a.name for a in globex.list_adapters()]
        finally:
            admin.unload_adapter("mine")
        for e in denied:
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "'mine' is private to another tenant" in e.details()
        e = rpc_error(acme.generate, [1, 2], tenant="globex", max_tokens=2)
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "'globex'" in e.details()
        assert admin.generate([1, 2], tenant="globex", max_tokens=2).finish_reason

        # the per-tenant limit (2), and aborting: only one's own requests
        running = keyed_server[0].server._running
        with paused(engine):
            calls = [acme.generate_stream([4, 5, i], max_tokens=40, ignore_eos=True,
                                          request_id=f"acme-{i}") for i in range(2)]
            wait_for(lambda: {"acme-0", "acme-1"} <= set(running))
            over = rpc_error(acme.generate, [1, 2], max_tokens=2)
            not_yours = rpc_error(globex.abort, "acme-0")
            assert acme.abort("acme-0") and admin.abort("acme-1")
        assert [list(call)[-1].finish_reason for call in calls] == ["cancelled"] * 2
        assert globex.generate([1, 2], max_tokens=2).finish_reason == "length"
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'acme' has 2 requests running or waiting" in over.details()
    assert not_yours.code() == grpc.StatusCode.NOT_FOUND
    wait_idle(engine)


def test_without_keys_only_loopback_and_tls_pairs():
    with pytest.raises(ValueError, match="listens on loopback addresses only"):
        JloraServer(ServerOptions(host="0.0.0.0"))
    with pytest.raises(ValueError, match="both a certificate and its key"):
        JloraServer(ServerOptions(tls_cert="cert.pem"))
    JloraServer(ServerOptions(host="0.0.0.0"), KeyRing(KEYS))     # with keys: any address


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_tls(setup, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = ServerThread(setup[1], ServerOptions(host="localhost", port=0, tls_cert=str(cert),
                                                  tls_key=str(key)))
    port = server.start()
    try:
        with Client(f"localhost:{port}", tls_ca=str(cert)) as c:
            assert c.generate([4, 5], max_tokens=3, ignore_eos=True).completion_tokens == 3
        with Client(f"localhost:{port}") as plain:
            assert rpc_error(plain.generate, [4, 5], max_tokens=3,
                             timeout=5).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


# ---------------------------------------------------------------------- info, metrics
def test_server_info_health_and_reflection(setup, open_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase
    with Client(open_server[1]) as c:
        info = c.server_info()
        assert (info.model, info.vocab_size, info.max_seq_len, info.max_seqs) == (
            "test", 49152, 64, 8)
        assert (info.max_loras, info.max_lora_rank, info.max_queue) == (4, 16, 96)
        assert info.max_message_bytes == 64 << 10 and not info.draining
        assert c.health() == c.health("jlora.v1.Jlora") == "SERVING"
        services = ProtoReflectionDescriptorDatabase(c.channel).get_services()
    assert {"jlora.v1.Jlora", "grpc.health.v1.Health"} <= set(services)


def test_metrics_parse_and_carry_the_vllm_names(setup, open_server):
    server = open_server[0].server
    with Client(open_server[1]) as c:
        c.generate([4, 5, 6], adapter="dora", tenant="t1", max_tokens=5, ignore_eos=True)
    port = server._metrics_http.server_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "prompt_tokens", "generation_tokens",
                 "lora_requests_info", "request_success", "num_preemptions"):
        assert f"vllm:{name}" in families, name
    for name in ("adapter_residency", "adapter_loads", "adapter_hits", "adapter_misses",
                 "adapter_load_seconds", "adapter_evictions", "tenant_requests",
                 "tenant_prompt_tokens", "tenant_generation_tokens"):
        assert f"jlora:{name}" in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("vllm:generation_tokens_total", (("model_name", "test"),))] > 0
    assert samples[("vllm:time_to_first_token_seconds_count", (("model_name", "test"),))] > 0
    info = families["vllm:lora_requests_info"].samples[0].labels
    assert set(info) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert info["max_lora"] == "4"
    assert samples[("jlora:adapter_residency", (("adapter", "dora"), ("residency", "gpu")))] \
        + samples[("jlora:adapter_residency", (("adapter", "dora"), ("residency", "host")))] == 1
    assert samples[("jlora:tenant_generation_tokens_total", (("tenant", "t1"),))] >= 5


# ---------------------------------------------------------------------- jlora train --serve
def test_train_serve_loads_the_trained_adapter_into_the_server(setup, open_server, tmp_path,
                                                               monkeypatch, capsys):
    """`jlora train --serve`: the command's own path (data, files written, the load into
    the running server); the training itself is replaced by the extra adapter, so the test
    takes seconds (training is tested in tests/training)."""
    import jlora.loader
    import training.loop
    from jlora.cli import main
    ref, engine, adapters, _ = setup
    monkeypatch.setattr(jlora.loader, "load_model", lambda spec, dtype=None: ref)
    monkeypatch.setattr(training.loop, "finetune", lambda model, train, held_out, config,
                        name: training.loop.Result(adapters["extra"], None, [0.5], []))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join('{"prompt": "p%d", "completion": "c%d"}' % (i, i)
                              for i in range(4)))
    out = tmp_path / "trained"
    assert main(["train", "--data", str(data), "--out", str(out), "--name", "trained",
                 "--steps", "1", "--serve", open_server[1]]) == 0
    assert "loaded adapter 'trained' (version 1)" in capsys.readouterr().err
    with Client(open_server[1]) as c:
        info = c.get_adapter("trained")
        got = c.generate([7, 8, 9], adapter="trained", max_tokens=6, ignore_eos=True)
        c.unload_adapter("trained")
    assert info.source == str(out) and info.rank == 8
    assert got.token_ids == alone(ref, [7, 8, 9], SamplingParams(max_tokens=6,
                                                                 ignore_eos=True),
                                  "extra").token_ids


def test_cli_streams_a_prompt_and_manages_adapters(setup, open_server, capsys):
    from jlora.cli import main
    ref, _, _, extra_dir = setup
    address = open_server[1]
    assert main(["generate", "--server", address, "--no-chat", "--max-tokens", "10",
                 "--ignore-eos", "--adapter", "tied", "Once upon a time"]) == 0
    want = alone(ref, "Once upon a time", SamplingParams(max_tokens=10, ignore_eos=True),
                 "tied")
    assert capsys.readouterr().out == want.text + "\n"
    assert main(["adapters", "load", "cli-extra", str(extra_dir), "--server", address]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert main(["adapters", "info", "cli-extra", "--server", address]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["adapters", "unload", "cli-extra", "--server", address]) == 0
    assert json.loads(capsys.readouterr().out) == {"unloaded": "cli-extra"}
    assert main(["adapters", "list", "--server", address]) == 0
    listed = [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()]
    assert loaded["name"] == info["name"] == "cli-extra" and info["rank"] == 8
    assert info["variant"] == "lora" and info["targets"] == ["q", "v"]
    assert "cli-extra" not in listed and set(NAMES) <= set(listed)
    assert main(["adapters", "unload", "cli-extra", "--server", address]) == 2
    assert capsys.readouterr().err.startswith("jlora: error: NOT_FOUND: ")


def test_concurrent_loads_of_one_name_one_wins_whole(setup, open_server, tmp_path):
    """Two LoadAdapter calls for one name at once, with different owners: one loads, the
    other gets ALREADY_EXISTS, and the adapter keeps the winner's owner and weights."""
    cfg = setup[0].config
    paths = [write_native(random_lora_adapter(cfg, f"r{r}", r, seed=r), tmp_path / f"r{r}")
             for r in (8, 16)]

    async def race(name):
        async with AsyncClient(open_server[1]) as c:
            results = await asyncio.gather(
                *(c.load_adapter(name, str(p), owner=o) for p, o in zip(paths, ("a", "b"))),
                return_exceptions=True)
            return results, await c.get_adapter(name)
    for i in range(3):
        results, info = asyncio.run(race(f"race{i}"))
        won = [r for r in results if not isinstance(r, Exception)]
        lost = [r for r in results if isinstance(r, Exception)]
        assert len(won) == len(lost) == 1, results
        assert lost[0].code() == grpc.StatusCode.ALREADY_EXISTS
        assert (info.owner, info.rank) == (won[0].owner, won[0].rank)
        assert (info.owner, info.rank) in (("a", 8), ("b", 16))
        with Client(open_server[1]) as c:
            c.unload_adapter(f"race{i}")


def test_an_id_reused_before_its_cancel_lands_is_already_exists(setup, open_server):
    engine = setup[1]
    with Client(open_server[1]) as c:
        with paused(engine):
            call = c.generate_stream([4, 5, 6], max_tokens=20, ignore_eos=True,
                                     request_id="again")
            wait_for(lambda: "again" in open_server[0].server._running)
            call.cancel()
            wait_for(lambda: "again" not in open_server[0].server._running)
            e = rpc_error(c.generate, [4, 5, 6], max_tokens=2, request_id="again")
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "'again'" in e.details()
        wait_for(lambda: "again" not in engine._requests)
        assert c.generate([4, 5, 6], max_tokens=2, request_id="again").finish_reason
    wait_idle(engine)


def test_a_port_in_use_is_refused_before_anything_is_built(open_server):
    port = int(open_server[1].rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
        asyncio.run(JloraServer(ServerOptions(port=port)).start())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{busy} \\(the "
                                          "metrics port\\)"):
            asyncio.run(JloraServer(ServerOptions(port=0, metrics_port=busy)).start())


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_loopback(setup, host):
    server = ServerThread(setup[1], ServerOptions(host=host, port=0, metrics_port=0))
    port = server.start()
    try:
        with Client(f"[::1]:{port}") as c:
            assert c.health() == "SERVING"
            assert c.generate([4, 5], max_tokens=2, ignore_eos=True).completion_tokens == 2
        metrics_port = server.server._metrics_http.server_address[1]
        with urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics", timeout=10) as r:
            assert b"vllm:num_requests_running" in r.read()
    finally:
        server.stop()


@pytest.mark.parametrize("prompt,kwargs,message", [
    ([1, 2], dict(max_tokens=-1), "sampling parameter max_tokens=-1 does not fit"),
    ([1, 2], dict(seed=-1), "sampling parameter seed=-1 does not fit"),
    ([1.5, 2], {}, "the prompt must be text, chat messages or token ids"),
    ([True], {}, "the prompt must be text, chat messages or token ids"),
    ([{"role": "user"}], {}, "chat message 0 is {'role': 'user'}; each must have"),
])
def test_the_client_names_what_it_cannot_send(prompt, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_request(prompt, **kwargs)
    assert list(make_request(np.array([3, 4])).token_ids.ids) == [3, 4]
