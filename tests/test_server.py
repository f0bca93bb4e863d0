"""The served recognition service: the store, the HTTP API, bad input, load, a killed server."""

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import xla_flags
from starlette.testclient import TestClient
from test_service import textured

from jaxmia import checkpoint, client, models, server, service, store
from jaxmia import config as config_lib

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
    return service.Service(
        GRAPHDEF, PARAMS, policy=service.Policy(**(POLICY | policy)), key=jax.random.key(3),
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
    for name in service.HISTORY_COLUMNS:
        np.testing.assert_array_equal(h[name], r[name], err_msg=name)
    assert {n: (c.queries, c.duplicates) for n, c in again.clients.items()} == {
        n: (c.queries, c.duplicates) for n, c in ref.clients.items()
    }


def test_a_refused_request_in_a_batch_changes_nothing_and_others_are_answered():
    svc = make(budget=5)
    x = textured(8)
    out = svc.query_many([("a", x[:3]), ("a", x[3:6]), ("b", x[:2, :8]), ("b", x[6:8])])
    assert isinstance(out[1], service.BudgetError) and "budget 5 exceeded" in str(out[1])
    assert isinstance(out[2], service.JaxmiaError) and "expected shape" in str(out[2])
    assert out[0].indices.tolist() == [0, 1, 2] and out[3].indices.tolist() == [3, 4]
    assert svc.clients["a"].queries == 3 and svc.queries == 5


def test_rounded_probabilities():
    x = textured(4)
    exact = make(misrecognition=0.0, answer="probs").query("a", x).probabilities
    got = make(misrecognition=0.0, answer="probs", decimals=2).query("a", x).probabilities
    np.testing.assert_allclose(got, np.round(exact, 2), atol=1e-7)
    assert len(np.unique(got)) < len(np.unique(exact))
    with pytest.raises(service.JaxmiaError, match="service policy decimals: expected 0..8"):
        service.Policy(decimals=9)


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
    with pytest.raises(service.JaxmiaError, match="serve.json|other settings"):
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
         "--config.serve.budget=400"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert "listening on" in line, line + proc.stdout.read()
    return proc


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
        # SIGTERM: a clean stop
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def _cloning_study_against(url, admin_key, workdir, monkeypatch):
    from test_cloning import TINY, tiny_faces

    from jaxmia import cloning_study

    tiny_faces(monkeypatch)
    cfg = config_lib.default_config()
    overrides = [
        *TINY, "--config.cloning.service_identities=6", f"--config.cloning.service={url}",
        f"--config.cloning.service_admin_key={admin_key}",
    ]  # fmt: skip
    config_lib.apply_overrides(cfg, overrides)
    table = cloning_study.run(cfg, workdir, plots=False)
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
