"""The served recognition service: the store, the HTTP API, bad input, load, a killed server."""

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib

import jax
import numpy as np
import pytest
from conftest import xla_flags
from service.test_policy import textured
from starlette.testclient import TestClient

from jaxmia import checkpoint
from jaxmia import config as config_lib
from jaxmia.recognizers import models
from jaxmia.service import client, server, store
from jaxmia.service import policy as policy_lib

SHAPE = (16, 16, 1)
CONFIG = models.ModelConfig(
    num_classes=6, image_size=SHAPE[:2], channels=1, conv_features=(4, 8), kernel_sizes=(3, 3),
    dense_features=(32,),
)  # fmt: skip
GRAPHDEF, PARAMS = models.init(CONFIG, jax.random.key(0))


def near(x, seed=1):
    return np.clip(x + np.random.default_rng(seed).normal(0, 0.01, x.shape), 0, 1).astype(
        np.float32
    )


POLICY = dict(misrecognition=0.3, detector="hash", radius=4, answer="topk", top_k=2, buckets=(8,))


def make(db=None, **policy):
    return policy_lib.Service(
        GRAPHDEF, PARAMS, policy=policy_lib.Policy(**(POLICY | policy)), key=jax.random.key(3),
        image_shape=SHAPE, store=db,
    )  # fmt: skip


def traffic():
    """Requests of three clients, near-duplicates among them and of earlier ones."""
    x = textured(12)
    return [
        ("a", x[:4]), ("b", x[4:7]), ("a", near(x[:2])), ("c", x[7:12]),
        ("b", near(x[4:6], 2)), ("a", near(x[8:10], 3)), ("c", x[:1]),
    ]  # fmt: skip


def _same(u, v):
    np.testing.assert_array_equal(u.labels, v.labels)
    np.testing.assert_array_equal(u.top_labels, v.top_labels)
    np.testing.assert_allclose(u.probabilities, v.probabilities, rtol=1e-6)
    np.testing.assert_array_equal(u.indices, v.indices)


@pytest.mark.parametrize("detector", ["hash", "embedding"])
@pytest.mark.parametrize("scope", ["client", "global"])
def test_batched_and_restarted_service_answers_like_sequential_queries(tmp_path, detector, scope):
    reqs = traffic()
    ref = make(detector=detector, scope=scope)
    expected = [ref.query(c, x) for c, x in reqs]
    assert ref.history()["duplicate"].any()  # the traffic exercises the detector
    # one recognizer pass for all, the same answers
    batched = make(detector=detector, scope=scope).query_many(reqs)
    for u, v in zip(batched, expected, strict=True):
        _same(u, v)
    # a stored service stopped after 4 requests and restarted from its store alone
    db = store.Store(tmp_path / "s.db")
    first = make(db, detector=detector, scope=scope)
    got = [first.query(c, x) for c, x in reqs[:4]]
    db.close()
    db = store.Store(tmp_path / "s.db")
    again = make(db, detector=detector, scope=scope)
    got += [again.query(c, x) for c, x in reqs[4:]]
    for u, v in zip(got, expected, strict=True):
        _same(u, v)
    h, r = again.history(), ref.history()
    for name in policy_lib.HISTORY_COLUMNS:
        np.testing.assert_array_equal(h[name], r[name], err_msg=name)
    assert {n: (c.queries, c.duplicates) for n, c in again.clients.items()} == {
        n: (c.queries, c.duplicates) for n, c in ref.clients.items()
    }


def test_a_refused_request_in_a_batch_changes_nothing_and_others_are_answered():
    svc = make(budget=5)
    x = textured(8)
    out = svc.query_many([("a", x[:3]), ("a", x[3:6]), ("b", x[:2, :8]), ("b", x[6:8])])
    assert isinstance(out[1], policy_lib.BudgetError) and "budget 5 exceeded" in str(out[1])
    assert isinstance(out[2], policy_lib.JaxmiaError) and "expected shape" in str(out[2])
    assert out[0].indices.tolist() == [0, 1, 2] and out[3].indices.tolist() == [3, 4]
    assert svc.clients["a"].queries == 3 and svc.queries == 5


def test_rounded_probabilities():
    x = textured(4)
    exact = make(misrecognition=0.0, answer="probs").query("a", x).probabilities
    got = make(misrecognition=0.0, answer="probs", decimals=2).query("a", x).probabilities
    np.testing.assert_allclose(got, np.round(exact, 2), atol=1e-7)
    assert len(np.unique(got)) < len(np.unique(exact))
    with pytest.raises(policy_lib.JaxmiaError, match="service policy decimals: expected 0..8"):
        policy_lib.Policy(decimals=9)


# -- the HTTP API, in process -------------------------------------------------------------------


def serve_config(**fields):
    c = config_lib.default_config()
    c.serve.update({"seed": 0, "buckets": (8,), **fields})
    return c


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "rec"
    checkpoint.save_recognizer(path, PARAMS, CONFIG, [f"p{i}" for i in range(6)])
    return path


@pytest.fixture
def api(tmp_path, recognizer):
    cfg = serve_config(budget=20, detector="hash", misrecognition=0.3, answer="topk")
    svc, db, admin = server.open_service(cfg, recognizer, tmp_path / "serve")
    app = server.create_app(svc, db, server.Limits(max_body_bytes=1_000_000, max_images=64))
    with TestClient(app) as http:
        yield http, admin, db, tmp_path / "serve"
    db.close()


def _npy(x):
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _post(http, key, body, content_type="application/x-npy"):
    return http.post("/v1/query", content=body, headers=_auth(key) | {"Content-Type": content_type})


def test_api_answers_records_and_keeps_clients_apart(api):
    http, admin, db, workdir = api
    r = http.post("/v1/clients", json={"name": "alice"}, headers=_auth(admin))
    assert r.status_code == 201
    alice = r.json()["key"]
    bob = http.post("/v1/clients", json={"name": "bob", "budget": 50}, headers=_auth(admin))
    bob = bob.json()["key"]
    # keys are stored hashed only
    raw = (workdir / "service.db").read_bytes() + (workdir / "service.db-wal").read_bytes()
    assert alice.encode() not in raw and store.hash_key(alice).encode() in raw
    x = textured(6)
    r = _post(http, alice, _npy(x[:4]))
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["indices"] == [0, 1, 2, 3] and len(reply["top_labels"][0]) == 3
    # uint8 pixels and a PNG are the same images to the service
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray((x[4, ..., 0] * 255).round().astype(np.uint8)).save(png, format="PNG")
    r1 = _post(http, bob, png.getvalue(), "image/png").json()
    r2 = _post(http, bob, _npy((x[4:5] * 255).round().astype(np.uint8))).json()
    assert r1["labels"] == r2["labels"] and r2["indices"] == [5]
    # the same answers as the in-process service with the same policy and key
    ref = make(budget=20, misrecognition=0.3, answer="topk", top_k=3, buckets=(8,))
    ref.key = jax.random.key(0)
    assert ref.query("alice", x[:4]).labels.tolist() == reply["labels"]
    # each client sees its own records, without the ground truth; the administrator all of it
    mine = http.get("/v1/records", headers=_auth(alice)).json()["records"]
    assert [m["index"] for m in mine] == [0, 1, 2, 3] and "altered" not in mine[0]
    every = http.get("/v1/records", headers=_auth(admin)).json()["records"]
    assert [e["client"] for e in every] == ["alice"] * 4 + ["bob"] * 2
    assert {"true_label", "altered", "duplicate"} <= set(every[0])
    assert http.get("/v1/records?after=3", headers=_auth(bob)).json()["records"][0]["index"] == 4
    listed = http.get("/v1/clients", headers=_auth(admin)).json()["clients"]
    clients = {c["name"]: c for c in listed}
    assert clients["alice"]["budget"] == 20 and clients["bob"]["budget"] == 50
    assert clients["bob"]["duplicates"] == 1 and clients["bob"]["suspicious"]
    assert http.get("/healthz").json() == {"status": "ok", "queries": 6}
    assert "jaxmia_queries_total 6" in http.get("/metrics").text


@pytest.mark.parametrize(
    "case,status,message",
    [
        ("truncated", 400, "not a readable .npy array"),
        ("garbage png", 400, "not a readable image/png image"),
        ("not npy", 400, "lacks the .npy magic bytes"),
        ("wrong size", 400, "expected shape [batch, 16, 16, 1]"),
        ("wrong channels", 400, "expected shape [batch, 16, 16, 1]"),
        ("empty batch", 400, "expected at least one image"),
        ("out of range", 400, "expected values in [0, 1]"),
        ("integers", 400, "expected float or uint8 pixels"),
        ("oversized", 413, "request body"),
        ("too many images", 413, "expected at most 64"),
        ("content type", 415, "Content-Type 'text/plain'"),
        ("no key", 401, "missing API key"),
        ("wrong key", 401, "unknown API key"),
        ("budget", 429, "query budget 20 exceeded"),
        ("not admin", 403, "administrator"),
        ("taken name", 409, "already taken"),
        ("bad client json", 400, "expected JSON"),
    ],
)
def test_bad_requests_get_a_one_line_4xx_and_change_nothing(api, case, status, message):
    http, admin, db, _ = api
    key = http.post("/v1/clients", json={"name": "eve"}, headers=_auth(admin)).json()["key"]
    x = textured(2)
    assert _post(http, key, _npy(x)).status_code == 200
    before = db.count()
    body, headers, path = _npy(x), _auth(key), "/v1/query"
    ctype = "application/x-npy"
    if case == "truncated":
        body = body[:-20]
    elif case == "not npy":
        body = b"garbage"
    elif case == "garbage png":
        body, ctype = b"\x89PNG\r\n\x1a\n broken", "image/png"
    elif case == "wrong size":
        body = _npy(np.zeros((1, 8, 8, 1), np.float32))
    elif case == "wrong channels":
        body = _npy(np.zeros((1, 16, 16, 3), np.float32))
    elif case == "empty batch":
        body = _npy(np.zeros((0, 16, 16, 1), np.float32))
    elif case == "out of range":
        body = _npy(x * 3)
    elif case == "integers":
        body = _npy(np.zeros((1, 16, 16, 1), np.int64))
    elif case == "oversized":
        body = _npy(np.zeros((2000, 16, 16, 1), np.float32))
    elif case == "too many images":
        body = _npy(np.zeros((65, 16, 16, 1), np.float32))
    elif case == "content type":
        ctype = "text/plain"
    elif case == "no key":
        headers = {}
    elif case == "wrong key":
        headers = _auth("nope")
    elif case == "budget":
        body = _npy(textured(19))
    elif case == "not admin":
        path = "/v1/clients"
    if case == "taken name":
        r = http.post("/v1/clients", json={"name": "eve"}, headers=_auth(admin))
    elif case == "bad client json":
        r = http.post("/v1/clients", content=b"{name", headers=_auth(admin))
    elif path == "/v1/clients":
        r = http.get(path, headers=headers)
    else:
        r = http.post(path, content=body, headers=headers | {"Content-Type": ctype})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err and "\n" not in err
    assert db.count() == before
    # and the server goes on answering
    assert _post(http, key, _npy(textured(1, seed=5))).status_code == 200


def test_a_restart_with_another_policy_is_refused(tmp_path, recognizer):
    svc, db, _ = server.open_service(serve_config(), recognizer, tmp_path / "w")
    db.close()
    with pytest.raises(policy_lib.JaxmiaError, match="serve.json|other settings"):
        server.open_service(serve_config(misrecognition=0.5), recognizer, tmp_path / "w")


# -- a real server: concurrent clients, SIGKILL, restart, SIGTERM --------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(recognizer, workdir, port):
    env = dict(os.environ, XLA_FLAGS=xla_flags(), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxmia", "serve", "--checkpoint", str(recognizer),
         "--workdir", str(workdir), "--port", str(port), "--config.serve.detector=hash",
         "--config.serve.misrecognition=0.3", "--config.serve.buckets=(8,)",
         "--config.serve.budget=400", "--config.serve.shutdown_s=2",
         "--config.serve.body_timeout_s=120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert "listening on" in line, line + proc.stdout.read()
    return proc


@pytest.mark.slow
def test_killed_server_loses_no_answered_query_and_still_detects_old_duplicates(
    tmp_path, recognizer, monkeypatch
):
    """Then the cloning study runs against the restarted server (one start fewer)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    workdir = tmp_path / "serve"
    proc = _start(recognizer, workdir, port)
    admin = (workdir / "admin.key").read_text().strip()
    boss = client.Client(url, admin)
    keys = [boss.add_client(f"c{i}") for i in range(4)]
    answered = {i: [] for i in range(4)}
    x = textured(64, seed=9)
    stop = threading.Event()

    def load(i):
        c = client.Client(url, keys[i], timeout=10)
        for j in range(1000):
            if stop.is_set():
                break
            try:
                a = c.query(x[(j * 3) % 60 : (j * 3) % 60 + 3])
            except client.ServiceError:
                break
            answered[i].append(a.indices)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    got = np.concatenate([np.concatenate(a) for a in answered.values() if a])
    assert len(got) >= 12  # the load ran
    proc = _start(recognizer, workdir, port)
    try:
        boss = client.Client(url, admin)
        stored = {r["index"]: r for r in boss.records(limit=100_000)}
        assert set(got.tolist()) <= set(stored)  # every answered query survived the kill
        spent = {c["name"]: c["queries"] for c in boss.clients()}
        for i in range(4):
            n = sum(r["client"] == f"c{i}" for r in stored.values())
            assert spent[f"c{i}"] == n
        # a near-duplicate of a query from before the crash is still detected
        c0 = client.Client(url, keys[0])
        a = c0.query(near(x[:1], 7))
        last = boss.records(after=int(a.indices[0]) - 1)[0]
        assert last["duplicate"]
        _cloning_study_against(url, workdir / "admin.key", tmp_path / "study", monkeypatch)
        # SIGTERM: a clean stop, which a slow uploader delays by serve.shutdown_s at most
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(
            b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            + f"Authorization: Bearer {keys[1]}\r\n\r\n\x93NUMPY".encode()
        )
        time.sleep(0.3)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        slow.close()
        assert proc.returncode == 0 and "stopped" in out
        assert time.perf_counter() - t0 < 10  # 2 s for the uploader, not uvicorn's 30
    finally:
        if proc.poll() is None:
            proc.kill()


def _cloning_study_against(url, admin_key, workdir, monkeypatch):
    from attacks.test_cloning import TINY, tiny_faces

    from jaxmia.stages import clone as clone_lib

    tiny_faces(monkeypatch)
    cfg = config_lib.default_config()
    overrides = [
        *TINY, "--config.cloning.service_identities=6", f"--config.cloning.service={url}",
        f"--config.cloning.service_admin_key={admin_key}",
    ]  # fmt: skip
    config_lib.apply_overrides(cfg, overrides)
    table = clone_lib.run(cfg, workdir, plots=False)
    rows = {r["scenario"]: r for r in table["rows"]}
    assert set(rows) == {"plain", "estimate"}  # none and countermeasure's attackers
    for r in rows.values():
        assert r["p"] == 0.3 and r["detector"] == "hash"  # the server's policy
        assert 0 <= r["clone_accuracy"] <= 1 and 0 <= r["altered"] <= 1
    assert rows["estimate"]["queries"] == 30 and rows["plain"]["queries"] == 12
    # the ground truth came from the server's store: every query of the study is there
    boss = client.Client(url, admin_key.read_text().strip())
    mine = [r for r in boss.records(limit=100_000) if r["client"].startswith("clone-")]
    assert len(mine) == 42 and 0 < np.mean([r["altered"] for r in mine]) < 1


# -- hardening: one bad request must never stall, exhaust or expose the service -----------------


def _in_time(fn, seconds=20):
    """fn() run on a thread; its result, or a failure if it has not returned within seconds."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert "r" in out, f"no answer within {seconds} s"
    return out["r"]


def _client_key(http, admin, name):
    r = http.post("/v1/clients", json={"name": name}, headers=_auth(admin))
    assert r.status_code == 201, r.text
    return r.json()["key"]


def test_a_0d_array_or_a_failing_batch_never_stops_the_batcher(api, monkeypatch):
    http, admin, db, _ = api
    eve, bob = _client_key(http, admin, "eve"), _client_key(http, admin, "bob")
    r = _post(http, eve, _npy(np.float32(0.5)))  # 132 bytes
    assert r.status_code == 400 and "expected shape [batch, 16, 16, 1], got []" in r.json()["error"]
    # an unexpected failure of the recognizer's pass fails that batch only
    real = server.service_lib.Service.query_many
    calls = []

    def broken(self, requests):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(self, requests)

    monkeypatch.setattr(server.service_lib.Service, "query_many", broken)
    r = _in_time(lambda: _post(http, eve, _npy(textured(1))))
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}
    r = _in_time(lambda: _post(http, bob, _npy(textured(2, seed=4))))  # another client, later
    assert r.status_code == 200 and r.json()["indices"] == [0, 1]
    assert _in_time(lambda: _post(http, admin, _npy(textured(1, seed=6)))).status_code == 200
    assert http.get("/healthz").json() == {"status": "ok", "queries": 3}
    # were the batcher ever to stop, /healthz says so and queries fail at once
    batcher = http.app.app.state.batcher

    async def stop():
        batcher.task.cancel()
        await asyncio.sleep(0)

    http.portal.call(stop)
    r = http.get("/healthz")
    assert r.status_code == 503 and "batcher" in r.json()["status"]
    r = _in_time(lambda: _post(http, bob, _npy(textured(1))))
    assert r.status_code == 503 and "batcher" in r.json()["error"]


def _png_header(width, height, color_type=0):
    """A PNG that claims width x height 8-bit pixels (a bomb's header; a token IDAT)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9)) + chunk(b"IEND", b"")
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12_000, 20_000])
def test_an_image_of_another_size_is_refused_from_its_header(api, side):
    http, admin, db, _ = api
    t0 = time.perf_counter()
    r = _post(http, admin, _png_header(side, side), "image/png")
    assert r.status_code == 400, r.text
    assert "expected shape [batch, 16, 16, 1], got " in r.json()["error"]
    assert time.perf_counter() - t0 < 1.0  # nothing was decoded
    ok = io.BytesIO()
    from PIL import Image

    Image.fromarray((textured(1)[0, ..., 0] * 255).astype(np.uint8)).save(ok, format="PNG")
    assert _post(http, admin, ok.getvalue(), "image/png").status_code == 200


def test_a_slow_body_to_decode_never_blocks_another_clients_answer(api, monkeypatch):
    http, admin, db, _ = api
    real = server.decode_images

    def slow(*args):
        time.sleep(1.5)
        return real(*args)

    monkeypatch.setattr(server, "decode_images", slow)
    first = threading.Thread(target=lambda: _post(http, admin, _npy(textured(1))))
    first.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    assert http.get("/healthz").status_code == 200
    waited = time.perf_counter() - t0
    first.join()
    assert waited < 0.5, f"/healthz waited {waited:.2f} s for another request's decoding"


def test_an_over_count_uint8_batch_is_refused_before_it_is_converted(api):
    import tracemalloc

    http, admin, db, _ = api
    x = np.zeros((3500, *SHAPE), np.uint8)  # 0.9 MB; 3.6 MB as float32
    body = _npy(x)
    tracemalloc.start()
    try:
        r = _post(http, admin, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 413 and "3500 in one request, expected at most 64" in r.json()["error"]
    assert peak < x.size * 4, f"{peak / 1e6:.1f} MB held to refuse it: converted first"


def _asgi_call(http, method, path, messages, headers=()):
    """Runs one raw ASGI request on the app's loop: ``messages`` are what receive() returns in
    turn (then a disconnect). Returns (status, body)."""
    sent = []
    queue = list(messages)

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(k.encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip

    async def run():
        await http.app(scope, receive, send)

    http.portal.call(run)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize(
    "case,status,message",
    [
        ("npy claims 10^12 elements", 413, "expected at most 64"),
        ("npy header lies about its size", 400, "header claims"),
        ("budget 2^63", 400, "expected an integer in 0..2^62"),
        ("lone surrogate in a name", 400, "client name"),
        ("30000-deep JSON", 400, "expected JSON"),
        ("records after 2^64", 400, "expected -1..2^63-1"),
        ("client leaves mid-body", 400, "left before sending it all"),
        ("unknown path", 404, "Not Found"),
        ("wrong method", 405, "Method Not Allowed"),
    ],
)
def test_malformed_input_is_a_one_line_json_4xx_and_counted(api, case, status, message):
    http, admin, db, _ = api
    h = _auth(admin)
    one = _npy(np.zeros((1, *SHAPE), np.float32))
    if case == "npy claims 10^12 elements":
        r = _post(http, admin, one.replace(b"(1,", b"(1000000000000,"))
    elif case == "npy header lies about its size":
        r = _post(http, admin, one.replace(b"(1,", b"(9,"))
    elif case == "budget 2^63":
        r = http.post("/v1/clients", json={"name": "x", "budget": 2**63}, headers=h)
    elif case == "lone surrogate in a name":
        r = http.post("/v1/clients", content=b'{"name": "a\\ud800"}', headers=h)
    elif case == "30000-deep JSON":
        r = http.post("/v1/clients", content=b"[" * 30_000 + b"]" * 30_000, headers=h)
    elif case == "records after 2^64":
        r = http.get(f"/v1/records?after={2**64}", headers=h)
    elif case == "unknown path":
        r = http.get("/v1/nothing", headers=h)
    elif case == "wrong method":
        r = http.delete("/v1/query", headers=h)
    if case == "client leaves mid-body":
        code, text = _asgi_call(
            http, "POST", "/v1/query",
            [{"type": "http.request", "body": _npy(textured(2))[:100], "more_body": True}],
            [("authorization", f"Bearer {admin}"), ("content-type", "application/x-npy")],
        )  # fmt: skip
    else:
        code, text = r.status_code, r.content
    assert code == status, text
    err = json.loads(text)["error"]
    assert message in err and "\n" not in err
    path = {"unknown path": "other", "records after 2^64": "/v1/records"}.get(case)
    path = path or ("/v1/clients" if "JSON" in case or "name" in case or "budget" in case
                    else "/v1/query")  # fmt: skip
    assert (
        f'jaxmia_requests_total{{path="{path}",status="{status}"}} 1' in http.get("/metrics").text
    )
    assert db.count() == 0
    assert _post(http, admin, _npy(textured(1))).status_code == 200


def test_an_unexpected_error_is_a_json_500_counted_in_the_metrics(api, monkeypatch):
    http, admin, db, _ = api

    def broken(*a, **k):
        raise RuntimeError("the disk")

    monkeypatch.setattr(db, "records", broken)
    r = http.get("/v1/records", headers=_auth(admin))
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}
    assert 'jaxmia_requests_total{path="/v1/records",status="500"} 1' in http.get("/metrics").text


@pytest.fixture
def live(tmp_path, recognizer):
    """A uvicorn server of the app in this process (a thread) with short connection limits."""
    import uvicorn

    limits = server.Limits(
        max_connections=6, keep_alive_s=0.5, header_timeout_s=0.6, body_timeout_s=0.6,
        max_images=64,
    )  # fmt: skip
    svc, db, admin = server.open_service(serve_config(), recognizer, tmp_path / "serve")
    port = _free_port()
    srv = uvicorn.Server(server.uvicorn_config(server.create_app(svc, db, limits), limits,
                                               "127.0.0.1", port))  # fmt: skip
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", port, admin
    srv.should_exit = True
    thread.join(10)
    db.close()


def _closed_within(sock, seconds):
    """Whether the server closed the socket within seconds; (closed, bytes it sent)."""
    sock.settimeout(0.05)
    got, end = b"", time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not data:
            return True, got
        got += data
    return False, got


def test_slow_and_idle_connections_are_dropped_while_others_are_served(live):
    url, port, admin = live
    x = textured(1)
    honest = client.Client(url, admin, timeout=10)
    honest.query(x)  # compiled before the clock starts
    loris = socket.create_connection(("127.0.0.1", port))
    loris.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\n")
    slow_body = socket.create_connection(("127.0.0.1", port))
    slow_body.sendall(
        b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
        + f"Authorization: Bearer {admin}\r\n\r\n".encode()
    )
    t0 = time.perf_counter()
    for i in range(8):  # one header line / a few body bytes at a time, while others are served
        with contextlib.suppress(OSError):  # (a dropped socket: what is tested below)
            loris.sendall(f"X-{i}: y\r\n".encode())
        with contextlib.suppress(OSError):
            slow_body.sendall(b"\x93NUMPY"[: i % 6 + 1])
        assert honest.query(x).labels.shape == (1,)
        time.sleep(0.1)
    closed, _ = _closed_within(loris, 1.0)
    assert closed and time.perf_counter() - t0 < 2.5  # the head's deadline, 0.6 s, not forever
    closed, reply = _closed_within(slow_body, 1.0)
    assert closed and reply.startswith(b"HTTP/1.1 408")
    assert b'{"error":"request body: not received within 0.6 s"}' in reply
    # idle sockets fill the connection cap: more are refused with a JSON 503, then all dropped
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    time.sleep(0.1)
    extra = socket.create_connection(("127.0.0.1", port))
    closed, reply = _closed_within(extra, 1.0)
    assert closed and reply.startswith(b"HTTP/1.1 503") and b"too many open connections" in reply
    assert all(_closed_within(s, 1.5)[0] for s in idle)
    assert honest.query(x).labels.shape == (1,)  # a fresh connection is served again
    for s in (loris, slow_body, extra, *idle):
        s.close()
    honest.close()


def test_a_lost_or_empty_secret_or_key_is_refused(tmp_path, recognizer):
    cfg = serve_config(seed=-1)
    work = tmp_path / "serve"
    svc, db, admin = server.open_service(cfg, recognizer, work)
    svc.query("alice", textured(2))
    db.close()
    secret = (work / "secret.key").read_text()
    (work / "secret.key").unlink()
    with pytest.raises(policy_lib.JaxmiaError, match="secret.key: missing, and .* holds 2 queries"):
        server.open_service(cfg, recognizer, work)
    assert not (work / "secret.key").exists()  # not silently regenerated
    for name, text, match in [
        ("secret.key", "", "secret.key: empty"),
        ("secret.key", "not a number", "secret.key: expected an integer"),
        ("admin.key", "\n", "admin.key: empty"),
    ]:
        (work / "secret.key").write_text(secret)
        keep = (work / name).read_text()
        (work / name).write_text(text)
        with pytest.raises(policy_lib.JaxmiaError, match=match):
            server.open_service(cfg, recognizer, work)
        (work / name).write_text(keep)
    svc, db, again = server.open_service(cfg, recognizer, work)  # restored: it starts
    assert again == admin and svc.queries == 2
    db.close()


def test_the_workdir_and_the_store_are_private(tmp_path, recognizer):
    old = os.umask(0o022)
    try:
        svc, db, _ = server.open_service(serve_config(), recognizer, tmp_path / "serve")
        svc.query("alice", textured(2))
    finally:
        os.umask(old)
    work = tmp_path / "serve"
    assert work.stat().st_mode & 0o777 == 0o700
    for name in ("service.db", "service.db-wal", "admin.key"):
        assert (work / name).stat().st_mode & 0o777 == 0o600, name
    db.close()


def test_other_weights_at_the_same_path_and_step_are_refused(tmp_path, recognizer):
    import shutil

    other = tmp_path / "other"
    checkpoint.save_recognizer(
        other, models.init(CONFIG, jax.random.key(1))[1], CONFIG, [f"p{i}" for i in range(6)]
    )
    path = tmp_path / "rec"
    shutil.copytree(recognizer, path)
    _, db, _ = server.open_service(serve_config(), path, tmp_path / "w")
    db.close()
    shutil.rmtree(path)
    shutil.copytree(other, path)
    with pytest.raises(policy_lib.JaxmiaError, match="weights"):
        server.open_service(serve_config(), path, tmp_path / "w")


def test_a_client_sees_the_answers_form_not_the_defence(api):
    http, admin, db, _ = api
    eve = _client_key(http, admin, "eve")
    assert _post(http, eve, _npy(textured(2))).status_code == 200
    mine = http.get("/v1/policy", headers=_auth(eve)).json()
    assert mine == {
        "policy": {"answer": "topk", "top_k": 3, "budget": 20},
        "image_shape": [16, 16, 1],
        "classes": 6,
    }
    full = http.get("/v1/policy", headers=_auth(admin)).json()["policy"]
    assert full["misrecognition"] == 0.3 and full["detector"] == "hash"  # the study's view
    records = http.get("/v1/records", headers=_auth(eve)).json()["records"]
    assert [sorted(r) for r in records] == [["answer", "index", "time"]] * 2


class _FullDisk:
    """A store connection whose COMMITs fail as a full disk does (SQLite rolls back itself)
    from the ``after``-th on."""

    def __init__(self, db, after=0):
        self.db, self.commits, self.after = db, 0, after

    def __getattr__(self, name):
        return getattr(self.db, name)

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self.commits += 1
            if self.commits > self.after:
                self.db.execute("ROLLBACK")
                raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)


def test_a_request_is_charged_exactly_when_it_is_answered_when_the_store_fails(tmp_path):
    db = store.Store(tmp_path / "s.db")
    svc = make(db)
    db._db = _FullDisk(db._db, after=1)  # the second request's write fails
    x = textured(6)
    out = svc.query_many([("a", x[:2]), ("b", x[2:4]), ("a", x[4:5])])
    assert out[0].indices.tolist() == [0, 1]
    assert isinstance(out[1], store.StoreError) and "database or disk is full" in str(out[1])
    assert isinstance(out[2], store.StoreError)  # the disk stays full
    db._db = db._db.db
    assert db.count() == 2 and svc.queries == 2
    assert {n: c.queries for n, c in svc.clients.items()} == {"a": 2}
    assert svc.query("b", x[2:4]).indices.tolist() == [2, 3]  # the disk has room again
    db.close()


def test_a_full_disk_is_a_json_503_naming_it_and_charges_nothing(api, caplog):
    http, admin, db, _ = api
    eve = _client_key(http, admin, "eve")
    real = db._db
    db._db = _FullDisk(real)
    try:
        r = _post(http, eve, _npy(textured(2)))
    finally:
        db._db = real
    assert r.status_code == 503 and "database or disk is full" in r.json()["error"]
    assert "database or disk is full" in caplog.text and "cannot rollback" not in caplog.text
    assert db.count() == 0
    clients = {
        c["name"]: c for c in http.get("/v1/clients", headers=_auth(admin)).json()["clients"]
    }
    assert clients["eve"]["queries"] == 0
    assert _post(http, eve, _npy(textured(2))).json()["indices"] == [0, 1]


@pytest.mark.parametrize(
    "name,status,stored",
    [
        ("a\x00b", 400, None), ("a\nb", 400, None), ("\u202eevil", 400, None),
        ("\u0430dmin", 400, None), ("Admin", 409, None),
        ("\uff41\uff4c\uff49\uff43\uff45", 201, "alice"),
        ("a" * 129, 400, None), ("", 400, None), ("clone-1f2e-0", 201, "clone-1f2e-0"),
    ],
)  # fmt: skip
def test_client_names_are_normalised_and_refused_with_control_or_look_alike_characters(
    api, name, status, stored
):
    http, admin, db, _ = api
    r = http.post("/v1/clients", json={"name": name}, headers=_auth(admin))
    assert r.status_code == status, r.text
    if stored:
        assert r.json()["name"] == stored
        assert stored in {c["name"] for c in db.clients()}
    else:
        assert [c["name"] for c in db.clients()] == ["admin"]
