"""The inversions file: the clones a ``jaxmia invert`` folder holds, read back and checked.

The stages write ``inversions.npz`` and ``summary.json``; the judges and the selection of clones
read them through ``load_inversions``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxmia.errors import JaxmiaError

INVERSIONS_FILE = "inversions.npz"
SUMMARY_FILE = "summary.json"
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
