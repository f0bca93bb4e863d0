"""Near-duplicate history search speed: queries/s against 1e4, 1e5, 1e6 stored 64-bit hashes.

    python benchmarks/dedup_search.py [--out benchmarks/results/dedup_search.json]

Stored hashes are uniform random 64-bit values; half the queries are a stored hash with up to
``radius`` bits flipped (found), half random (not found). Each configuration is checked against
brute force on a sample of the queries. Memory is the index's bytes per stored hash after the
buffer has been merged. Brute force (numpy popcount of every stored hash) is timed for reference.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from jaxmia import files
from jaxmia.service import dedup

SIZES = (10_000, 100_000, 1_000_000)
CONFIGS = ((4, 2), (5, 2), (3, 2), (7, 4))  # (radius, chunks); (4, 2) is the service default
QUERIES = 5_000


def queries_for(stored: np.ndarray, radius: int, rng: np.random.Generator) -> np.ndarray:
    q = rng.integers(0, 2**64 - 1, QUERIES, dtype=np.uint64, endpoint=True)
    near = stored[rng.integers(0, len(stored), QUERIES // 2)]
    for i in range(len(near)):
        for b in rng.choice(64, rng.integers(0, radius + 1), replace=False):
            near[i] ^= np.uint64(1) << np.uint64(b)
    q[: len(near)] = near
    return q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/dedup_search.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in SIZES:
        stored = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        t0 = time.perf_counter()
        sample = stored[None, :]
        probe = rng.integers(0, 2**64 - 1, 20, dtype=np.uint64, endpoint=True)
        for q in probe:
            np.bitwise_count(np.bitwise_xor(sample, q)).min()
        brute_qps = len(probe) / (time.perf_counter() - t0)
        for radius, chunks in CONFIGS:
            index = dedup.HashIndex(radius, chunks=chunks, buffer_size=n)
            t0 = time.perf_counter()
            index.add(stored)
            build_s = time.perf_counter() - t0
            queries = queries_for(stored, radius, rng)
            index.search(queries[:100])  # warm up
            t0 = time.perf_counter()
            for batch in np.array_split(queries, 5):  # the service searches batch by batch
                dist, _ = index.search(batch)
            search_s = time.perf_counter() - t0
            check = queries[:: QUERIES // 50]
            want = dedup.brute_force_search(check, stored, radius)
            got = index.search(check)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
            row = {
                "stored": n,
                "radius": radius,
                "chunks": chunks,
                "queries_per_s": QUERIES / search_s,
                "bytes_per_stored": index.nbytes / n,
                "build_s": build_s,
                "brute_force_queries_per_s": brute_qps,
            }
            rows.append(row)
            print(
                f"n={n:>9,} r={radius} m={chunks}: {row['queries_per_s']:>9,.0f} queries/s "
                f"({row['bytes_per_stored']:.0f} B/hash, build {build_s:.2f}s); "
                f"brute force {brute_qps:,.0f} queries/s",
                flush=True,
            )
    files.write_json(
        args.out,
        {
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor(),
                "python": platform.python_version(),
            },
            "queries": QUERIES,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
