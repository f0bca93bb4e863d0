"""The served recognition service under load: queries/s and latency against clients and batch.

    python benchmarks/serve_load.py [--seconds 8] [--out benchmarks/results/serve_load.json]

A ``jaxmia serve`` process (the paper CNN at 64x64x1, 40 identities, random weights: the speed
does not depend on them; the hash detector and misrecognition p 0.3, so every request also
searches and grows the near-duplicate index and is written to the store) on localhost; N client
threads each send batches of B images back to back for ``--seconds``. Reported per (N, B):
images answered per second, and p50/p99 request latency. The peer, in the same run on the
same machine: the in-process ``Service.query`` of the same policy, sequential (no HTTP, no
store), the ceiling the server approaches. Then the store at scale: 10^6 stored queries
written in one go, the time a restarted service takes to rebuild its accounts and
near-duplicate index from them, and the search speed against them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np

from jaxmia import checkpoint, files
from jaxmia.recognizers import models
from jaxmia.service import client, dedup, store
from jaxmia.service import policy as policy_lib

SHAPE = (64, 64, 1)
POLICY = dict(detector="hash", misrecognition=0.3, buckets=(8, 64, 256))


def _recognizer(path: Path) -> tuple:
    config = models.ModelConfig(num_classes=40, image_size=SHAPE[:2], channels=1)
    graphdef, params = models.init(config, jax.random.key(0))
    checkpoint.save_recognizer(path, params, config, [f"p{i}" for i in range(40)])
    return graphdef, params


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(url: str, keys: list[str], batch: int, seconds: float) -> dict:
    rng = np.random.default_rng(0)
    latencies: list[list[float]] = [[] for _ in keys]
    images = [0] * len(keys)
    start = threading.Barrier(len(keys) + 1)

    def worker(i: int) -> None:
        c = client.Client(url, keys[i])
        x = rng.random((64, batch, *SHAPE), dtype=np.float32)  # fresh images: no duplicates
        start.wait()
        end = time.perf_counter() + seconds
        j = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            c.query(x[j % 64])
            latencies[i].append(time.perf_counter() - t0)
            images[i] += batch
            j += 1
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(v) for v in latencies]) * 1000
    return {
        "images_per_s": sum(images) / wall,
        "requests_per_s": len(lat) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests": int(len(lat)),
    }


def _in_process(graphdef, params, batch: int, seconds: float) -> float:
    svc = policy_lib.Service(
        graphdef, params, policy=policy_lib.Policy(**POLICY), key=jax.random.key(1),
        image_shape=SHAPE,
    )  # fmt: skip
    x = np.random.default_rng(1).random((64, batch, *SHAPE), dtype=np.float32)
    svc.warm_up()
    svc.query("warm", x[0])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        svc.query("a", x[n % 64])
        n += 1
    return n * batch / (time.perf_counter() - t0)


def _store_at_scale(graphdef, params, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        db = store.Store(Path(tmp) / "s.db")
        rng = np.random.default_rng(2)
        hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
        t0 = time.perf_counter()
        for c, part in enumerate(np.array_split(np.arange(n), 100)):
            rows = {
                "idx": part, "hash": hashes[part], "token": hashes[part],
                "true_label": np.zeros(len(part), int), "answer": np.zeros(len(part), int),
                "altered": np.zeros(len(part), bool), "duplicate": np.zeros(len(part), bool),
            }  # fmt: skip
            db.append(f"client{c}", c, rows, None)
        write = time.perf_counter() - t0
        db.close()
        size = (Path(tmp) / "s.db").stat().st_size  # the WAL is merged into it on close
        t0 = time.perf_counter()
        svc = policy_lib.Service(
            graphdef, params, policy=policy_lib.Policy(**POLICY, scope="global"),
            key=jax.random.key(1), image_shape=SHAPE, store=store.Store(Path(tmp) / "s.db"),
        )  # fmt: skip
        rebuild = time.perf_counter() - t0
        index = svc._indexes[""]
        flips = np.uint64(1) << rng.integers(0, 64, (10_000, 3)).astype(np.uint64)
        probe = hashes[rng.integers(0, n, 10_000)] ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]
        t0 = time.perf_counter()
        dist, _ = index.search(probe)
        search = len(probe) / (time.perf_counter() - t0)
        assert (dist != dedup.NO_MATCH).all()  # 3 flipped bits of a stored hash: found
        svc.store.close()
    return {
        "stored_queries": n,
        "write_s": write,
        "bytes_per_query": size / n,
        "restart_rebuild_s": rebuild,
        "search_queries_per_s": search,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        graphdef, params = _recognizer(Path(tmp) / "rec")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxmia", "serve", "--checkpoint", str(Path(tmp) / "rec"),
             "--workdir", str(Path(tmp) / "serve"), "--port", str(port),
             "--config.serve.detector=hash", "--config.serve.misrecognition=0.3",
             "--config.serve.max_images=4096"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(line + proc.stdout.read())
        admin = client.Client(url, (Path(tmp) / "serve" / "admin.key").read_text().strip())
        rows = []
        try:
            for b in batches:
                peer = _in_process(graphdef, params, b, args.seconds)
                for n in clients:
                    keys = [admin.add_client(f"n{n}-b{b}-{i}") for i in range(n)]
                    _load(url, keys, b, 1.0)  # warm: connections, the buckets' first calls
                    keys = [admin.add_client(f"n{n}-b{b}-{i}-m") for i in range(n)]
                    r = {"clients": n, "batch": b, **_load(url, keys, b, args.seconds)}
                    r["in_process_images_per_s"] = peer
                    rows.append(r)
                    print(
                        f"clients {n:3d} batch {b:3d}: {r['images_per_s']:8.1f} images/s "
                        f"({r['requests_per_s']:7.1f} requests/s), p50 {r['p50_ms']:7.1f} ms, "
                        f"p99 {r['p99_ms']:7.1f} ms; in process {peer:8.1f} images/s",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait(60)
    at_scale = _store_at_scale(graphdef, params, args.stored)
    print(json.dumps(at_scale, indent=1))
    files.write_json(
        args.out,
        {
            "rows": rows,
            "store": at_scale,
            "seconds": args.seconds,
            "policy": POLICY,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "jax_backend": jax.default_backend(),
            },
        },  # fmt: skip
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
