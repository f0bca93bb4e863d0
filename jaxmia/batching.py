"""One padded fixed-size batch loop: a jitted function over any number of images, few compiles.

A jitted function compiles once per input shape, so running it over ``n`` images in batches of
whatever size is left would compile again for the last, short batch (and for every new ``n``).
``map_batches`` cuts the inputs into batches of at most the largest of ``sizes`` and pads each
to the smallest size that holds it, so a function compiles at most once per size; the padded
rows' outputs are dropped. Padding repeats a batch's last row, so the function never sees an
input unlike the real ones (an all-zero row can make a NaN that a real image would not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm


def sizes_for(n: int, batch_size: int) -> tuple[int]:
    """One batch size for ``n`` items: ``batch_size``, or ``n`` when fewer (no useless padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    return (max(1, min(batch_size, n)),)


def map_batches(
    fn: Callable[..., Any],
    *arrays: np.ndarray,
    sizes: Sequence[int],
    progress: bool = False,
    desc: str = "batches",
) -> Any:
    """``fn`` over padded batches of ``arrays`` (leading axes equal), its outputs joined.

    Args:
      fn: takes one batch of each array, returns a pytree of arrays with the batch as leading
        axis (None leaves are allowed and stay None).
      arrays: the inputs. # each [n, ...]
      sizes: the batch sizes ``fn`` is called with (e.g. ``sizes_for(n, 256)``, or buckets).
      progress: show a progress bar over the batches.
      desc: the progress bar's label.

    Returns:
      ``fn``'s pytree with every leaf as a host array of the ``n`` rows. # [n, ...]
    """
    sizes = sorted(int(s) for s in sizes)
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes={sizes}: expected positive batch sizes")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays of different lengths: {[len(a) for a in arrays]}")
    step = sizes[-1]
    outs = []
    for start in tqdm(
        range(0, n, step), desc=desc, disable=not progress, unit="batch", leave=False
    ):
        chunk = [np.asarray(a[start : start + step]) for a in arrays]
        count = len(chunk[0])
        size = next(s for s in sizes if s >= count)
        padded = [np.concatenate([c, np.repeat(c[-1:], size - count, 0)]) for c in chunk]
        out = fn(*padded)
        outs.append(jax.tree.map(lambda o, count=count: np.asarray(o)[:count], out))
    if not outs:
        empty = fn(*[np.zeros((sizes[0], *np.shape(a)[1:]), np.asarray(a).dtype) for a in arrays])
        return jax.tree.map(lambda o: np.asarray(o)[:0], empty)
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)
