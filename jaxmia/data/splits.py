"""The split protocol of the gray-box paper, deterministic by seed.

The identities are shuffled and dealt into four disjoint groups:

- K **attacked** identities, known to both the target recognizer R_T and the evaluation
  recognizer R_E (the inversion attacks R_T; R_E judges whether the result shows the person);
- **target-only** identities, known to R_T alone;
- **evaluation-only** identities, known to R_E alone;
- the **auxiliary pool**, known to neither: its photos make the inversion's seed image.

A count of -1 shares the identities left after the K attacked and the explicit counts out: the
auxiliary pool (if -1) takes a fifth of them (rounded down), then target-only and
evaluation-only (if -1) split the remainder evenly, target-only taking the odd one. With the 40
AT&T identities and K=5 that is 7 auxiliary, 14 target-only and 14 evaluation-only.

Each recognizer's label order lists the attacked identities first (so attacked identity k has
label k in both R_T and R_E), then its own, each group in the data set's (natural) order.

Identities with too few photos are left out before the identities are dealt: every identity
needs ``min_photos`` photos, by default (0) the fewest the split needs, ``test_per_identity + 2``
with ``attacked_photos="disjoint"`` (an attacked identity gives R_T and R_E a training photo each)
and ``test_per_identity + 1`` with "shared". The same floor holds for every identity, so whether
an identity is kept does not depend on which group the shuffle deals it into; a set where every
identity has enough photos is split exactly as if there were no floor. The left-out identities
are named in ``Split.left_out`` and ``Split.notes()``.

Photos: each identity's photos are shuffled; ``test_per_identity`` of them are held out as test
photos, the rest are training photos. An attacked identity's photos are shared out between R_T
and R_E: with ``attacked_photos="disjoint"`` R_T gets the first half (rounded up) of its
training and of its test photos and R_E the rest, so no photo trains both; with "shared" both
get all of them. The ``all`` part knows every identity with the same train/test photos; it is
what a single recognizer on the whole data set trains on.

The random choices use numpy's Generator seeded with (seed, purpose, identity): host-side
bookkeeping, no JAX needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxmia.data.faces import FaceSet
from jaxmia.errors import JaxmiaError

ATTACKED_PHOTOS = ("disjoint", "shared")
_IDENTITIES, _PHOTOS = 0, 1  # random streams
_NOTE_NAMES = 10  # left-out identities named in the note (split.json names them all)


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
    """One recognizer's data.

    Attributes:
      identities: the recognizer's identities; its label order.
      train: indices into the FaceSet of its training photos, ascending. # [n_train]
      test: indices of its test photos, ascending. # [n_test]
    """

    identities: tuple[str, ...]
    train: np.ndarray
    test: np.ndarray

    def labels(self, faces: FaceSet, index: np.ndarray) -> np.ndarray:
        """This recognizer's labels of the FaceSet's images at ``index``. # [n] int32"""
        position = {name: i for i, name in enumerate(self.identities)}
        lookup = np.array([position.get(name, -1) for name in faces.names], np.int32)
        labels = lookup[faces.labels[np.asarray(index, np.int64)]]
        if (labels < 0).any():
            raise ValueError("index selects images of identities this part does not know")
        return labels


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """The paper's split of a FaceSet's identities and photos (see the module docstring)."""

    target: Part  # R_T
    evaluation: Part  # R_E
    attacked: tuple[str, ...]  # the K identities in both R_T and R_E
    aux_identities: tuple[str, ...]
    aux: np.ndarray  # indices of the auxiliary pool's photos, ascending
    all: Part  # every identity that is kept
    settings: dict = dataclasses.field(default_factory=dict)  # make_split's arguments
    # Identities with fewer than settings["min_photos_resolved"] photos, in the data set's
    # order, and how many photos each has: in no part and no pool.
    left_out: tuple[str, ...] = ()
    left_out_photos: tuple[int, ...] = ()

    def notes(self) -> list[str]:
        """Lines for people on what the split left out of the data set (none if nothing)."""
        if not self.left_out:
            return []
        total = len(self.all.identities) + len(self.left_out)
        shown = [f"{n}: {c}" for n, c in zip(self.left_out, self.left_out_photos, strict=True)]
        more = len(shown) - _NOTE_NAMES
        listed = ", ".join(shown[:_NOTE_NAMES]) + (f", and {more} more" if more > 0 else "")
        return [
            f"left out {len(self.left_out)} of {total} identities with fewer than "
            f"{self.settings['min_photos_resolved']} photos ({listed})"
        ]

    def to_json(self, faces: FaceSet) -> dict:
        """Names and photo ids (file paths where known, else indices) for the run folder."""

        def ids(index: np.ndarray) -> list:
            return [faces.files[i] for i in index] if faces.files else [int(i) for i in index]

        def part(p: Part) -> dict:
            return {"identities": list(p.identities), "train": ids(p.train), "test": ids(p.test)}

        return {
            "source": faces.source,
            "synthetic": faces.synthetic,
            "settings": dict(self.settings),
            "attacked": list(self.attacked),
            "target": part(self.target),
            "evaluation": part(self.evaluation),
            "aux_identities": list(self.aux_identities),
            "aux": ids(self.aux),
            "all": part(self.all),
            "left_out": list(self.left_out),
        }


def make_split(
    faces: FaceSet,
    *,
    seed: int,
    num_attacked: int = 5,
    num_target_only: int = -1,
    num_evaluation_only: int = -1,
    num_aux: int = -1,
    test_per_identity: int = 5,
    attacked_photos: str = "disjoint",
    min_photos: int = 0,
) -> Split:
    """Splits identities and photos as the paper does (see the module docstring).

    Args:
      faces: the face set.
      seed: the random choices' seed.
      num_attacked: K, the identities both R_T and R_E know.
      num_target_only: identities R_T alone knows (-1: a share of the rest).
      num_evaluation_only: identities R_E alone knows (-1: a share of the rest).
      num_aux: identities of the auxiliary pool (-1: a fifth of the rest).
      test_per_identity: photos per identity held out for test.
      attacked_photos: "disjoint" or "shared" (see the module docstring).
      min_photos: identities with fewer photos are left out; 0 means the fewest the split needs
        (see ``needed_photos``); any other value below that is refused.

    Returns:
      The split; its ``settings`` hold the arguments, the -1 counts and ``min_photos`` resolved.
    """
    floor = resolve_min_photos(min_photos, test_per_identity, attacked_photos)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise JaxmiaError(f"split.seed: expected an integer >= 0, got {seed!r}")
    counts = np.bincount(faces.labels, minlength=len(faces.names))  # [identities]
    # Left out before dealing, by photo count alone: the shuffle below sees only the kept
    # identities, so a set with nothing to leave out deals exactly as it did without a floor.
    kept = np.flatnonzero(counts >= floor)
    dropped = np.flatnonzero(counts < floor)
    n = len(kept)
    k, t, e, a = _counts(
        n,
        num_attacked,
        num_target_only,
        num_evaluation_only,
        num_aux,
        f"; {len(dropped)} identities with fewer than {floor} photos are left out"
        if len(dropped)
        else "",
    )

    order = kept[np.random.default_rng([seed, _IDENTITIES]).permutation(n)]
    groups = np.split(order, np.cumsum([k, t, e, a]))[:4]
    attacked, target_only, evaluation_only, aux_ids = (np.sort(g) for g in groups)

    # Each kept identity's photos, shuffled, split into test and train. The photo stream is
    # keyed by the identity's index in the face set, so leaving others out does not change it.
    by_identity = {i: np.flatnonzero(faces.labels == i) for i in kept}
    test, train = {}, {}
    for i in kept:
        shuffled = np.random.default_rng([seed, _PHOTOS, i]).permutation(by_identity[i])
        test[i] = shuffled[:test_per_identity]
        train[i] = shuffled[test_per_identity:]

    def halves(i, which):  # R_T's and R_E's share of an attacked identity's photos
        photos = which[i]
        if attacked_photos == "shared":
            return photos, photos
        cut = (len(photos) + 1) // 2
        return photos[:cut], photos[cut:]

    def part(own: np.ndarray, side: int) -> Part:
        names = tuple(faces.names[i] for i in (*attacked, *own))
        tr = [halves(i, train)[side] for i in attacked] + [train[i] for i in own]
        te = [halves(i, test)[side] for i in attacked] + [test[i] for i in own]
        return Part(names, _sorted(tr), _sorted(te))

    return Split(
        target=part(target_only, 0),
        evaluation=part(evaluation_only, 1),
        attacked=tuple(faces.names[i] for i in attacked),
        aux_identities=tuple(faces.names[i] for i in aux_ids),
        aux=_sorted([by_identity[i] for i in aux_ids]),
        all=Part(
            tuple(faces.names[i] for i in kept),
            _sorted([train[i] for i in kept]),
            _sorted([test[i] for i in kept]),
        ),
        settings={
            "seed": seed,
            "num_attacked": k,
            "num_target_only": t,
            "num_evaluation_only": e,
            "num_aux": a,
            "test_per_identity": test_per_identity,
            "attacked_photos": attacked_photos,
            "min_photos": min_photos,
            "min_photos_resolved": floor,
        },
        left_out=tuple(faces.names[i] for i in dropped),
        left_out_photos=tuple(int(counts[i]) for i in dropped),
    )


def needed_photos(test_per_identity: int, attacked_photos: str) -> int:
    """The fewest photos an identity needs: its test photos, and training photos for R_T and R_E.

    With "disjoint" an attacked identity's training photos are halved between R_T and R_E, so
    it needs two; every identity is held to that, since any may be dealt into the attacked group.
    """
    return test_per_identity + (2 if attacked_photos == "disjoint" else 1)


def resolve_min_photos(min_photos: int, test_per_identity: int, attacked_photos: str) -> int:
    """The photo floor ``min_photos`` asks for (0: ``needed_photos``), its inputs checked."""
    if attacked_photos not in ATTACKED_PHOTOS:
        raise JaxmiaError(
            f"split.attacked_photos: expected one of {ATTACKED_PHOTOS}, got {attacked_photos!r}"
        )
    if not _is_int(test_per_identity) or test_per_identity < 0:
        raise JaxmiaError(
            f"split.test_per_identity: expected an integer >= 0, got {test_per_identity!r}"
        )
    need = needed_photos(test_per_identity, attacked_photos)
    if not _is_int(min_photos) or not (min_photos == 0 or min_photos >= need):
        raise JaxmiaError(
            f"split.min_photos: expected 0 (the fewest the split needs) or an integer >= {need} "
            f"({test_per_identity} test photos + {need - test_per_identity} to train), "
            f"got {min_photos!r}"
        )
    return int(min_photos) or need


def from_config(config: Any, faces: FaceSet) -> Split:
    """The split of ``faces`` that a jaxmia config's ``split`` section asks for."""
    s = config.split
    return make_split(
        faces,
        seed=s.seed,
        num_attacked=s.num_attacked,
        num_target_only=s.num_target_only,
        num_evaluation_only=s.num_evaluation_only,
        num_aux=s.num_aux,
        test_per_identity=s.test_per_identity,
        attacked_photos=s.attacked_photos,
        min_photos=s.min_photos,
    )


def kept_from_config(config: Any, faces: FaceSet) -> int:
    """How many of ``faces``' identities the config's split keeps (has the photos for)."""
    s = config.split
    floor = resolve_min_photos(s.min_photos, s.test_per_identity, s.attacked_photos)
    return int((np.bincount(faces.labels, minlength=len(faces.names)) >= floor).sum())


def _counts(
    n: int, k: int, t: int, e: int, a: int, left_out: str = ""
) -> tuple[int, int, int, int]:
    """Resolves the -1 counts (see the module docstring); ``left_out`` ends the error."""
    fields = {"num_attacked": k, "num_target_only": t, "num_evaluation_only": e, "num_aux": a}
    for name, value in fields.items():
        if value < -1 or (name == "num_attacked" and value < 0):
            raise JaxmiaError(f"split.{name}: expected a count >= 0 (or -1: the rest), got {value}")
    fixed = k + sum(v for v in (t, e, a) if v >= 0)
    if fixed > n:
        asked = "+".join(str(v) if v >= 0 else "?" for v in (k, t, e, a))
        raise JaxmiaError(
            f"split asks for {asked}={fixed} identities but the data set has {n} "
            f"(attacked+target-only+evaluation-only+aux){left_out}"
        )
    rest = n - fixed
    if a == -1:
        a = rest // 5
        rest -= a
    if t == -1 and e == -1:
        t, e = (rest + 1) // 2, rest // 2
    elif t == -1:
        t = rest
    elif e == -1:
        e = rest
    return k, t, e, a


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _sorted(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
