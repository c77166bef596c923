"""Python clients of the jlora gRPC server: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("127.0.0.1:50051", api_key=KEY) as c:
        for part in c.generate_stream("Sort ascending: 3 1 2", adapter="sort"):
            print(part.text, end="")
        print(c.generate("Hi", max_tokens=8).text)

Prompts are what `Engine.submit` takes: text (through the chat template unless raw=True),
a list of token ids, or chat messages ([{"role", "content"}, ...]). Sampling keywords are
those of `jlora.SamplingParams`. Failures raise `grpc.RpcError` as the server sent them
(`.code()`, `.details()`); nothing is retried. No engine or jax here.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.proto.jlora.v1 import jlora_pb2 as pb
from serving.proto.jlora.v1 import jlora_pb2_grpc as pb_grpc

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                 "stop_token_ids", "ignore_eos")


@dataclass
class GenerateResult:
    """A whole completion, gathered from the stream."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0

    def add(self, part: pb.GenerateResponse) -> None:
        self.request_id = part.request_id
        self.text += part.text
        self.token_ids += part.token_ids
        self.logprobs += part.logprobs
        if part.finish_reason:
            self.finish_reason, self.error = part.finish_reason, part.error
            self.prompt_tokens = part.usage.prompt_tokens
            self.completion_tokens = part.usage.completion_tokens
            self.time_to_first_token = part.timings.time_to_first_token
            self.total_seconds = part.timings.total_seconds


def make_request(prompt, *, adapter: str = "", tenant: str = "", request_id: str = "",
                 raw: bool = False, **sampling) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt (text, token ids or chat messages) and keywords."""
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(f"unknown sampling keywords {unknown}; allowed: {SAMPLING_KEYS}")
    sampling = {k: v for k, v in sampling.items() if v is not None}
    for key in ("stop", "stop_token_ids"):
        if isinstance(sampling.get(key), (str, int)):
            sampling[key] = [sampling[key]]
    params = pb.SamplingParams()
    for key, value in sampling.items():   # protobuf's own range errors name no field
        try:
            if key in ("stop", "stop_token_ids"):
                getattr(params, key).extend(value)
            else:
                setattr(params, key, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sampling parameter {key}={value!r} does not fit the request "
                             f"({e})") from None
    req = pb.GenerateRequest(adapter=adapter or "", tenant=tenant, request_id=request_id,
                             raw=raw, sampling=params)
    if isinstance(prompt, str):
        req.text = prompt
        return req
    prompt = list(prompt) if prompt is not None else []
    if prompt and all(isinstance(m, dict) for m in prompt):
        for i, m in enumerate(prompt):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {i} is {m!r}; each must have a string "
                                 "'role' and a string 'content'")
            req.chat.messages.add(role=m["role"], content=m["content"])
        return req
    try:   # empty: the server says so
        if any(isinstance(t, bool) for t in prompt):
            raise TypeError("true/false is not a token id")
        req.token_ids.ids.extend(operator.index(t) for t in prompt)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the prompt must be text, chat messages or token ids (integers in "
                         f"[0, 2**32)): {e}") from None
    req.token_ids.SetInParent()
    return req


def _channel_args(target: str, api_key: str | None, tls: bool, tls_ca):
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    creds = None
    if tls or tls_ca is not None:
        ca = Path(tls_ca).read_bytes() if isinstance(tls_ca, (str, Path)) else tls_ca
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    return target, creds, metadata


class Client:
    """Blocking client. `tls=True` uses the system's roots; `tls_ca` a PEM file or bytes."""

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool = False,
                 tls_ca: str | Path | bytes | None = None, options=()):
        target, creds, self.metadata = _channel_args(target, api_key, tls, tls_ca)
        self.channel = (grpc.secure_channel(target, creds, options) if creds else
                        grpc.insecure_channel(target, options))
        self.stub = pb_grpc.JloraStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate_stream(self, prompt, *, timeout: float | None = None, **kwargs):
        """The call: iterate it for GenerateResponses; `.cancel()` cancels the request."""
        return self.stub.Generate(make_request(prompt, **kwargs), timeout=timeout,
                                  metadata=self.metadata)

    def generate(self, prompt, *, timeout: float | None = None, **kwargs) -> GenerateResult:
        result = GenerateResult()
        for part in self.generate_stream(prompt, timeout=timeout, **kwargs):
            result.add(part)
        return result

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id),
                               metadata=self.metadata).aborted

    def load_adapter(self, name: str, path: str, *, pin: bool = False, replace: bool = False,
                     owner: str = "") -> pb.AdapterInfo:
        return self.stub.LoadAdapter(pb.LoadAdapterRequest(
            name=name, path=str(path), pin=pin, replace=replace, owner=owner),
            metadata=self.metadata)

    def unload_adapter(self, name: str) -> None:
        self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), metadata=self.metadata)

    def list_adapters(self) -> list[pb.AdapterInfo]:
        return list(self.stub.ListAdapters(pb.ListAdaptersRequest(),
                                           metadata=self.metadata).adapters)

    def get_adapter(self, name: str) -> pb.AdapterInfo:
        return self.stub.GetAdapter(pb.GetAdapterRequest(name=name), metadata=self.metadata)

    def server_info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... as grpc.health.v1 reports it."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until health is SERVING (the server may still be starting or compiling)."""
        import time
        end = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=max(0.1, min(5.0, end - time.monotonic()))) == "SERVING":
                    return
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.monotonic() >= end:
                raise TimeoutError(f"the server was not SERVING within {timeout} s")
            time.sleep(0.25)


class AsyncClient:
    """asyncio client; the same methods as `Client`, as coroutines (streams: `async for`)."""

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool = False,
                 tls_ca: str | Path | bytes | None = None, options=()):
        target, creds, self.metadata = _channel_args(target, api_key, tls, tls_ca)
        self.channel = (grpc.aio.secure_channel(target, creds, options) if creds else
                        grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.JloraStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def generate_stream(self, prompt, *, timeout: float | None = None, **kwargs):
        """The call: `async for` its GenerateResponses; `.cancel()` cancels the request."""
        return self.stub.Generate(make_request(prompt, **kwargs), timeout=timeout,
                                  metadata=self.metadata)

    async def generate(self, prompt, *, timeout: float | None = None,
                       **kwargs) -> GenerateResult:
        result = GenerateResult()
        async for part in self.generate_stream(prompt, timeout=timeout, **kwargs):
            result.add(part)
        return result

    async def abort(self, request_id: str) -> bool:
        r = await self.stub.Abort(pb.AbortRequest(request_id=request_id),
                                  metadata=self.metadata)
        return r.aborted

    async def load_adapter(self, name: str, path: str, *, pin: bool = False,
                           replace: bool = False, owner: str = "") -> pb.AdapterInfo:
        return await self.stub.LoadAdapter(pb.LoadAdapterRequest(
            name=name, path=str(path), pin=pin, replace=replace, owner=owner),
            metadata=self.metadata)

    async def unload_adapter(self, name: str) -> None:
        await self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name),
                                      metadata=self.metadata)

    async def list_adapters(self) -> list[pb.AdapterInfo]:
        r = await self.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=self.metadata)
        return list(r.adapters)

    async def get_adapter(self, name: str) -> pb.AdapterInfo:
        return await self.stub.GetAdapter(pb.GetAdapterRequest(name=name),
                                          metadata=self.metadata)

    async def server_info(self) -> pb.ServerInfo:
        return await self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.metadata)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        r = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
