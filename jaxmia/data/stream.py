"""Training batches streamed from the array_record cache through grain, over a device mesh.

A ``Source`` is one part of a face set (the records of a recognizer's training or test images)
read on demand: a random-access view of the cache (``data.FaceRecords.records``, a tfds
array_record data source) restricted to the part's record positions, with a map from identity
names to the recognizer's labels. ``dataset`` makes one epoch's grain pipeline of it:

    grain.MapDataset.source(part)      # random access into the cache, nothing read yet
      .shuffle(seed=epoch_seed(seed, epoch))   # a permutation from (seed, epoch) only
      .repeat(2, reseed_each_epoch=False)[:steps * batch]   # wrapped round: every batch full
      [process::processes]             # each host reads its own rows of every global batch
      .map(decode)                     # uint8 record -> float32 [h, w, c] in [0, 1], label
      .to_iter_dataset(ReadOptions(num_threads, prefetch))   # records read in threads
      .batch(batch // processes)       # (optionally .mp_prefetch: worker processes)

so memory holds a few batches whatever the data set's size, each epoch's order depends on the
seed and the epoch alone (a resumed run continues the same order), and every batch has one shape
(one compile). Sharding takes every ``processes``-th element of the global order, so global batch
``i`` holds the same images whatever the process count; ``shard_count=jax.process_count()`` and
``shard_index=jax.process_index()`` are the defaults.

Augmentation is not part of the pipeline: it stays inside the jitted train step
(``train.train_step``, vmapped over the batch), so one compiled program augments and steps, and
on accelerators it runs there, where it is cheaper than on the host's cores; grain decodes,
shuffles, batches and prefetches.

Data parallelism (``mesh``, ``place``): a one-axis mesh over every device (all hosts); batches
are split along it (``NamedSharding(mesh, P("data"))``, each process placing its own rows),
parameters and optimizer state are replicated, and jit's partitioner inserts the gradient
all-reduce (and batch norm's cross-device means).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmia import sharding
from jaxmia.errors import JaxmiaError

# Records read at once: threads overlap the array_record reads and tfds decoding (both release
# the GIL for much of their time); the prefetch buffer is a few batches, so memory stays flat.
THREADS = min(8, os.cpu_count() or 1)
PREFETCH = 256


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """One part of a face set, read on demand.

    Attributes:
      records: random access: ``len(records)``, ``records[i]`` -> ``{"image": uint8 or float32
        [h, w, c], "identity": name (str or bytes)}``; the array_record cache for jaxmia sets.
      index: record positions of this part. # [n]
      label_of: identity name -> label in the recognizer's order.
      digest: what the records are (a cache folder's name, or a digest of arrays), for settings.
    """

    records: Any
    index: np.ndarray
    label_of: Mapping[str, int]
    digest: str

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        # What grain's MapDataset.source reads: a random-access data source.
        return self.records[int(self.index[i])]

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray) -> Source:
        """Arrays in memory as a source (tests, ``fit`` with arrays and ``train.stream``).

        Args:
          images: float32 in [0, 1] or uint8. # [n, h, w, c]
          labels: integer labels. # [n]
        """
        images, labels = np.asarray(images), np.asarray(labels, np.int32)
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(images, np.float32).tobytes())
        digest.update(np.ascontiguousarray(labels, np.int32).tobytes())
        return cls(
            records=_ArrayRecords(images, labels),
            index=np.arange(len(labels)),
            label_of={str(i): i for i in np.unique(labels).tolist()},
            digest=f"{len(labels)} images in memory, sha256 {digest.hexdigest()[:16]}",
        )


class _ArrayRecords:
    """Arrays as records with an identity name: the label's decimal string."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "identity": str(int(self.labels[i]))}


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a function of (seed, epoch) only."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(epoch)]).generate_state(1)[0])


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch, the last wrapped round to the epoch's start."""
    return -(-n // batch_size)


def dataset(
    source: Source,
    *,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    wrap: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    threads: int = THREADS,
    workers: int = 0,
) -> grain.IterDataset:
    """One epoch of (image, label) batches of a source, this process's rows of each.

    Args:
      source: the records to read.
      batch_size: the global batch; each of ``shard_count`` processes gets ``batch_size /
        shard_count`` rows of it.
      seed: the run's shuffle seed; with ``epoch`` it fixes the order (``epoch_seed``).
      epoch: the epoch's number.
      shuffle: False keeps the source's order (evaluation).
      wrap: every batch full, the last one wrapped round to the epoch's start (training; one
        compile); False ends with a partial batch.
      shard_index: this process's shard (default ``jax.process_index()``).
      shard_count: the number of shards (default ``jax.process_count()``).
      threads: records read in parallel (grain ``ReadOptions.num_threads``).
      workers: > 0: batches made in that many worker processes (grain ``mp_prefetch``).

    Returns:
      An iterable grain dataset of ``{"image": float32 [b, h, w, c], "label": int32 [b]}``.
    """
    count = jax.process_count() if shard_count is None else shard_count
    index = jax.process_index() if shard_index is None else shard_index
    if count < 1 or not 0 <= index < count:
        raise JaxmiaError(f"shard {index} of {count}: expected 0 <= shard_index < shard_count")
    if batch_size < 1 or batch_size % count:
        raise JaxmiaError(
            f"batch size {batch_size}: expected a positive multiple of the {count} processes"
        )
    n = len(source)
    if n == 0:
        raise JaxmiaError("stream source: expected at least one record, got none")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=epoch_seed(seed, epoch))
    if wrap:
        total = steps_per_epoch(n, batch_size) * batch_size
        # The same permutation again, not a fresh one: as np.resize wraps the in-memory order.
        ds = ds.repeat(-(-total // n), reseed_each_epoch=False)[:total]
    ds = ds[index::count]
    ds = ds.map(_Decode(source.label_of))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=PREFETCH))
    ds = ds.batch(batch_size // count, drop_remainder=False)
    if workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return ds


class _Decode:
    """A record as float32 [h, w, c] in [0, 1] and its label in the recognizer's order."""

    def __init__(self, label_of: Mapping[str, int]):
        self.label_of = dict(label_of)

    def __call__(self, record: dict) -> dict:
        image = np.asarray(record["image"])
        if image.dtype == np.uint8:
            image = image.astype(np.float32) * np.float32(1 / 255)
        name = record["identity"]
        name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
        if name not in self.label_of:
            raise JaxmiaError(f"record of identity {name!r}: not one of the recognizer's")
        return {
            "image": image.astype(np.float32, copy=False),
            "label": np.int32(self.label_of[name]),
        }


def mesh(batch_size: int) -> Mesh:
    """A one-axis ``"data"`` mesh over every device (all hosts) that ``batch_size`` divides."""
    devices = jax.devices()
    if batch_size % len(devices):
        raise JaxmiaError(
            f"train.batch_size {batch_size}: expected a multiple of the {len(devices)} devices "
            "(train.stream splits each batch over all of them)"
        )
    return Mesh(np.asarray(devices), (sharding.AXIS,))


def place(mesh: Mesh, batch: dict) -> tuple[jax.Array, jax.Array]:
    """This process's rows of a global batch, split over the mesh. # [b, h, w, c], [b]"""
    rows = NamedSharding(mesh, P(sharding.AXIS))
    x = jax.make_array_from_process_local_data(rows, batch["image"])
    y = jax.make_array_from_process_local_data(rows, batch["label"])
    return x, y


def epoch_batches(
    source: Source, batch_size: int, seed: int, epoch: int, mesh: Mesh
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """One training epoch of full global batches placed on the mesh. # [b, h, w, c], [b]"""
    for batch in dataset(source, batch_size=batch_size, seed=seed, epoch=epoch):
        yield place(mesh, batch)


def local(tree: Any) -> Any:
    """This process's copy of replicated arrays (for evaluation on host-local batches)."""
    return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)
