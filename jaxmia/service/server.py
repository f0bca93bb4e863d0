"""``jaxmia serve``: the recognition service over HTTP, its every answer in a persistent store.

An ASGI app (Starlette, run by uvicorn). Starlette rather than FastAPI: the request bodies are
binary image batches (.npy, or one PNG/JPEG), not JSON models, so FastAPI's validation and
schema layer would add a dependency (pydantic) and nothing used; Starlette is what FastAPI is
built on, and its test client drives the app in-process for the tests.

Endpoints (JSON answers; errors are ``{"error": "one line"}`` with a 4xx code):

- ``POST /v1/query`` (a client's key): a batch of images as a ``.npy`` array [b, h, w, c]
  (float in [0, 1] or uint8) or one PNG/JPEG; answers ``labels`` (and ``top_labels`` /
  ``probabilities`` as the policy says) and the queries' ``indices``.
- ``GET /v1/records?after=I&limit=N``: the caller's own queries (index, hash, answer, time);
  an administrator's key reads every client's, with the ground truth (true label, altered,
  flagged as a near-duplicate), ``&client=NAME`` for one.
- ``GET /v1/policy``: the answer mode, image shape and class count a client needs.
- ``POST /v1/clients`` (administrator): ``{"name": N, "budget": B}`` -> the new client's key,
  shown once (only its SHA-256 is stored). ``GET /v1/clients`` (administrator): the accounts.
- ``POST /v1/truth`` (administrator): the recognizer's unaltered top-1 of images, unrecorded
  (for scoring a clone's fidelity).
- ``GET /healthz``, ``GET /metrics`` (Prometheus text): no key.

Dynamic batching: requests wait in a queue; the batcher takes the first and whatever else
arrives within ``max_wait_ms`` (up to ``max_batch`` images), and the recognizer answers them
in one pass (``Service.query_many``) on one worker thread, so throughput grows with load while
a lone request waits at most ``max_wait_ms``. Each request's queries are in the store (SQLite,
WAL) before its answer is sent; on start the service rebuilds its accounts, budgets and
near-duplicate index from the store. SIGTERM (and Ctrl-C) stops accepting connections,
answers the requests in flight (for at most ``serve.shutdown_s``), then closes the store.

Robustness: a body is checked against the served shape and ``max_images`` from its header
(.npy header, PNG/JPEG size) before anything is decoded, and decoded on worker threads, so no
body blocks the event loop or another client's answer; an exception of one request never ends
the batcher (``/healthz`` answers 503 if it ever stops); connections are capped and dropped
when their request head or body is slower than its deadline (``Limits``); every response, an
unexpected error's included, is one line of JSON and counted in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import secrets
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from jaxmia import checkpoint
from jaxmia import workdir as workdir_lib
from jaxmia.errors import JaxmiaError
from jaxmia.service import policy as service_lib
from jaxmia.service import store as store_lib

DB, ADMIN_KEY, SECRET, RECORD = "service.db", "admin.key", "secret.key", "serve.json"
IMAGE_TYPES = ("image/png", "image/jpeg")
MAX_JSON_BYTES = 1 << 16  # a /v1/clients body
MAX_INDEX = 2**63 - 1  # SQLite's largest integer
log = logging.getLogger("jaxmia.serve")


class HTTPError(Exception):
    """A request's fault, answered with ``status`` and ``{"error": message}``; ``close`` also
    ends its connection (a body not read to its end)."""

    def __init__(self, status: int, message: str, *, close: bool = False):
        super().__init__(message)
        self.status, self.close = status, close


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's batching and request limits (``config.serve``)."""

    max_batch: int = 256  # images per recognizer pass
    max_wait_ms: float = 5.0  # the longest a request waits for others to batch with
    max_body_bytes: int = 64 << 20
    max_images: int = 1024  # per request
    max_connections: int = 512  # open at once; more are answered 503 and closed
    keep_alive_s: float = 5.0  # an idle connection between requests is closed after this
    header_timeout_s: float = 10.0  # from a connection's start (or last answer) to its head
    body_timeout_s: float = 30.0  # to receive a whole body, once its head is in
    shutdown_s: float = 10.0  # SIGTERM waits this long for the requests in flight
    decode_threads: int = 2  # worker threads decoding bodies off the event loop


def _count(images: Any) -> int:
    """Images in a request for the batch size (any array: the service refuses the bad ones)."""
    return int(np.shape(images)[0]) if np.ndim(images) else 1


class Batcher:
    """Gathers concurrent requests into one recognizer pass on a single worker thread.

    Everything that touches the service runs on that thread, in arrival order, so the service
    needs no locks and answers exactly as sequential ``query`` calls would. A batch that fails
    as a whole (the recognizer raised) fails its requests only: the batcher goes on.
    """

    def __init__(self, service: service_lib.Service, limits: Limits):
        self.service, self.limits = service, limits
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="jaxmia-model")
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = self.batched_images = 0
        self.task: asyncio.Task | None = None

    @property
    def dead(self) -> str | None:
        """Why the batcher stopped answering (None while it runs)."""
        if self.task is None or not self.task.done():
            return None
        if self.task.cancelled():
            return "the batcher was cancelled"
        e = self.task.exception()
        return f"the batcher stopped ({type(e).__name__}: {e})" if e else "the batcher stopped"

    async def call(self, fn, *args):
        """Runs ``fn(*args)`` on the service's thread (after the batches queued before it)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def query(self, client: str, images: np.ndarray):
        if self.dead:
            raise HTTPError(503, f"service unavailable: {self.dead}")
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((client, images, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self.queue.get()
            if first is None:
                break
            group, n = [first], _count(first[1])
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while n < self.limits.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except TimeoutError:
                        break
                if item is None:
                    stop = True
                    break
                group.append(item)
                n += _count(item[1])
            try:
                results = await self.call(self.service.query_many, [(c, x) for c, x, _ in group])
            except Exception as e:  # noqa: BLE001 - the recognizer failed: this batch fails
                log.exception("jaxmia serve: a batch of %d requests failed", len(group))
                results = [e] * len(group)
            else:
                self.batches += 1
                self.batched_images += n
            for (*_, fut), r in zip(group, results, strict=True):
                if fut.done():  # its client left and the request was cancelled
                    continue
                if isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)

    async def close(self) -> None:
        await self.queue.put(None)


@dataclasses.dataclass
class Metrics:
    requests: dict = dataclasses.field(default_factory=dict)  # (path, status) -> count
    queries: int = 0
    seconds: float = 0.0
    answered: int = 0

    def text(self, batcher: Batcher) -> str:
        lines = ["# TYPE jaxmia_requests_total counter"]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'jaxmia_requests_total{{path="{path}",status="{status}"}} {n}')
        lines += [
            "# TYPE jaxmia_queries_total counter",
            f"jaxmia_queries_total {self.queries}",
            "# TYPE jaxmia_query_seconds summary",
            f"jaxmia_query_seconds_sum {self.seconds:.6f}",
            f"jaxmia_query_seconds_count {self.answered}",
            "# TYPE jaxmia_batches_total counter",
            f"jaxmia_batches_total {batcher.batches}",
            f"jaxmia_batched_images_total {batcher.batched_images}",
            "# TYPE jaxmia_queue_depth gauge",
            f"jaxmia_queue_depth {batcher.queue.qsize()}",
        ]
        return "\n".join(lines) + "\n"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _shape_error(got: tuple, shape: tuple[int, int, int]) -> HTTPError:
    return HTTPError(
        400,
        f"query images: expected shape [batch, {', '.join(map(str, shape))}], got {list(got)}",
    )


def decode_images(
    body: bytes, content_type: str, shape: tuple[int, int, int], max_images: int = 1024
) -> np.ndarray:
    """A request body as float32 images in [0, 1] # [b, h, w, c].

    The shape, the image count and the size are read from the body's header (the .npy header,
    the PNG/JPEG size) and checked before any pixel is decoded or converted: a header that
    claims a huge image or array costs nothing to refuse.

    Args:
      body: a ``numpy.save`` array [b, h, w, c] (float, or uint8 for 0..255), or one PNG/JPEG.
      content_type: the request's Content-Type.
      shape: the served (h, w, c).
      max_images: the most images one request may hold.

    Raises:
      HTTPError: 400 for a body that is not a readable .npy array or PNG/JPEG image of the
        served shape, 413 for more than ``max_images`` images, 415 for another Content-Type.
    """
    kind = content_type.split(";")[0].strip().lower()
    if kind in IMAGE_TYPES:
        return _decode_image(body, kind, shape)
    if kind not in ("application/x-npy", "application/octet-stream", ""):
        raise HTTPError(
            415, f"Content-Type {ascii(kind)[:80]}: expected application/x-npy or one of "
            f"{IMAGE_TYPES}",
        )  # fmt: skip
    if not body.startswith(b"\x93NUMPY"):
        raise HTTPError(
            400, "request body: not a .npy array (it lacks the .npy magic bytes); expected "
            "numpy.save's output, or one PNG/JPEG image with its Content-Type",
        )  # fmt: skip
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        read = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version not in read:
            raise ValueError(f"format version {version[0]}.{version[1]}, expected 1.0 or 2.0")
        got, fortran, dtype = read[version](f)
    except (ValueError, TypeError, SyntaxError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HTTPError(400, f"request body: not a readable .npy array ({first})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise HTTPError(400, f"request body: expected float or uint8 pixels, got {dtype}")
    if not (dtype.kind == "f" or (dtype.kind == "u" and dtype.itemsize == 1)):
        raise HTTPError(400, f"request body: expected float or uint8 pixels, got {dtype}")
    if len(got) != 4 or tuple(got[1:]) != tuple(shape):
        raise _shape_error(got, shape)
    if got[0] > max_images:
        raise HTTPError(
            413, f"query images: {got[0]} in one request, expected at most {max_images}"
        )
    count, offset = math.prod(got), f.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise HTTPError(
            400, f"request body: not a readable .npy array (its header claims "
            f"{count * dtype.itemsize} bytes of pixels, the body has {len(body) - offset})",
        )  # fmt: skip
    x = np.frombuffer(body, dtype, count, offset).reshape(got, order="F" if fortran else "C")
    if dtype.kind == "u":
        return x.astype(np.float32) / np.float32(255)
    return x.astype(np.float32)


def _decode_image(body: bytes, kind: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One PNG/JPEG of the served size as float32 [1, h, w, c]; its size read first."""
    from PIL import Image

    fmt = "PNG" if kind == "image/png" else "JPEG"
    try:
        with Image.open(io.BytesIO(body), formats=[fmt]) as im:  # reads the header only
            if im.size != (shape[1], shape[0]):
                raise _shape_error((1, im.size[1], im.size[0], shape[2]), shape)
            x = np.asarray(im.convert("L" if shape[-1] == 1 else "RGB"), np.float32) / 255.0
    except HTTPError:
        raise
    except Image.DecompressionBombError:  # Pillow's own header check, at open, for the largest
        raise HTTPError(
            400, f"query images: expected shape [batch, {', '.join(map(str, shape))}], got an "
            f"image over {2 * Image.MAX_IMAGE_PIXELS} pixels",
        ) from None  # fmt: skip
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on a broken file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HTTPError(400, f"request body: not a readable {kind} image ({first})") from None
    return (x[..., None] if x.ndim == 2 else x)[None]


class _Guard:
    """The outermost ASGI layer: counts every response by path and status, and answers an
    exception that escaped the app with a one-line JSON 500 (logged with its traceback)."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = None

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception as e:  # noqa: BLE001 - no exception may reach the client as text
            log.exception("jaxmia serve: %s %s failed", scope["method"], scope["path"])
            if status is None:  # Starlette's handler (JSON too) has usually answered already
                await _error(500, f"internal error: {type(e).__name__}")(scope, receive, counted)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            key = (path, status or 0)
            self.metrics.requests[key] = self.metrics.requests.get(key, 0) + 1


def create_app(
    service: service_lib.Service,
    store: store_lib.Store,
    limits: Limits = Limits(),
    *,
    on_ready=None,
) -> Any:
    """The ASGI app around a service whose state lives in ``store`` (its Starlette app, with
    the batcher as ``.app.state.batcher``, inside the layer that counts every response)."""
    batcher = Batcher(service, limits)
    metrics = Metrics()
    decoder = ThreadPoolExecutor(limits.decode_threads, thread_name_prefix="jaxmia-decode")

    def authorise(request: Request, *, admin: bool = False) -> tuple[str, bool]:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise HTTPError(401, "missing API key: expected the header 'Authorization: Bearer KEY'")
        who = store.client_for_key(header[7:].strip())
        if who is None:
            raise HTTPError(401, "unknown API key")
        if admin and not who[1]:
            raise HTTPError(403, f"client {who[0]!r}: this needs the administrator's key")
        return who

    async def body(request: Request, limit: int) -> bytes:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise HTTPError(
                413, f"request body: {length} bytes, expected at most {limit}", close=True
            )
        chunks, n = [], 0
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                async for chunk in request.stream():
                    n += len(chunk)
                    if n > limit:
                        raise HTTPError(
                            413, f"request body: over {limit} bytes, the limit", close=True
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise HTTPError(
                408, f"request body: not received within {limits.body_timeout_s:g} s", close=True
            ) from None
        except ClientDisconnect:
            raise HTTPError(400, "request body: the client left before sending it all") from None
        return b"".join(chunks)

    async def images_of(request: Request) -> np.ndarray:
        data = await body(request, limits.max_body_bytes)
        return await asyncio.get_running_loop().run_in_executor(
            decoder, decode_images, data, request.headers.get("content-type", ""),
            service.image_shape, limits.max_images,
        )  # fmt: skip

    def endpoint(fn):
        async def handle(request: Request) -> Response:
            try:
                return await fn(request)
            except HTTPError as e:
                response = _error(e.status, str(e))
                if e.close:
                    response.headers["connection"] = "close"
                return response
            except service_lib.BudgetError as e:
                return _error(429, str(e))
            except store_lib.StoreError as e:
                log.error("jaxmia serve: %s %s: %s", request.method, request.url.path, e)
                return _error(503, str(e))
            except JaxmiaError as e:
                return _error(400, str(e))

        return handle

    async def query(request: Request) -> Response:
        client, _ = authorise(request)
        x = await images_of(request)
        t0 = time.perf_counter()
        out = await batcher.query(client, x)
        metrics.queries += len(out.labels)
        metrics.seconds += time.perf_counter() - t0
        metrics.answered += 1
        reply: dict[str, Any] = {"labels": out.labels.tolist(), "indices": out.indices.tolist()}
        if out.top_labels is not None:
            reply["top_labels"] = out.top_labels.tolist()
        if out.probabilities is not None:
            reply["probabilities"] = out.probabilities.tolist()
        return JSONResponse(reply)

    async def records(request: Request) -> Response:
        client, admin = authorise(request)
        q = request.query_params
        try:
            after, limit = int(q.get("after", -1)), int(q.get("limit", 1000))
        except ValueError:
            raise HTTPError(400, "query parameters after, limit: expected integers") from None
        if not -1 <= after <= MAX_INDEX:
            raise HTTPError(400, f"query parameter after: expected -1..2^63-1, got {after}")
        if not 1 <= limit <= 100_000:
            raise HTTPError(400, f"query parameter limit: expected 1..100000, got {limit}")
        rows = store.records(q.get("client") if admin else client, after=after, limit=limit)
        if not admin:  # a client sees what it was answered, not the detector's hash
            rows = [{k: r[k] for k in ("index", "answer", "time")} for r in rows]
        return JSONResponse({"records": rows})

    async def policy(request: Request) -> Response:
        client, admin = authorise(request)
        reply = {"image_shape": list(service.image_shape), "classes": service.num_classes}
        if admin:  # the whole defence: the cloning study's ground truth needs it
            return JSONResponse({"policy": dataclasses.asdict(service.policy), **reply})
        # A client learns what a client of a real service would: the answers' form and its
        # own budget, nothing of the defences.
        mine = {"answer": service.policy.answer, "budget": service.budget_of(client)}
        if service.policy.answer == "topk":
            mine["top_k"] = service.policy.top_k
        return JSONResponse({"policy": mine, **reply})

    async def add_client(request: Request) -> Response:
        authorise(request, admin=True)
        try:
            spec = json.loads(await body(request, MAX_JSON_BYTES))
            name, budget = spec["name"], spec.get("budget")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise HTTPError(
                400, 'request body: expected JSON {"name": NAME, "budget": N (optional)}'
            ) from None
        try:
            name, key = await batcher.call(_add_client, service, store, name, budget)
        except store_lib.StoreError:
            raise
        except JaxmiaError as e:
            raise HTTPError(409 if "already taken" in str(e) else 400, str(e)) from None
        return JSONResponse({"name": name, "key": key}, status_code=201)

    async def list_clients(request: Request) -> Response:
        authorise(request, admin=True)
        return JSONResponse({"clients": await batcher.call(_clients, service, store)})

    async def truth(request: Request) -> Response:
        authorise(request, admin=True)
        x = await images_of(request)
        labels = await batcher.call(service.true_labels, x)
        return JSONResponse({"labels": labels.tolist()})

    async def health(request: Request) -> Response:
        if batcher.dead:
            return JSONResponse({"status": batcher.dead}, status_code=503)
        return JSONResponse({"status": "ok", "queries": service.queries})

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.text(batcher))

    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        return JSONResponse({"error": f"{request.method} {request.url.path}: {e.detail}"},
                            status_code=e.status_code, headers=e.headers)  # fmt: skip

    async def internal_error(request: Request, e: Exception) -> Response:
        return _error(500, f"internal error: {type(e).__name__}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.task = asyncio.create_task(batcher.run())
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await batcher.close()
            await asyncio.wait([batcher.task])  # its end, whatever it was (a dead one's too)
            batcher.executor.shutdown(wait=True)
            decoder.shutdown(wait=True)

    routes = [
        Route("/v1/query", endpoint(query), methods=["POST"]),
        Route("/v1/records", endpoint(records), methods=["GET"]),
        Route("/v1/policy", endpoint(policy), methods=["GET"]),
        Route("/v1/clients", endpoint(add_client), methods=["POST"]),
        Route("/v1/clients", endpoint(list_clients), methods=["GET"]),
        Route("/v1/truth", endpoint(truth), methods=["POST"]),
        Route("/healthz", endpoint(health), methods=["GET"]),
        Route("/metrics", endpoint(metrics_text), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={StarletteHTTPException: http_error, Exception: internal_error},
    )
    app.state.batcher = batcher
    return _Guard(app, metrics, {r.path for r in routes})


def _add_client(service, store, name, budget) -> tuple[str, str]:
    """(the stored name, the new key)."""
    key = store.add_client(name, budget=budget)
    name = store_lib.client_name(name)
    if budget is not None:
        service.budgets[name] = budget
    return name, key


def _clients(service, store) -> list[dict]:
    out = []
    for c in store.clients():
        account = service.clients.get(c["name"], service_lib.Client())
        out.append(
            {
                "name": c["name"],
                "admin": c["admin"],
                "budget": service.budget_of(c["name"]),
                "queries": account.queries,
                "duplicates": account.duplicates,
                "suspicious": account.suspicious,
            }
        )
    return out


# -- the command's stage ------------------------------------------------------------------------


def policy_of(cfg: ml_collections.ConfigDict) -> service_lib.Policy:
    """The ``serve`` section's service policy."""
    fields = {f.name for f in dataclasses.fields(service_lib.Policy)}
    values = {k: v for k, v in cfg.to_dict().items() if k in fields}
    values["buckets"] = tuple(values["buckets"])
    return service_lib.Policy(**values)


def limits_of(cfg: ml_collections.ConfigDict) -> Limits:
    """The ``serve`` section's batching, request and connection limits."""
    for name in ("max_batch", "max_images", "max_connections", "decode_threads"):
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], int) or cfg[name] < 1:
            raise JaxmiaError(
                f"config field serve.{name}: expected an integer >= 1, got {cfg[name]}"
            )
    if not 0 <= cfg.max_wait_ms <= 10_000:
        raise JaxmiaError(
            f"config field serve.max_wait_ms: expected 0..10000, got {cfg.max_wait_ms}"
        )
    if not 0 < cfg.max_body_mb <= 4096:
        raise JaxmiaError(
            f"config field serve.max_body_mb: expected in (0, 4096], got {cfg.max_body_mb}"
        )
    for name in ("keep_alive_s", "header_timeout_s", "body_timeout_s", "shutdown_s"):
        if not 0 < cfg[name] <= 3600:
            raise JaxmiaError(f"config field serve.{name}: expected in (0, 3600], got {cfg[name]}")
    return Limits(
        max_batch=cfg.max_batch,
        max_wait_ms=float(cfg.max_wait_ms),
        max_body_bytes=int(cfg.max_body_mb * (1 << 20)),
        max_images=cfg.max_images,
        max_connections=cfg.max_connections,
        keep_alive_s=float(cfg.keep_alive_s),
        header_timeout_s=float(cfg.header_timeout_s),
        body_timeout_s=float(cfg.body_timeout_s),
        shutdown_s=float(cfg.shutdown_s),
        decode_threads=cfg.decode_threads,
    )


def protocol_class(limits: Limits) -> type:
    """uvicorn's HTTP/1.1 protocol with a cap on open connections and a deadline for each
    request's head (uvicorn has neither: idle or slowloris sockets would stay open forever).

    A connection over ``max_connections`` is answered a JSON 503 and closed; one whose request
    head has not fully arrived ``header_timeout_s`` after it opened (or after its last answer)
    is closed. The body's deadline is the app's (``body_timeout_s``).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = json.dumps({"error": "service busy: too many open connections"}).encode()
    busy = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(busy), busy)
    )

    class Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(limits.header_timeout_s, self._head_late)

        def _head_late(self) -> None:
            # Still waiting for (the rest of) a request head: drop the connection.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

    return Protocol


def uvicorn_config(app, limits: Limits, host: str, port: int):
    """uvicorn's config for the app under ``limits`` (its protocol: ``protocol_class``)."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", http=protocol_class(limits),
        timeout_keep_alive=limits.keep_alive_s, timeout_graceful_shutdown=limits.shutdown_s,
        lifespan="on",
    )  # fmt: skip


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise JaxmiaError(f"{path}: cannot read the {what} ({e})") from None
    if not value:
        raise JaxmiaError(f"{path}: empty; expected the {what} written at the first start")
    return value


def _secret_file(path: Path, make) -> str:
    """A secret in a file only its owner reads (0600), made now."""
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def weights_digest(params: Any) -> str:
    """SHA-256 of a recognizer's weights (every leaf's path, dtype, shape and bytes)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _coin_key(cfg: ml_collections.ConfigDict, path: Path, store: store_lib.Store) -> jax.Array:
    """The misrecognition coins' key: ``serve.seed``, or the secret in ``path``.

    A store that holds queries and no secret is refused: a new secret would re-draw the coins,
    and comparing old and new answers would show which earlier ones were altered.
    """
    if cfg.seed >= 0:
        return jax.random.key(cfg.seed)
    if path.exists():
        text = _read_secret(path, "service's secret coin key")
        try:
            return jax.random.key(int(text))
        except (ValueError, OverflowError):
            raise JaxmiaError(f"{path}: expected an integer secret, got {text[:20]!r}") from None
    if (n := store.count()) > 0:
        raise JaxmiaError(
            f"{path}: missing, and {store.path} holds {n} queries answered with it; restore it "
            "(a new secret would reveal which earlier answers were altered)"
        )
    return jax.random.key(int(_secret_file(path, lambda: str(secrets.randbits(62)))))


def open_service(
    config: ml_collections.ConfigDict, checkpoint_dir: str | Path, workdir: str | Path
) -> tuple[service_lib.Service, store_lib.Store, str]:
    """The service of ``jaxmia serve``: its recognizer, its store, and the administrator key.

    The workdir (created 0700: it holds the keys and every query's truth) is claimed for the
    checkpoint, a digest of its weights and the policy (a restart with others is refused: the
    stored answers were given under them). The first start makes the administrator's key
    (``workdir/admin.key``, readable by its owner only) and, unless ``serve.seed`` >= 0, the
    service's secret coin key (``workdir/secret.key``); a restart refuses to go on without
    them.
    """
    cfg = config.serve
    policy = policy_of(cfg)
    limits_of(cfg)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise JaxmiaError(f"--workdir {workdir}: exists and is not a folder")
    rec = checkpoint.load_recognizer(checkpoint_dir)
    settings = workdir_lib.flatten(
        {
            "checkpoint": str(Path(checkpoint_dir).resolve()),
            "step": rec.step,
            "weights": weights_digest(rec.params),
            "policy": dataclasses.asdict(policy),
            "seed": cfg.seed,
        }
    )
    if not workdir.exists():
        workdir.mkdir(parents=True, mode=0o700)
        os.chmod(workdir, 0o700)  # whatever the umask
    old = workdir_lib.read(workdir / RECORD)
    if old is not None and "weights" not in old["settings"]:  # recorded before the digest was
        workdir_lib.check(workdir / RECORD, {k: v for k, v in settings.items() if k != "weights"})
        (workdir / RECORD).unlink()
    workdir_lib.claim(
        workdir / RECORD, settings, hint="serve those weights, or use another --workdir"
    )
    store = store_lib.Store(workdir / DB, durable=cfg.durable)
    try:
        key = _coin_key(cfg, workdir / SECRET, store)
        admin = _admin_key(store, workdir / ADMIN_KEY)
        svc = service_lib.Service(
            rec.graphdef,
            rec.params,
            policy=policy,
            key=key,
            image_shape=(*rec.config.image_size, rec.config.channels),
            store=store,
        )
    except BaseException:
        store.close()
        raise
    return svc, store, admin


def _admin_key(store: store_lib.Store, path: Path) -> str:
    if path.exists():
        key = _read_secret(path, "administrator key")
        if store.client_for_key(key) != ("admin", True):
            raise JaxmiaError(f"{path}: not the administrator key of {store.path}")
        return key
    if any(c["admin"] for c in store.clients()):
        raise JaxmiaError(f"{path}: missing, and {store.path} has an administrator; restore it")
    key = store.add_client("admin", admin=True)
    _secret_file(path, lambda: key)
    return key


def serve(
    config: ml_collections.ConfigDict,
    checkpoint_dir: str | Path,
    workdir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Runs the server until SIGTERM or Ctrl-C."""
    import uvicorn

    with socket.socket() as probe:  # a busy port is bad input, found before the slow start
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise JaxmiaError(f"--host {host} --port {port}: cannot listen there ({e})") from None
    svc, store, _ = open_service(config, checkpoint_dir, workdir)
    limits = limits_of(config.serve)
    svc.warm_up()

    def ready():
        print(
            f"jaxmia serve: {svc.num_classes} identities, {svc.queries} stored queries, "
            f"{len(svc.clients)} clients with queries; listening on http://{host}:{port} "
            f"(administrator key in {Path(workdir) / ADMIN_KEY})",
            flush=True,
        )

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM or Ctrl-C after the graceful shutdown is a clean
        exit (0), not re-raised to kill the process before the store is closed."""

        @contextlib.contextmanager
        def capture_signals(self):
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    app = create_app(svc, store, limits, on_ready=ready)
    try:
        Server(uvicorn_config(app, limits, host, port)).run()
    finally:
        store.close()
    print("jaxmia serve: stopped; every answered query is in the store", flush=True)
