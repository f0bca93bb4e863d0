"""The judges: one registry of what each is, and the one interface every fitted judge has.

``JUDGES`` lists every judge once, in the order of the evaluation's tables and JSON: its name
(the key of its ranks in ``evaluation.json`` and of its ``rank_`` column in ``clones.csv``), its
title, its kind and whether it is robust. The lists the rest of jaxmia uses (``JUDGE_TITLES``,
``FACE_JUDGES``, ``ROBUST``, ``TABLE_JUDGES``, ``BESIDE_R_E``) are derived from it.

A fitted judge (``Judge``: ``jaxmia.judges.panel`` fits them) has one method,
``rank(images, targets)``: each image's target ranked among R_E's identities by every judge of
the registry it stands for, and its per-image measures. One fitted judge may stand for several
registry judges where they share the costly part: the face judges of every face model share the
aligned chips (by the nearest photo and by the nearest centroid, for each model), R_E and R_E_other
under transforms share the transformed images, and the judges that are not CNNs share the
eigenface projection.

To add a judge: one ``JudgeInfo`` in ``JUDGES`` and a class with ``names`` and ``rank`` that
``panel.make_panel`` fits.

No JAX here: the report and the stages read the registry without loading a model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal, Protocol

import numpy as np

# "face": a pretrained face recognizer trained on other people; "attacked": R_T, the attacked
# model (ranked beside the judges, not one); "recognizer": a CNN trained on R_E's photos;
# "transformed": such a CNN under random transforms; "classical": no CNN (eigenfaces, pixels).
Kind = Literal["face", "attacked", "recognizer", "transformed", "classical"]
KINDS: tuple[Kind, ...] = ("face", "attacked", "recognizer", "transformed", "classical")


@dataclasses.dataclass(frozen=True)
class JudgeInfo:
    """What one judge is."""

    name: str  # its key in every table, JSON and CSV
    title: str  # what the reports call it
    kind: Kind
    # Adversarial patterns fool it less than R_E: it counts in the adversarial inflation (R_E's
    # top-1 on the clones minus the most generous robust judge's) and the judges' mean.
    robust: bool
    in_tables: bool = True  # a column of the defence and black-box tables


@dataclasses.dataclass(frozen=True)
class FaceModel:
    """A pretrained face recognizer the face judges use (a value of ``config.judges.face``)."""

    title: str
    # Loads the model (fetching its weights once): a function of aligned chips
    # [n, 150, 150, 3] in [0, 1] to embeddings [n, d].
    load: Callable[[], Callable[[np.ndarray], np.ndarray]]
    metric: str  # face.METRICS: how its embeddings compare


# Chips go to the embedders padded to a multiple of this: one compiled shape, whatever the count
# (small: a small gallery or test pads little; on the CPU a larger batch is no faster).
EMBED_BATCH = 16


def _load_dlib() -> Callable[[np.ndarray], np.ndarray]:
    from jaxmia.judges import face  # noqa: PLC0415 - dlib only where the judge runs

    return face.dlib_embedder(batch_size=EMBED_BATCH)


def _load_faceres() -> Callable[[np.ndarray], np.ndarray]:
    from jaxmia.pretrained import faceres  # noqa: PLC0415 - JAX only where the judge runs

    return functools.partial(faceres.embed, faceres.load_faceres(), batch_size=EMBED_BATCH)


FACE_MODELS = {
    "dlib": FaceModel("dlib's ResNet-29 (about 3 million faces)", _load_dlib, "euclidean"),
    "faceres": FaceModel("faceres MobileNet-v1 (VGGFace2)", _load_faceres, "cosine"),
}


def face_judge_names(model: str) -> tuple[str, str]:
    """The two judges of a face model: by the nearest real photo, by the nearest centroid."""
    return f"face_{model}", f"face_{model}_centroid"


def _face_judges(model: str) -> tuple[JudgeInfo, JudgeInfo]:
    title = FACE_MODELS[model].title
    nn, centroid = face_judge_names(model)
    return (
        JudgeInfo(nn, f"face judge, {title}: nearest real photo", "face", robust=True),
        JudgeInfo(centroid, f"face judge, {title}: nearest identity centroid", "face", robust=True),
    )


# Every judge, in the order of the evaluation's JSON: the face judges first (a person's
# standard), then R_T and each CNN trained on R_E's photos followed by itself under transforms,
# then the judges that are not CNNs.
JUDGES: tuple[JudgeInfo, ...] = (
    *(j for model in FACE_MODELS for j in _face_judges(model)),
    JudgeInfo("R_T", "R_T (the attacked model; not a judge)", "attacked", robust=False),
    JudgeInfo("R_E", "R_E (R_T's architecture: the paper's judge)", "recognizer", robust=False),
    JudgeInfo("R_E_transformed", "R_E under random transforms", "transformed", robust=True),
    JudgeInfo("R_E_other", "R_E of another architecture", "recognizer", robust=False),
    # Outside the inflation's robust judges (docs/evaluate.md) and the tables: the other
    # architecture is set against R_E on its own (the summary's ``inflation.vs_R_E_other``).
    JudgeInfo(
        "R_E_other_transformed",
        "R_E of another architecture under transforms",
        "transformed",
        robust=False,
        in_tables=False,
    ),
    JudgeInfo("eigenface_nn", "nearest real photo, eigenface space", "classical", robust=True),
    JudgeInfo("eigenface_mean", "nearest class mean, eigenface space", "classical", robust=True),
    JudgeInfo("pixel_nn", "nearest real photo, pixels", "classical", robust=True),
)
BY_NAME = {j.name: j for j in JUDGES}

JUDGE_TITLES = {j.name: j.title for j in JUDGES}
# Each face model judges twice: by the nearest real photo and by the nearest identity centroid.
FACE_JUDGES = tuple(j.name for j in JUDGES if j.kind == "face")
ROBUST = tuple(j.name for j in JUDGES if j.robust)
# The tables' columns of judges, in order: the face judges first, then R_T (the attacked model,
# where a table shows it) and the CNNs that are not robust, then those adversarial patterns fool
# less.
TABLE_JUDGES = tuple(
    j.name
    for j in sorted(
        (j for j in JUDGES if j.in_tables),
        key=lambda j: 0 if j.kind == "face" else 1 if not j.robust else 2,  # sorted() is stable
    )
)
# The judges that a setting is chosen by (benchmarks/prior_levers.md): every one but R_E and
# R_T, as R_E alone rewards patterns that fool R_T's twin; the face judges first.
BESIDE_R_E = tuple(j.name for j in JUDGES if j.kind != "attacked" and j.name != "R_E")


class Judge(Protocol):
    """A fitted judge: ranks each image's target among R_E's identities."""

    names: tuple[str, ...]  # the registry's judges it ranks for, in ``JUDGES``' order

    def rank(
        self, images: np.ndarray, targets: np.ndarray, *, batch_size: int = 256,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Each image's target ranked by each of ``names``, and the per-image measures.

        Args:
          images: in [0, 1], R_E's image shape; n >= 1. # [n, h, w, c]
          targets: each image's identity, as R_E's label. # [n]
          batch_size: images per compiled call, where the judge runs a network.
          progress: show a progress bar.

        Returns:
          {each of ``names``: the target's rank [n] (1 = the target first; ties count against
          it), then any per-image measures [n] under other keys}.

        Raises:
          JaxmiaError: a target the judge cannot rank (an identity it does not know).
        """
        ...
