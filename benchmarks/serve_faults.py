"""The served recognition service under attack and under kill -9: honest latency and losses.

    python benchmarks/serve_faults.py [--seconds 8] [--clients 4] [--rounds 3]
        [--out benchmarks/results/serve_faults.json]

A ``jaxmia serve`` process on 127.0.0.1 (a small CNN at 32x32x1, 10 identities, random weights;
the hash detector and misrecognition p 0.3, so every answer also searches the near-duplicate
index and is written to the store). N honest client threads send batches of 4 fresh images back
to back for ``--seconds``, first alone, then while an attacker runs at full rate:
- decompression bombs: a 12000x12000 PNG (about 140 KB of zlib) and a header claiming
  20000x20000, as image/png queries;
- 0-d .npy arrays (132 bytes) and .npy headers claiming 10^12 images;
- idle sockets (more than ``serve.max_connections``, reopened as they are dropped) and
  slowloris sockets sending a header byte every 0.5 s.
Reported: the honest clients' images/s and p50/p99 latency with and without the attacker, the
attacker's answers by status code (each must be JSON), /healthz's latency under attack and
the server's resident memory. Then ``--rounds`` kill -9 rounds: the honest load runs, the
server is SIGKILLed mid-load and restarted, and every query a client was answered must be in
the store (the answered-but-lost count must be 0).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from jaxmia import checkpoint, files
from jaxmia.recognizers import models
from jaxmia.service import client

SHAPE = (32, 32, 1)
BATCH = 4
FLAGS = ["--config.serve.detector=hash", "--config.serve.misrecognition=0.3",
         "--config.serve.buckets=(8,64)", "--config.serve.max_connections=256",
         "--config.serve.header_timeout_s=2", "--config.serve.body_timeout_s=5"]  # fmt: skip


def _recognizer(path: Path) -> None:
    config = models.ModelConfig(
        num_classes=10, image_size=SHAPE[:2], channels=1, conv_features=(8, 16),
        kernel_sizes=(3, 3), dense_features=(64,),
    )  # fmt: skip
    _, params = models.init(config, jax.random.key(0))
    checkpoint.save_recognizer(path, params, config, [f"p{i}" for i in range(10)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(rec: Path, workdir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxmia", "serve", "--checkpoint", str(rec), "--workdir",
         str(workdir), "--port", str(port), *FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise SystemExit(line + proc.stdout.read())
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain its log
    return proc


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bomb(side: int) -> bytes:
    """A real side x side black grayscale PNG, compressed row by row."""
    z, row = zlib.compressobj(9), b"\0" * (side + 1)
    return _png(side, side, b"".join(z.compress(row) for _ in range(side)) + z.flush())


def _npy(x) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _honest(url: str, keys: list[str], seconds: float, answered: list | None = None) -> dict:
    """N clients at full rate for ``seconds``: images/s, p50/p99 ms (and answered indices)."""
    latencies: list[list[float]] = [[] for _ in keys]
    start = threading.Barrier(len(keys) + 1)

    def worker(i: int) -> None:
        x = np.random.default_rng(i).random((64, BATCH, *SHAPE), dtype=np.float32)
        with client.Client(url, keys[i], timeout=30) as c:
            start.wait()
            end, j = time.perf_counter() + seconds, 0
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    a = c.query(x[j % 64])
                except client.ServiceError as e:
                    if e.status == 503:  # busy: no connection free; a client retries
                        continue
                    break  # the server was killed
                latencies[i].append(time.perf_counter() - t0)
                if answered is not None:
                    answered.append(a.indices)
                j += 1

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
        "images_per_s": len(lat) * BATCH / wall,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "requests": int(len(lat)),
    }


def _attacker(url: str, port: int, key: str, stop: threading.Event, idle: int) -> tuple:
    """Threads sending bombs, 0-d arrays and lying .npy headers, and holding idle and
    slowloris sockets, until ``stop``; (threads, tally of status codes, non-JSON answers)."""
    import httpx

    tally: dict[str, int] = {}
    bad: list[str] = []
    lock = threading.Lock()
    big = _bomb(12_000)
    huge = _png(20_000, 20_000, zlib.compress(b"\0" * 4096))
    lying = _npy(np.zeros((1, *SHAPE), np.float32)).replace(b"(1,", b"(1000000000000,")
    bodies = [(big, "image/png"), (huge, "image/png"), (_npy(np.float32(0.5)), "application/x-npy"),
              (lying, "application/x-npy")]  # fmt: skip

    def send() -> None:
        with httpx.Client(base_url=url, timeout=30) as h:
            j = 0
            while not stop.is_set():
                body, ctype = bodies[j % len(bodies)]
                j += 1
                try:
                    headers = {"Authorization": f"Bearer {key}", "Content-Type": ctype}
                    r = h.post("/v1/query", content=body, headers=headers)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                else:
                    code = str(r.status_code)
                    try:
                        r.json()["error"]
                    except (ValueError, KeyError, TypeError):
                        bad.append(f"{code}: {r.text[:80]}")
                with lock:
                    tally[code] = tally.get(code, 0) + 1

    def sockets(slow: bool) -> None:
        held: list[socket.socket] = []
        while not stop.is_set():
            while len(held) < (8 if slow else idle):
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=2)
                except OSError:
                    break
                s.setblocking(False)
                if slow:
                    s.send(b"POST /v1/query HTTP/1.1\r\n")
                held.append(s)
            alive = []
            for s in held:
                try:
                    if slow:
                        s.send(b"X")
                    elif s.recv(4096) == b"":  # dropped by the server
                        s.close()
                        continue
                    alive.append(s)
                except BlockingIOError:
                    alive.append(s)
                except OSError:
                    s.close()
            held = alive
            stop.wait(0.5)
        for s in held:
            s.close()

    threads = [threading.Thread(target=send) for _ in range(2)]
    threads += [threading.Thread(target=sockets, args=(slow,)) for slow in (False, True)]
    for t in threads:
        t.start()
    return threads, tally, bad


def _health_ms(url: str, n: int = 20) -> float:
    import httpx

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        httpx.get(f"{url}/healthz", timeout=30).raise_for_status()
        out.append(time.perf_counter() - t0)
        time.sleep(0.05)
    return float(np.percentile(np.asarray(out) * 1000, 99))


def _attack_main(url: str, key: str, idle: int, seconds: float) -> None:
    """The attacker's process: attacks for ``seconds``, prints [tally, non-JSON answers]."""
    stop = threading.Event()
    threads, tally, bad = _attacker(url, int(url.rsplit(":", 1)[1]), key, stop, idle)
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    print(json.dumps([tally, bad]))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--attack":
        _attack_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--idle", type=int, default=200, help="idle sockets the attacker holds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/serve_faults.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rec, work = Path(tmp) / "rec", Path(tmp) / "serve"
        _recognizer(rec)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start(rec, work, port)
        admin_key = (work / "admin.key").read_text().strip()
        admin = client.Client(url, admin_key)
        keys = [admin.add_client(f"honest{i}") for i in range(args.clients)]
        attacker_key = admin.add_client("attacker")
        _honest(url, keys, 1.0)  # warm: connections, both buckets
        rss0 = _rss_mb(proc.pid)
        health0 = _health_ms(url)
        alone = _honest(url, keys, args.seconds)
        print(f"alone:        {alone}", flush=True)
        # The attacker is another process (as it would be another machine): its threads do not
        # take the honest clients' interpreter lock.
        attack = subprocess.Popen(
            [sys.executable, __file__, "--attack", url, attacker_key, str(args.idle),
             str(args.seconds + 3)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)  # the attack under way
        attacked = _honest(url, keys, args.seconds)
        health = _health_ms(url)
        rss1 = _rss_mb(proc.pid)
        out, _ = attack.communicate(timeout=120)
        tally, bad = json.loads(out.strip().splitlines()[-1])
        print(f"under attack: {attacked}; attacker's answers {tally}; healthz p99 {health:.1f} "
              f"ms; rss {rss0:.0f} -> {rss1:.0f} MB", flush=True)  # fmt: skip
        rounds = []
        for r in range(args.rounds):
            answered: list = []
            load = threading.Thread(target=_honest, args=(url, keys, 30.0, answered))
            load.start()
            time.sleep(3.0)
            proc.kill()  # kill -9 mid-load
            proc.wait()
            load.join()
            proc = _start(rec, work, port)
            stored = set()
            with client.Client(url, admin_key) as boss:
                after = -1
                while page := boss.records(after=after, limit=100_000):
                    stored |= {row["index"] for row in page}
                    after = page[-1]["index"]
            got = np.concatenate(answered) if answered else np.zeros(0, int)
            lost = int(len(set(got.tolist()) - stored))
            rounds.append({"answered": int(len(got)), "stored_total": len(stored), "lost": lost})
            print(f"kill -9 round {r + 1}: {rounds[-1]}", flush=True)
        proc.terminate()
        proc.wait(60)
    result = {
        "command": "python benchmarks/serve_faults.py " + " ".join(sys.argv[1:]),
        "honest_clients": args.clients,
        "batch": BATCH,
        "seconds": args.seconds,
        "alone": alone,
        "under_attack": attacked,
        "throughput_ratio": attacked["images_per_s"] / alone["images_per_s"],
        "attacker_answers": dict(sorted(tally.items())),
        "attacker_non_json_answers": bad[:20],
        "healthz_p99_ms": {"alone": health0, "under_attack": health},
        "server_rss_mb": {"before_attack": rss0, "after_attack": rss1},
        "kill9_rounds": rounds,
        "answered_but_lost": sum(r["lost"] for r in rounds),
        "server_flags": FLAGS,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    files.write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("throughput_ratio", "answered_but_lost")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
