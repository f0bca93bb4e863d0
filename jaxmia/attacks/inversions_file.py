"""The inversions file: the clones a ``jaxmia invert`` folder holds, written, read back, checked.

Every stage that makes clones (``jaxmia invert``, the experiment's selection, ``jaxmia blackbox``)
writes ``inversions.npz`` through ``save_inversions``; the judges read it through
``load_inversions``, the selection of clones through ``load_arrays``. Its arrays (``FIELDS``, in
that order in the file):

- ``clones`` [ids, clones, h, w, c] float32 in [0, 1];
- per clone [ids, clones]: ``steps``, ``loss``, ``confidence`` (R_T's softmax of the target for
  the clone), ``seed_confidence`` (the same of its seed), ``reason`` (int index into
  ``stop_reasons``);
- ``seeds`` [ids, clones, h, w, c], or [1, 1, h, w, c] when every clone starts from the same image
  (broadcast it);
- ``identities`` (names, str) [ids]; ``labels`` (R_T label indices) [ids]; ``diverged`` (bool)
  [ids, clones]; ``stop_reasons`` (str);
- after a selection of the best clones: ``selected`` (indices into the run's clones) and
  ``select_score`` [ids, clones].

Required: ``clones``, ``seeds``, ``identities``, ``labels``, ``diverged``; the others as the
stage that wrote the file knows them. ``summary.json`` beside it holds the run's summary.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxmia import files
from jaxmia.errors import JaxmiaError

INVERSIONS_FILE = "inversions.npz"
SUMMARY_FILE = "summary.json"
FIELDS = (
    "clones", "steps", "loss", "confidence", "seed_confidence", "reason",
    "seeds", "identities", "labels", "diverged", "stop_reasons", "selected", "select_score",
)  # fmt: skip
_WRITTEN = ("clones", "seeds", "identities", "labels", "diverged")
# Older files (and hand-made ones) may lack labels and diverged; readers fill those in.
_REQUIRED = ("clones", "seeds", "identities")


@dataclasses.dataclass(frozen=True)
class Inversions:
    """The clones of one inversion run."""

    clones: np.ndarray  # [ids, clones, h, w, c] in [0, 1]
    seeds: np.ndarray  # [ids, clones, h, w, c]: the image each clone started from
    identities: tuple[str, ...]  # [ids] target identity names
    target_confidence: np.ndarray | None  # [ids, clones] R_T's softmax score, as the run recorded
    seed_target_confidence: np.ndarray | None  # [ids, clones] the same of each clone's seed
    diverged: np.ndarray  # [ids, clones] bool
    steps: np.ndarray | None  # [ids, clones]
    summary: dict[str, Any]
    source: str  # where it was read from, for messages


def save_inversions(folder: str | Path, **arrays: np.ndarray) -> Path:
    """Writes ``folder/inversions.npz`` (atomically) with ``arrays``, named as in ``FIELDS``.

    Returns:
      The file's path.

    Raises:
      ValueError: a required array is missing or a name is not one of ``FIELDS`` (a bug of the
        calling stage, not of the user's input).
    """
    missing = [k for k in _WRITTEN if k not in arrays]
    unknown = [k for k in arrays if k not in FIELDS]
    if missing or unknown:
        raise ValueError(f"inversions file: missing {missing}, unknown {unknown}")
    path = Path(folder) / INVERSIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    files.savez(path, **{k: arrays[k] for k in FIELDS if k in arrays})
    return path


def load_arrays(folder: str | Path) -> dict[str, np.ndarray]:
    """Every array of ``folder/inversions.npz`` as written, unchecked (see ``load_inversions``)."""
    with np.load(Path(folder) / INVERSIONS_FILE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_inversions(folder: str | Path) -> Inversions:
    """Reads ``inversions.npz`` (and ``summary.json`` if present) of a ``jaxmia invert`` folder.

    Raises:
      JaxmiaError: the folder, the file or a required array is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise JaxmiaError(
            f"inversions folder {folder}: not found (expected a jaxmia invert workdir)"
        )
    path = folder / INVERSIONS_FILE
    if not path.is_file():
        raise JaxmiaError(f"{path}: not found (expected the clones written by jaxmia invert)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise JaxmiaError(f"{path}: not a readable .npz file ({e})") from e
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise JaxmiaError(f"{path}: lacks the array(s) {', '.join(missing)}")
    clones = arrays["clones"]
    if clones.ndim != 5 or clones.shape[0] == 0 or clones.shape[1] == 0:
        raise JaxmiaError(
            f"{path}: clones has shape {clones.shape}, expected [ids, clones, h, w, c]"
        )
    ids, n = clones.shape[:2]
    identities = tuple(str(s) for s in np.asarray(arrays["identities"]).reshape(-1))
    if len(identities) != ids:
        raise JaxmiaError(f"{path}: {len(identities)} identities for {ids} rows of clones")
    try:
        seeds = np.broadcast_to(arrays["seeds"], clones.shape)
    except ValueError as e:
        raise JaxmiaError(
            f"{path}: seeds of shape {arrays['seeds'].shape} do not fit clones {clones.shape}"
        ) from e

    def per_clone(key: str) -> np.ndarray | None:
        if key not in arrays:
            return None
        a = arrays[key]
        if a.shape != (ids, n):
            raise JaxmiaError(f"{path}: {key} has shape {a.shape}, expected {(ids, n)}")
        return a

    diverged = per_clone("diverged")
    summary = {}
    if (folder / SUMMARY_FILE).is_file():
        try:
            summary = json.loads((folder / SUMMARY_FILE).read_text())
        except json.JSONDecodeError as e:
            raise JaxmiaError(f"{folder / SUMMARY_FILE}: not valid JSON ({e})") from e
    return Inversions(
        clones=clones.astype(np.float32),
        seeds=seeds.astype(np.float32),
        identities=identities,
        target_confidence=per_clone("confidence"),
        seed_target_confidence=per_clone("seed_confidence"),
        diverged=np.zeros((ids, n), bool) if diverged is None else diverged.astype(bool),
        steps=per_clone("steps"),
        summary=summary,
        source=str(path),
    )
