"""Near-duplicate detection: a 64-bit DCT perceptual hash in JAX and a fast Hamming-radius search.

The hash (pHash-style): grey image -> 32x32 -> 2D DCT-II -> the 64 lowest-frequency coefficients
after the DC term in zigzag order -> one bit each, set where the coefficient exceeds their median.
Brightness shifts move only the DC term and contrast scales all coefficients alike, so neither
changes the hash; small shifts, crops, noise and JPEG-like quantisation change a few bits.

``HashIndex`` answers "which stored hash is nearest within Hamming radius r" by multi-index hashing
(Norouzi et al.): split the 64 bits into m chunks; a hash within r of the query agrees with it to
within floor(r / m) bits on at least one chunk (pigeonhole). Table j holds every stored hash
rotated so chunk j is on top, sorted; the candidates of one chunk value are one ``searchsorted``
range, verified by popcount. The tables store the hashes themselves, no ids: 8 * m bytes per
stored query (16 with the default m = 2). New hashes wait in a small buffer that is searched by
brute force and merged into the tables when it fills.

``EmbeddingIndex`` is the embedding mode: L2-normalised penultimate features, nearest by cosine.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmia.errors import JaxmiaError

HASH_BITS = 64
HASH_SIZE = 32  # the image is resized to HASH_SIZE x HASH_SIZE before the DCT
NO_MATCH = -1
MAX_PROBES = 100_000


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: coefficients = D @ signal. # [n, n]"""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d.astype(np.float32)


def _zigzag_low(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the ``count`` lowest frequencies after DC, by (i + j, i)."""
    cells = sorted(itertools.product(range(HASH_SIZE), repeat=2), key=lambda c: (c[0] + c[1], c[0]))
    cells = cells[1 : count + 1]
    return np.array([c[0] for c in cells]), np.array([c[1] for c in cells])


_DCT = _dct_matrix(HASH_SIZE)
_ROWS, _COLS = _zigzag_low(HASH_BITS)


def dct_coefficients(images: jax.Array) -> jax.Array:
    """The 64 low-frequency DCT coefficients the hash thresholds. # [b, h, w, c] -> [b, 64]"""
    grey = images.mean(axis=-1)  # [b, h, w]
    small = jax.image.resize(grey, (grey.shape[0], HASH_SIZE, HASH_SIZE), "linear", antialias=True)
    d = jnp.asarray(_DCT)
    coeffs = jnp.einsum("ki,bij,lj->bkl", d, small, d)  # [b, 32, 32]
    return coeffs[:, _ROWS, _COLS]


@jax.jit
def hash_words(images: jax.Array) -> jax.Array:
    """DCT hashes as two uint32 words (low bits first). # [b, h, w, c] -> [b, 2]"""
    coeffs = dct_coefficients(images)  # [b, 64]
    bits = coeffs > jnp.median(coeffs, axis=-1, keepdims=True)  # [b, 64]
    weights = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32))  # [32]
    words = (bits.reshape(-1, 2, 32).astype(jnp.uint32) * weights).sum(-1, dtype=jnp.uint32)
    return words  # [b, 2]


def words_to_uint64(words: np.ndarray) -> np.ndarray:
    """Packs [b, 2] uint32 words (low first) into uint64 hashes. # [b]"""
    words = np.asarray(words, np.uint64)
    return words[:, 0] | (words[:, 1] << np.uint64(32))


def dct_hash(images: np.ndarray | jax.Array) -> np.ndarray:
    """64-bit perceptual hashes of a batch of images in [0, 1]. # [b, h, w, c] -> uint64 [b]"""
    return words_to_uint64(np.asarray(hash_words(jnp.asarray(images, jnp.float32))))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int32)


def brute_force_search(
    queries: np.ndarray, stored: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference search: nearest stored hash within radius, by full popcount.

    Returns:
      (distance, hash): the nearest stored hash's distance (NO_MATCH if none within radius) and
      the hash (0 if none). Ties go to the smallest hash value. # [q], [q]
    """
    queries = np.asarray(queries, np.uint64)
    stored = np.unique(np.asarray(stored, np.uint64))
    dist = np.full(len(queries), NO_MATCH, np.int32)
    match = np.zeros(len(queries), np.uint64)
    if len(stored) == 0 or len(queries) == 0:
        return dist, match
    d = hamming(queries[:, None], stored[None, :])  # [q, n]
    best = d.argmin(axis=1)
    best_d = d[np.arange(len(queries)), best]
    ok = best_d <= radius
    dist[ok] = best_d[ok]
    match[ok] = stored[best[ok]]
    return dist, match


def _rotl(x: np.ndarray, s: int) -> np.ndarray:
    s = s % 64
    if s == 0:
        return x
    return (x << np.uint64(s)) | (x >> np.uint64(64 - s))


@functools.cache
def _flip_masks(width: int, max_bits: int) -> np.ndarray:
    """Every bit pattern of ``width`` bits with at most ``max_bits`` bits set. # [p] uint64"""
    masks = [0]
    for k in range(1, max_bits + 1):
        for bits in itertools.combinations(range(width), k):
            masks.append(sum(1 << b for b in bits))
    return np.array(masks, np.uint64)


class HashIndex:
    """Nearest stored 64-bit hash within a Hamming radius, by multi-index hashing.

    Args:
      radius: the Hamming radius of a match (0..64).
      chunks: m, the number of chunk tables (1, 2, 4 or 8). Memory is 8 * m bytes per stored
        hash; each query probes m * sum_{i <= floor(radius / m)} C(64 / m, i) chunk values.
      buffer_size: hashes added since the last merge are searched by brute force; the tables are
        rebuilt when this many are waiting.
    """

    def __init__(self, radius: int, chunks: int = 2, buffer_size: int = 4096):
        if not 0 <= radius <= HASH_BITS:
            raise JaxmiaError(f"hash radius: expected 0..64, got {radius}")
        if chunks not in (1, 2, 4, 8):
            raise JaxmiaError(f"hash index chunks: expected 1, 2, 4 or 8, got {chunks}")
        self.radius = int(radius)
        self.chunks = chunks
        self.width = HASH_BITS // chunks
        self.buffer_size = buffer_size
        self._tables = [
            np.zeros(0, np.uint64) for _ in range(chunks)
        ]  # table j: rotl(h, j*w), sorted
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        probes = sum(math.comb(self.width, i) for i in range(self.radius // chunks + 1))
        if probes > MAX_PROBES:
            raise JaxmiaError(
                f"hash radius {radius} with {chunks} chunk tables: {probes} probes per table per "
                f"query (limit {MAX_PROBES}); use more chunks or a smaller radius"
            )
        self._masks = _flip_masks(self.width, self.radius // chunks)  # [p]

    def __len__(self) -> int:
        return len(self._tables[0]) + self._buffered

    @property
    def nbytes(self) -> int:
        """Bytes held for stored hashes (tables and buffer)."""
        return sum(t.nbytes for t in self._tables) + sum(b.nbytes for b in self._buffer)

    def add(self, hashes: np.ndarray) -> None:
        """Stores hashes (duplicates of stored values are kept once). # [n] uint64"""
        hashes = np.asarray(hashes, np.uint64).ravel()
        if len(hashes) == 0:
            return
        self._buffer.append(hashes)
        self._buffered += len(hashes)
        if self._buffered >= self.buffer_size:
            self._merge()

    def _merge(self) -> None:
        new = np.concatenate(self._buffer)
        for j in range(self.chunks):
            self._tables[j] = np.union1d(self._tables[j], _rotl(new, j * self.width))
        self._buffer, self._buffered = [], 0

    def stored(self) -> np.ndarray:
        """Every stored hash, sorted and unique. # [n] uint64"""
        return np.union1d(self._tables[0], np.concatenate([np.zeros(0, np.uint64), *self._buffer]))

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest stored hash within the radius; same result as ``brute_force_search``.

        Args:
          queries: hashes. # [q] uint64

        Returns:
          (distance, hash): distance NO_MATCH and hash 0 where nothing is within the radius.
        """
        queries = np.asarray(queries, np.uint64).ravel()
        q = len(queries)
        best_d = np.full(q, HASH_BITS + 1, np.int32)
        best_h = np.zeros(q, np.uint64)

        def consider(qi: np.ndarray, cand: np.ndarray) -> None:
            # qi: query index of each candidate; cand: candidate hashes (unrotated).
            if len(qi) == 0:
                return
            d = hamming(queries[qi], cand)
            # Sort so that for each query the nearest (then smallest hash) candidate comes first.
            order = np.lexsort((cand, d, qi))
            qi, d, cand = qi[order], d[order], cand[order]
            first = np.r_[True, qi[1:] != qi[:-1]]
            qi, d, cand = qi[first], d[first], cand[first]
            better = (d < best_d[qi]) | ((d == best_d[qi]) & (cand < best_h[qi]))
            best_d[qi[better]] = d[better]
            best_h[qi[better]] = cand[better]

        if self._buffered:
            buf = np.concatenate(self._buffer)  # [n_buf]
            d = hamming(queries[:, None], buf[None, :])  # [q, n_buf]
            qi, bi = np.nonzero(d <= self.radius)
            consider(qi, buf[bi])
        shift = np.uint64(HASH_BITS - self.width)
        for j, table in enumerate(self._tables):
            if len(table) == 0:
                continue
            top = _rotl(queries, j * self.width) >> shift  # the query's chunk j # [q]
            probes = (top[:, None] ^ self._masks[None, :]).ravel()  # [q * p]
            if self.width == HASH_BITS:
                lo = np.searchsorted(table, probes, "left")
                hi = np.searchsorted(table, probes, "right")
            else:
                lo = np.searchsorted(table, probes << shift, "left")
                hi_keys = (probes + np.uint64(1)) << shift
                # The top chunk value's range ends at the table's end (the shift wraps to 0).
                hi = np.where(
                    probes == np.uint64((1 << self.width) - 1),
                    len(table),
                    np.searchsorted(table, hi_keys, "left"),
                )
            counts = hi - lo  # [q * p]
            total = int(counts.sum())
            if total == 0:
                continue
            # Expand the ranges into candidate positions without a Python loop.
            starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
            pos = np.arange(total) + starts
            qi = np.repeat(np.arange(q).repeat(len(self._masks)), counts)
            cand = _rotl(table[pos], -j * self.width)
            d = hamming(queries[qi], cand)
            keep = d <= self.radius
            consider(qi[keep], cand[keep])
        found = best_d <= self.radius
        return np.where(found, best_d, NO_MATCH).astype(np.int32), np.where(
            found, best_h, 0
        ).astype(np.uint64)


class EmbeddingIndex:
    """Nearest stored feature vector by cosine similarity above a threshold (the embedding mode).

    Stores L2-normalised float16 features; search is one matrix product per query batch.
    """

    def __init__(self, threshold: float):
        if not -1.0 <= threshold <= 1.0:
            raise JaxmiaError(f"cosine threshold: expected -1..1, got {threshold}")
        self.threshold = float(threshold)
        self._store: list[np.ndarray] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._store)

    def add(self, features: np.ndarray) -> np.ndarray:
        """Stores features; returns their ids (positions). # [n, d] -> [n]"""
        features = normalise(features).astype(np.float16)
        ids = np.arange(self._n, self._n + len(features))
        self._store.append(features)
        self._n += len(features)
        return ids

    def search(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(similarity, id) of the most similar stored vector; id NO_MATCH below the threshold."""
        q = len(features)
        if self._n == 0:
            return np.full(q, -1.0, np.float32), np.full(q, NO_MATCH, np.int64)
        store = np.concatenate(self._store).astype(np.float32)  # [n, d]
        sims = normalise(features) @ store.T  # [q, n]
        best = sims.argmax(axis=1)
        best_s = sims[np.arange(q), best].astype(np.float32)
        return best_s, np.where(best_s >= self.threshold, best, NO_MATCH)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm. # [n, d]"""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
