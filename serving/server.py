"""The gRPC server: a shell that translates, checks and streams; the engine does the work.

`JloraServer` implements `jlora.v1.Jlora` (serving/proto/jlora/v1/jlora.proto) on a
`grpc.aio` server beside the standard health service and server reflection. Per call it
identifies the caller (serving/auth.py), checks the tenant, the adapter's owner and the
per-tenant limit, turns the protobuf into `Engine.submit` arguments and streams the engine's
outputs back; engine errors become status codes (`_STATUS`). A cancelled or disconnected call
cancels its request, which frees its pages. Adapters live in `engine.adapters`; the server
only remembers which tenant owns a private one.

Lifecycle: `start()` listens with health NOT_SERVING, `attach(engine)` (after the engine has
compiled) turns it SERVING, `drain()` turns it NOT_SERVING, refuses new requests with
UNAVAILABLE, lets running ones finish within a bound, then stops. No model logic here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jlora.sampling import SamplingParams
from serving import auth
from serving.adapter_store import AdapterInfo, UnknownAdapter
from serving.auth import KeyRing, Refused
from serving.engine import DuplicateRequest, Engine, QueueFull
from serving.prometheus import ServingMetrics
from serving.proto.jlora.v1 import jlora_pb2 as pb
from serving.proto.jlora.v1 import jlora_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Jlora"].full_name
_STATUS = ((Refused, None), (UnknownAdapter, grpc.StatusCode.NOT_FOUND),
           (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
           (DuplicateRequest, grpc.StatusCode.ALREADY_EXISTS),
           (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
           (ValueError, grpc.StatusCode.INVALID_ARGUMENT))
_REFUSALS = tuple(cls for cls, _ in _STATUS)


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051                   # 0: any free port
    metrics_port: int | None = None     # Prometheus /metrics over HTTP on host:metrics_port
    max_message_bytes: int = 4 << 20    # larger requests get RESOURCE_EXHAUSTED
    max_requests_per_tenant: int = 0    # running + waiting per tenant; 0: no limit
    drain_seconds: float = 30.0         # how long running requests may take after SIGTERM
    tls_cert: str | None = None         # PEM files; both or neither
    tls_key: str | None = None


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets ([::1]:50051)."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_free(host: str, port: int, what: str) -> None:
    """Raise OSError, naming the address, when host:port cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as http.server does
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host_port(host, port)} ({what}): "
                          f"{e.strerror}") from None


def status_of(e: Exception) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(e, cls):
            return e.code if code is None else code
    raise TypeError(f"no status for {type(e).__name__}")


class JloraServer(pb_grpc.JloraServicer):
    def __init__(self, options: ServerOptions = ServerOptions(), keys: KeyRing = KeyRing()):
        if not keys.enabled and not auth.is_loopback(options.host):
            raise ValueError(f"host {options.host!r}: without API keys (--api-keys) the server "
                             "listens on loopback addresses only (127.0.0.1, ::1, localhost)")
        if (options.tls_cert is None) != (options.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        self.options, self.keys = options, keys
        self.engine: Engine | None = None
        self.model_name = ""
        self.metrics: ServingMetrics | None = None
        self.draining = False
        self.owners: dict[str, str] = {}         # private adapter -> its tenant
        self._running: dict[str, str] = {}       # request id -> tenant
        self._per_tenant: Counter = Counter()
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._metrics_http = None
        self._adapter_changes = asyncio.Lock()   # one LoadAdapter/UnloadAdapter at a time
        self.port = 0

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> int:
        """Listen (health NOT_SERVING until `attach`); returns the port."""
        n, host = self.options.max_message_bytes, self.options.host.strip("[]")
        if self.options.metrics_port is not None:   # refuse a busy port now, not after warm-up
            _check_free(host, self.options.metrics_port, "the metrics port")
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", n),
                                                ("grpc.max_send_message_length", n),
                                                ("grpc.so_reuseport", 0)])
        pb_grpc.add_JloraServicer_to_server(self, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self._server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = host_port(host, self.options.port)
        try:
            if self.options.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(self.options.tls_key).read_bytes(),
                                                      Path(self.options.tls_cert).read_bytes())])
                self.port = self._server.add_secure_port(address, creds)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as e:   # grpc's "Failed to bind to address"
            raise OSError(f"cannot listen on {address}: the port is in use, or the address "
                          "is not one of this machine's") from e
        await self._server.start()
        return self.port

    async def attach(self, engine: Engine, model_name: str) -> None:
        """Serve with a ready (compiled, started) engine: health turns SERVING."""
        self.engine, self.model_name = engine, model_name
        self.metrics = ServingMetrics(model_name, engine.metrics.snapshot)
        if self.options.metrics_port is not None:
            self._metrics_http = self.metrics.serve_http(self.options.host.strip("[]"),
                                                         self.options.metrics_port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, bound: float | None = None) -> None:
        """Refuse new requests, let running ones finish within `bound` seconds (then cancel
        them), stop listening. The engine is left to the caller."""
        self.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        bound = self.options.drain_seconds if bound is None else bound
        end = time.monotonic() + bound
        while self._running and time.monotonic() < end:
            await asyncio.sleep(0.02)
        for request_id in list(self._running):
            self.engine.cancel(request_id)
        end = time.monotonic() + 5.0
        while self._running and time.monotonic() < end:
            await asyncio.sleep(0.02)
        await self._server.stop(grace=1.0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE):
            await self._health.set(service, status)

    # ---------------------------------------------------------------- checks
    def _caller(self, context, *, generating: bool = False) -> auth.Identity:
        identity = self.keys.identify(context.invocation_metadata())
        if self.engine is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is warming up")
        if self.draining and generating:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          "the server is shutting down and takes no new requests")
        return identity

    def _reserve(self, request_id: str, tenant: str) -> None:
        if request_id in self._running:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                          f"request id {request_id!r} is already running")
        limit = self.options.max_requests_per_tenant
        if limit and self._per_tenant[tenant] >= limit:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"tenant {tenant!r} has {limit} requests running or waiting, its "
                          f"limit (max_requests_per_tenant={limit})")
        self._running[request_id] = tenant
        self._per_tenant[tenant] += 1

    def _release(self, request_id: str) -> None:
        tenant = self._running.pop(request_id)
        self._per_tenant[tenant] -= 1
        if not self._per_tenant[tenant]:
            del self._per_tenant[tenant]

    def _visible(self, identity: auth.Identity, name: str) -> None:
        """Refuse another tenant's private adapter (PERMISSION_DENIED)."""
        auth.check_adapter(identity, identity.tenant, name, self.owners.get(name, ""))

    def _not_loaded(self, identity: auth.Identity, name: str) -> UnknownAdapter:
        """The refusal for an unknown adapter, listing only those this caller may use."""
        names = sorted(a.name for a in self.engine.adapters.list()
                       if auth.may_use(identity, identity.tenant, self.owners.get(a.name, "")))
        shown = names[:10] + (["..."] if len(names) > 10 else [])
        return UnknownAdapter(f"adapter {name!r} is not loaded; loaded: {shown or 'none'}")

    def _adapters(self):
        """The engine's adapter store; FAILED_PRECONDITION when it has no adapter slots."""
        if self.engine.adapters is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "this server serves the base model only: start it with "
                          "--max-loras N (N > 0) to load adapters")
        return self.engine.adapters

    # ---------------------------------------------------------------- Generate, Abort
    async def Generate(self, request: pb.GenerateRequest, context):
        try:
            identity = self._caller(context, generating=True)
            adapter = request.adapter or None
            # the engine's default too: without a tenant, requests count for their adapter
            tenant = auth.tenant_for(identity, request.tenant) or (adapter or "")
            if adapter:
                auth.check_adapter(identity, tenant, adapter, self.owners.get(adapter, ""))
            prompt, chat = prompt_of(request)
            params = sampling_of(request.sampling)
            timeout = context.time_remaining()
            if timeout is not None and timeout <= 0:
                raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline has passed")
            request_id = request.request_id or uuid.uuid4().hex
            self._reserve(request_id, tenant)
            try:
                stream = self.engine.submit(prompt, params, adapter=adapter, tenant=tenant,
                                            request_id=request_id, timeout=timeout, chat=chat)
            except UnknownAdapter as e:
                self._release(request_id)
                raise self._not_loaded(identity, adapter) if self.engine.adapters else e
            except BaseException:
                self._release(request_id)
                raise
        except _REFUSALS as e:
            await context.abort(status_of(e), str(e))
        try:
            async for response in self._responses(stream):
                yield response
        finally:   # a cancelled call (client gone, deadline) lands here too
            if not stream.finished:
                self.engine.cancel(request_id)
            self._release(request_id)

    async def _responses(self, stream):
        last = None
        async for out in stream:
            now = time.monotonic()
            if out.token_ids and last is not None:
                self.metrics.observe_tokens(now - last, len(out.token_ids))
            last = now if out.token_ids else last
            response = pb.GenerateResponse(request_id=stream.request_id, text=out.text,
                                           token_ids=out.token_ids, logprobs=out.logprobs)
            if out.finished:
                self.metrics.observe_finish(out.timings)
                response.finish_reason = out.finish_reason
                response.error = out.error or ""
                fill_final(response, out.timings)
            yield response

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        try:
            identity = self._caller(context)
            owner = self._running.get(request.request_id)
            if owner is None or not (identity.admin or owner == identity.tenant):
                raise Refused(grpc.StatusCode.NOT_FOUND,
                              f"request {request.request_id!r} is not running")
        except _REFUSALS as e:
            await context.abort(status_of(e), str(e))
        return pb.AbortResponse(aborted=self.engine.cancel(request.request_id))

    # ---------------------------------------------------------------- adapters, info
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.AdapterInfo:
        try:
            auth.require_admin(self._caller(context), "LoadAdapter")
            if not request.path:
                raise ValueError("path is empty: give the adapter's directory on the server")
            store = self._adapters()
            async with self._adapter_changes:   # the check, the load and the owner together
                if request.name in store and not request.replace:
                    raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                                  f"adapter {request.name!r} is already loaded; set replace "
                                  "to load the new version")
                # private before it is registered, so no other tenant can catch it between
                before = self.owners.get(request.name)
                if request.owner:
                    self.owners[request.name] = request.owner
                try:
                    info = await asyncio.to_thread(store.load, request.name, request.path,
                                                   pin=request.pin, replace=request.replace)
                except BaseException:
                    self.owners.pop(request.name, None)
                    if before is not None:
                        self.owners[request.name] = before
                    raise
                if not request.owner:
                    self.owners.pop(info.name, None)
                reply = self._adapter_pb(info)
        except _REFUSALS as e:
            await context.abort(status_of(e), str(e))
        return reply

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context):
        try:
            auth.require_admin(self._caller(context), "UnloadAdapter")
            async with self._adapter_changes:
                self._adapters().unload(request.name)
                self.owners.pop(request.name, None)
        except _REFUSALS as e:
            await context.abort(status_of(e), str(e))
        return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context) -> pb.ListAdaptersResponse:
        try:
            identity = self._caller(context)
        except _REFUSALS as e:
            await context.abort(status_of(e), str(e))
        store = self.engine.adapters
        infos = [a for a in (store.list() if store is not None else ())
                 if auth.may_use(identity, identity.tenant, self.owners.get(a.name, ""))]
        return pb.ListAdaptersResponse(adapters=[self._adapter_pb(a) for a in infos])

    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.AdapterInfo:
        try:
            identity = self._caller(context)
            if self.engine.adapters is None:
                raise UnknownAdapter(f"adapter {request.name!r} is not loaded: this server "
                                     "serves the base model only")
            try:
                info = self.engine.adapters.info(request.name)
            except UnknownAdapter:
                raise self._not_loaded(identity, request.name) from None
            self._visible(identity, request.name)
        except _REFUSALS as e:
            await context.abort(status_of(e), str(e))
        return self._adapter_pb(info)

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        try:
            self._caller(context)
        except _REFUSALS as e:
            await context.abort(status_of(e), str(e))
        engine, snap = self.engine, self.engine.metrics.snapshot()
        return pb.ServerInfo(
            model=self.model_name, vocab_size=engine.model.config.vocab_size,
            max_seq_len=engine.sched_config.max_seq_len, max_seqs=engine.config.max_seqs,
            max_loras=snap.get("max_loras", 0), max_lora_rank=engine.config.max_lora_rank,
            max_queue=engine.config.max_queue,
            max_requests_per_tenant=self.options.max_requests_per_tenant,
            max_message_bytes=self.options.max_message_bytes, num_running=snap["num_running"],
            num_waiting=snap["num_waiting"], kv_cache_usage=snap["kv_usage"],
            draining=self.draining, version=_version())

    def _adapter_pb(self, info: AdapterInfo) -> pb.AdapterInfo:
        return pb.AdapterInfo(
            name=info.name, variant=info.variant, rank=info.rank, targets=info.targets,
            source=str(info.source), nbytes=info.nbytes, residency=info.residency,
            pinned=info.pinned, version=info.version, owner=self.owners.get(info.name, ""),
            loads=info.loads, hits=info.hits, misses=info.misses,
            last_load_seconds=info.last_load_seconds or 0.0)


# -------------------------------------------------------------------- protobuf -> engine
def prompt_of(request: pb.GenerateRequest):
    """(prompt, chat) for Engine.submit; ValueError when there is none."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("the request has no prompt: set one of text, token_ids, chat")
    if kind == "text":
        return request.text, not request.raw
    if kind == "token_ids":
        return list(request.token_ids.ids), False
    messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
    return messages, True


def sampling_of(s: pb.SamplingParams) -> SamplingParams:
    """Unset fields take SamplingParams' defaults; bad values raise ValueError naming them."""
    values = {name: getattr(s, name) for name in ("max_tokens", "temperature", "top_p",
                                                   "top_k", "seed") if s.HasField(name)}
    return SamplingParams(**values, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                          ignore_eos=s.ignore_eos)


def fill_final(response: pb.GenerateResponse, timings: dict | None) -> None:
    if not timings:
        return
    response.usage.prompt_tokens = timings["prompt_tokens"]
    response.usage.completion_tokens = timings["generated_tokens"]
    first = timings.get("first_token")
    response.timings.time_to_first_token = 0.0 if first is None else first - timings["arrival"]
    response.timings.total_seconds = timings["finished"] - timings["arrival"]
    response.timings.preemptions = timings.get("preemptions", 0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("jlora")
    except PackageNotFoundError:
        return "unknown"


# -------------------------------------------------------------------- running it
async def serve(options: ServerOptions, keys: KeyRing,
                build: Callable[[], tuple[Engine, str]], log=print) -> bool:
    """Listen at once (NOT_SERVING), build and start the engine off the event loop, serve
    until SIGTERM or SIGINT, then drain and stop the engine. Returns False when a signal
    came during warm-up: the build thread (a daemon) may still be running then."""
    server = JloraServer(options, keys)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    log(f"jlora: listening on {host_port(options.host, port)}, warming up")
    # the engine is built in a daemon thread, so that a signal during the warm-up need not
    # wait for the build to end
    built = concurrent.futures.Future()
    threading.Thread(target=_run_into, args=(build, built), name="jlora-build",
                     daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({asyncio.wrap_future(built), stopped},
                                 return_when=asyncio.FIRST_COMPLETED)
    if stopped in done or built.exception() is not None:
        await server._server.stop(None)
        if stopped in done:
            log("jlora: stopped during warm-up")
            return False
        raise built.exception()
    engine, model_name = built.result()
    engine.start()
    await server.attach(engine, model_name)
    log(f"jlora: serving {model_name} on {host_port(options.host, port)} (pid {os.getpid()})"
        + (f", metrics on http://{host_port(options.host, options.metrics_port)}/metrics"
           if options.metrics_port is not None else ""))
    await stopped
    log(f"jlora: draining ({len(server._running)} requests running or waiting)")
    await server.drain()
    engine.close()
    log("jlora: stopped")
    return True


def _run_into(fn, future: concurrent.futures.Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as e:  # noqa: BLE001 (handed to the waiting event loop)
        future.set_exception(e)


class ServerThread:
    """A server around a ready engine, on its own event loop thread (tests, benchmarks)."""

    def __init__(self, engine: Engine, options: ServerOptions = ServerOptions(port=0),
                 keys: KeyRing = KeyRing(), model_name: str = "test"):
        self.server = JloraServer(options, keys)
        self.engine, self.model_name = engine, model_name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="jlora-grpc",
                                        daemon=True)

    def start(self) -> int:
        self._thread.start()
        self.run(self.server.start())
        self.run(self.server.attach(self.engine, self.model_name))
        return self.server.port

    def run(self, coro, timeout: float | None = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, drain: float = 0.0) -> None:
        self.run(self.server.drain(drain))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
