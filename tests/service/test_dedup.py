"""Perceptual hash, the multi-index Hamming search (vs brute force) and the embedding index."""

import itertools

import jax
import numpy as np
import pytest

from jaxmia.errors import JaxmiaError
from jaxmia.service import dedup


def smooth_images(n, seed, size=32):
    """Different images: random low-frequency patterns in [0, 1]. # [n, size, size, 1]"""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, np.pi, size)
    out = np.zeros((n, size, size))
    for u, v in itertools.product(range(12), repeat=2):
        basis = np.cos(u * grid)[:, None] * np.cos(v * grid)[None, :]
        out += rng.normal(size=(n, 1, 1)) * basis / (1 + u + v)
    out = (out - out.min(axis=(1, 2), keepdims=True)) / np.ptp(out, axis=(1, 2), keepdims=True)
    return out[..., None].astype(np.float32)


def test_dct_matches_reference_formula():
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype(np.float32)
    got = np.asarray(dedup.dct_coefficients(x))
    n = np.arange(32)
    want = []
    for k, j in zip(dedup._ROWS, dedup._COLS, strict=True):
        ck = np.sqrt((1 if k == 0 else 2) / 32) * np.cos(np.pi * (2 * n + 1) * k / 64)
        cl = np.sqrt((1 if j == 0 else 2) / 32) * np.cos(np.pi * (2 * n + 1) * j / 64)
        want.append(np.einsum("i,bij,j->b", ck, x[..., 0], cl))
    np.testing.assert_allclose(got, np.stack(want, 1), atol=1e-4)
    assert (dedup._ROWS + dedup._COLS).max() <= 10 and 0 not in dedup._ROWS + dedup._COLS


def test_hash_bits_are_the_median_threshold_and_jit_equals_eager():
    x = smooth_images(4, 1)
    coeffs = np.asarray(dedup.dct_coefficients(x))
    bits = coeffs > np.median(coeffs, axis=1, keepdims=True)
    want = (bits.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(1, dtype=np.uint64)
    np.testing.assert_array_equal(dedup.dct_hash(x), want)
    with jax.disable_jit():
        eager = dedup.words_to_uint64(np.asarray(dedup.hash_words(x)))
    np.testing.assert_array_equal(eager, want)
    assert all(bin(int(h)).count("1") == 32 for h in want)  # median split: half the bits set


def test_hash_ignores_brightness_and_contrast_and_resizes_any_input():
    x = smooth_images(8, 2) * 0.8 + 0.1
    h = dedup.dct_hash(x)
    np.testing.assert_array_equal(dedup.dct_hash(x + 0.05), h)
    assert (dedup.hamming(dedup.dct_hash(0.5 + (x - 0.5) * 0.7), h) <= 1).all()
    rgb = np.repeat(x, 3, axis=-1)
    np.testing.assert_array_equal(dedup.dct_hash(rgb), h)
    assert dedup.dct_hash(np.zeros((3, 40, 24, 1), np.float32)).shape == (3,)


def test_detector_flags_copies_and_light_alterations_and_passes_different_images():
    x = smooth_images(64, 3)
    h = dedup.dct_hash(x)
    noisy = np.clip(x + np.random.default_rng(4).normal(0, 0.01, x.shape), 0, 1).astype(np.float32)
    brighter = np.clip(x + 0.03, 0, 1)
    index = dedup.HashIndex(radius=8)
    index.add(h)
    for copy in (x, noisy, brighter):
        dist, match = index.search(dedup.dct_hash(copy))
        assert (dist != dedup.NO_MATCH).mean() >= 0.95
        assert (match[dist != dedup.NO_MATCH] == h[dist != dedup.NO_MATCH]).mean() >= 0.95
    dist, _ = index.search(dedup.dct_hash(smooth_images(64, 5)))
    assert (dist == dedup.NO_MATCH).mean() >= 0.95


def planted(n_stored, n_queries, seed):
    """Random stored hashes and queries, half of them a few bit flips from a stored one."""
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 2**63, n_stored, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, n_stored, dtype=np.uint64
    )
    stored[:3] = [np.uint64(2**64 - 1), np.uint64(0), np.uint64(0xFFFF) << np.uint64(48)]
    queries = rng.integers(0, 2**63, n_queries, dtype=np.uint64)
    for i in range(0, n_queries, 2):
        flips = rng.choice(64, rng.integers(0, 10), replace=False)
        queries[i] = stored[rng.integers(n_stored)] ^ np.uint64(sum(1 << int(b) for b in flips))
    queries[1] = np.uint64(2**64 - 2)  # near the all-ones hash: probes the top chunk value
    return stored, queries


@pytest.mark.parametrize(
    ("radius", "chunks"), [(0, 1), (2, 1), (0, 2), (3, 2), (5, 2), (8, 4), (11, 4), (7, 8), (15, 8)]
)
def test_hash_index_equals_brute_force(radius, chunks):
    stored, queries = planted(3000, 400, seed=radius * 10 + chunks)
    index = dedup.HashIndex(radius, chunks=chunks, buffer_size=1000)
    for part in np.array_split(stored, 5):  # some merged into the tables, some still buffered
        index.add(part)
    assert len(index) == len(stored) and index._buffered > 0
    want = dedup.brute_force_search(queries, stored, radius)
    got = index.search(queries)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert (want[0] != dedup.NO_MATCH).sum() > 10
    np.testing.assert_array_equal(index.stored(), np.unique(stored))


def test_hash_index_memory_is_8_bytes_per_chunk_table():
    index = dedup.HashIndex(4, chunks=2, buffer_size=100)
    index.add(np.arange(1000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    assert index._buffered == 0 and index.nbytes == 1000 * 16


def test_hash_index_empty_and_bad_arguments():
    dist, match = dedup.HashIndex(4).search(np.array([1, 2], np.uint64))
    np.testing.assert_array_equal(dist, [-1, -1])
    for radius, chunks in [(-1, 2), (65, 2), (4, 3), (12, 1)]:
        with pytest.raises(JaxmiaError, match="hash"):
            dedup.HashIndex(radius, chunks)


def test_embedding_index_is_nearest_cosine_above_threshold():
    rng = np.random.default_rng(0)
    stored = rng.normal(size=(50, 16))
    index = dedup.EmbeddingIndex(0.9)
    index.add(stored[:20])
    index.add(stored[20:])
    queries = np.concatenate(
        [stored[:5] * 3 + rng.normal(0, 0.01, (5, 16)), rng.normal(size=(5, 16))]
    )
    sim, ids = index.search(queries)
    np.testing.assert_array_equal(ids[:5], np.arange(5))
    want = dedup.normalise(queries) @ dedup.normalise(stored).T
    np.testing.assert_allclose(sim, want.max(1), atol=2e-3)
    assert (ids[5:] == dedup.NO_MATCH).all()
    with pytest.raises(JaxmiaError, match="cosine"):
        dedup.EmbeddingIndex(1.5)
