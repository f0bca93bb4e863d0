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
answers the requests in flight, then closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
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
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from jaxmia import checkpoint
from jaxmia import service as service_lib
from jaxmia import store as store_lib
from jaxmia import workdir as workdir_lib
from jaxmia.errors import JaxmiaError

DB, ADMIN_KEY, SECRET, RECORD = "service.db", "admin.key", "secret.key", "serve.json"
IMAGE_TYPES = ("image/png", "image/jpeg")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's batching and request limits (``config.serve``)."""

    max_batch: int = 256  # images per recognizer pass
    max_wait_ms: float = 5.0  # the longest a request waits for others to batch with
    max_body_bytes: int = 64 << 20
    max_images: int = 1024  # per request


class Batcher:
    """Gathers concurrent requests into one recognizer pass on a single worker thread.

    Everything that touches the service runs on that thread, in arrival order, so the service
    needs no locks and answers exactly as sequential ``query`` calls would.
    """

    def __init__(self, service: service_lib.Service, limits: Limits):
        self.service, self.limits = service, limits
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="jaxmia-model")
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = self.batched_images = 0

    async def call(self, fn, *args):
        """Runs ``fn(*args)`` on the service's thread (after the batches queued before it)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def query(self, client: str, images: np.ndarray):
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
            group, n = [first], len(first[1])
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
                n += len(item[1])
            try:
                results = await self.call(self.service.query_many, [(c, x) for c, x, _ in group])
            except Exception as e:  # the store or the recognizer failed: every request fails
                for *_, fut in group:
                    fut.set_exception(e)
                continue
            self.batches += 1
            self.batched_images += n
            for (*_, fut), r in zip(group, results, strict=True):
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


def decode_images(body: bytes, content_type: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A request body as float images in [0, 1] # [b, h, w, c] (shape checked by the service).

    Raises:
      HTTPError: 400 for a body that is not a readable .npy array or PNG/JPEG image, or 415.
    """
    kind = content_type.split(";")[0].strip().lower()
    if kind in IMAGE_TYPES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(body)) as im:
                im = im.convert("L" if shape[-1] == 1 else "RGB")
                x = np.asarray(im, np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise HTTPError(400, f"request body: not a readable {kind} image ({e})") from None
        return (x[..., None] if x.ndim == 2 else x)[None]
    if kind not in ("application/x-npy", "application/octet-stream", ""):
        raise HTTPError(
            415, f"Content-Type {kind!r}: expected application/x-npy or one of {IMAGE_TYPES}"
        )
    if not body.startswith(b"\x93NUMPY"):
        raise HTTPError(
            400, "request body: not a .npy array (it lacks the .npy magic bytes); expected "
            "numpy.save's output, or one PNG/JPEG image with its Content-Type",
        )  # fmt: skip
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HTTPError(400, f"request body: not a readable .npy array ({first})") from None
    if not isinstance(x, np.ndarray):
        raise HTTPError(400, "request body: expected one .npy array, got an archive")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype.kind != "f":
        raise HTTPError(400, f"request body: expected float or uint8 pixels, got {x.dtype}")
    return x


def create_app(
    service: service_lib.Service,
    store: store_lib.Store,
    limits: Limits = Limits(),
    *,
    on_ready=None,
) -> Starlette:
    """The ASGI app around a service whose state lives in ``store``."""
    batcher = Batcher(service, limits)
    metrics = Metrics()

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

    async def body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            raise HTTPError(
                413, f"request body: {length} bytes, expected at most {limits.max_body_bytes}"
            )
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limits.max_body_bytes:
                raise HTTPError(413, f"request body: over {limits.max_body_bytes} bytes, the limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def images_of(request: Request) -> np.ndarray:
        x = decode_images(
            await body(request), request.headers.get("content-type", ""), service.image_shape
        )
        if x.ndim == 4 and len(x) > limits.max_images:
            raise HTTPError(
                413, f"query images: {len(x)} in one request, expected at most {limits.max_images}"
            )
        return x

    def endpoint(fn, path: str):
        async def handle(request: Request) -> Response:
            try:
                response = await fn(request)
            except HTTPError as e:
                response = _error(e.status, str(e))
            except service_lib.BudgetError as e:
                response = _error(429, str(e))
            except JaxmiaError as e:
                response = _error(400, str(e))
            key = (path, response.status_code)
            metrics.requests[key] = metrics.requests.get(key, 0) + 1
            return response

        return handle

    async def query(request: Request) -> Response:
        client, _ = authorise(request)
        x = await images_of(request)
        t0 = time.perf_counter()
        out = await batcher.query(client, x)
        if isinstance(out, JaxmiaError):
            raise out
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
        if not 1 <= limit <= 100_000:
            raise HTTPError(400, f"query parameter limit: expected 1..100000, got {limit}")
        rows = store.records(q.get("client") if admin else client, after=after, limit=limit)
        if not admin:
            rows = [{k: r[k] for k in ("index", "hash", "answer", "time")} for r in rows]
        return JSONResponse({"records": rows})

    async def policy(request: Request) -> Response:
        authorise(request)
        return JSONResponse(
            {
                "policy": dataclasses.asdict(service.policy),
                "image_shape": list(service.image_shape),
                "classes": service.num_classes,
            }
        )

    async def add_client(request: Request) -> Response:
        authorise(request, admin=True)
        try:
            spec = json.loads(await body(request))
            name, budget = spec["name"], spec.get("budget")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise HTTPError(
                400, 'request body: expected JSON {"name": NAME, "budget": N (optional)}'
            ) from None
        try:
            key = await batcher.call(_add_client, service, store, name, budget)
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
        return JSONResponse({"status": "ok", "queries": service.queries})

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.text(batcher))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await batcher.close()
            await task
            batcher.executor.shutdown(wait=True)

    routes = [
        Route("/v1/query", endpoint(query, "/v1/query"), methods=["POST"]),
        Route("/v1/records", endpoint(records, "/v1/records"), methods=["GET"]),
        Route("/v1/policy", endpoint(policy, "/v1/policy"), methods=["GET"]),
        Route("/v1/clients", endpoint(add_client, "/v1/clients"), methods=["POST"]),
        Route("/v1/clients", endpoint(list_clients, "/v1/clients"), methods=["GET"]),
        Route("/v1/truth", endpoint(truth, "/v1/truth"), methods=["POST"]),
        Route("/healthz", endpoint(health, "/healthz"), methods=["GET"]),
        Route("/metrics", endpoint(metrics_text, "/metrics"), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _add_client(service, store, name, budget) -> str:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise JaxmiaError(f"client budget: expected an integer >= 0, got {budget!r}")
    key = store.add_client(name, budget=budget)
    if budget is not None:
        service.budgets[name] = budget
    return key


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
    for name in ("max_batch", "max_images"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
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
    return Limits(
        max_batch=cfg.max_batch,
        max_wait_ms=float(cfg.max_wait_ms),
        max_body_bytes=int(cfg.max_body_mb * (1 << 20)),
        max_images=cfg.max_images,
    )


def _secret_file(path: Path, make) -> str:
    """A secret kept in a file only its owner reads, made on first use."""
    if path.exists():
        return path.read_text().strip()
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def open_service(
    config: ml_collections.ConfigDict, checkpoint_dir: str | Path, workdir: str | Path
) -> tuple[service_lib.Service, store_lib.Store, str]:
    """The service of ``jaxmia serve``: its recognizer, its store, and the administrator key.

    The workdir is claimed for the checkpoint and policy (a restart with others is refused:
    the stored answers were given under them). The first start makes the administrator's key
    (``workdir/admin.key``, readable by its owner only) and, unless ``serve.seed`` >= 0, the
    service's secret coin key (``workdir/secret.key``).
    """
    cfg = config.serve
    policy = policy_of(cfg)
    limits_of(cfg)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise JaxmiaError(f"--workdir {workdir}: exists and is not a folder")
    rec = checkpoint.load_recognizer(checkpoint_dir)
    settings = {
        "checkpoint": str(Path(checkpoint_dir).resolve()),
        "step": rec.step,
        "policy": dataclasses.asdict(policy),
        "seed": cfg.seed,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.claim(workdir / RECORD, workdir_lib.flatten(settings))
    if cfg.seed >= 0:
        key = jax.random.key(cfg.seed)
    else:
        key = jax.random.key(int(_secret_file(workdir / SECRET, lambda: str(secrets.randbits(62)))))
    store = store_lib.Store(workdir / DB, durable=cfg.durable)
    admin = _admin_key(store, workdir / ADMIN_KEY)
    svc = service_lib.Service(
        rec.graphdef,
        rec.params,
        policy=policy,
        key=key,
        image_shape=(*rec.config.image_size, rec.config.channels),
        store=store,
    )
    return svc, store, admin


def _admin_key(store: store_lib.Store, path: Path) -> str:
    if path.exists():
        key = path.read_text().strip()
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
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30
    )
    try:
        Server(config).run()
    finally:
        store.close()
    print("jaxmia serve: stopped; every answered query is in the store", flush=True)
