"""Every judge on every group of images: how much of an attack's success survives honest judges.

R_E, the paper's judge, shares R_T's architecture, and a gradient pattern that fools one CNN
often fools its twin. So beside R_E the clones are judged by

- ``face_dlib``, ``face_dlib_centroid``, ``face_faceres``, ``face_faceres_centroid``: the face
  judges, first in every table: pretrained face recognizers trained on millions of *other*
  people (``FACE_MODELS``; the config's ``judges.face``), fed dlib-aligned face chips
  (``jaxmia.judges.face``), naming the identity of the nearest of R_E's real training
  photos, or of the nearest identity centroid, in their embedding. The field's standard: a
  person's face, not a pattern one family of CNNs reads as that person;
- ``R_E_transformed``: R_E's softmax averaged over random small shifts, flips, zooms, blurs and
  noise (``jaxmia.judges.transformed``); a face keeps its identity under them, a pixel pattern
  mostly not;
- ``R_E_other``: a second evaluation recognizer of another architecture, trained on R_E's
  photos (``jaxmia experiment``'s ``evaluation_other`` stage), and the same under transforms;
- ``eigenface_nn``, ``eigenface_mean``, ``pixel_nn``: judges that are not CNNs, fitted on R_E's
  real training photos (``jaxmia.judges.classical``): the identity of the nearest photo, or class
  mean, in an eigenface space of those photos, and of the nearest photo in pixels.

Every judge ranks the target among R_E's identities (the same gallery, so the same chance), and
judges four groups alike: the **clones**; their **seeds** (the floor: near chance); **held-out
real photos** of the attacked identities that no recognizer or judge was fitted on (the
ceiling); and **PGD controls**, seeds pushed towards the target against R_T within a small L-inf
ball (``jaxmia.judges.pgd``): R_T accepts them, so a judge that accepts them too is fooled by
adversarial patterns. R_T's own ranks are reported beside them (it is the attacked model, not a
judge). "Adversarial inflation" is R_E's top-1 on the clones minus the most generous robust
judge's (``ROBUST``): the share of R_E's success that no robust judge confirms.

Realism and closeness, per group: the rate of images where dlib's detector finds a face at all,
the face judges' "KNN distance" (the field's "FaceNet distance": the embedding distance to the
target's nearest real photo), the Fréchet distance to R_E's real photos in the eigenface
coefficient space (FID's formula, not its Inception features, which cannot be downloaded here),
the KNN ratio (eigenface distance to the target's nearest photo over that to anyone else's: < 1
is "closer to the target than to anyone else") and the energy outside the span of the eigenfaces.

What each judge is (its name, title, kind, whether robust) is ``jaxmia.judges.registry``'s;
``make_panel`` fits them, each with one method ``rank(images, targets)``, and ``judge_groups``
runs them alike.

The recognizers run in JAX on the device; the statistics are NumPy on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxmia.errors import JaxmiaError
from jaxmia.judges import classical, scores
from jaxmia.judges import face as face_lib
from jaxmia.judges import pgd as pgd_lib
from jaxmia.judges import transformed as transformed_lib

# The registry's lists (those unused here: for the stages and tests that read them here).
from jaxmia.judges.registry import (
    BESIDE_R_E,  # noqa: F401
    EMBED_BATCH,
    FACE_JUDGES,  # noqa: F401
    FACE_MODELS,
    JUDGE_TITLES,
    ROBUST,
    TABLE_JUDGES,  # noqa: F401
    Judge,
    face_judge_names,
)
from jaxmia.pretrained import fetch

if TYPE_CHECKING:
    from jaxmia.checkpoint import LoadedRecognizer
    from jaxmia.data.faces import FaceSet

GROUP_TITLES = {
    "clones": "clones",
    "seeds": "seeds (floor)",
    "real": "held-out real photos (ceiling)",
    "pgd": "PGD controls (adversarial)",
}


# The per-image measures of the face judges beside their ranks.
FACE_DETECTED = "face_detected"  # dlib's detector found a face (else a fixed box was aligned)
FACE_DISTANCE = "face_knn_distance_"  # + model: embedding distance to the target's nearest photo
_CHIP_BATCH = 256  # images aligned, then embedded by every face model, at a time


@dataclasses.dataclass(frozen=True)
class Settings:
    """The judges' settings (``config.judges``)."""

    eigenfaces: int
    transforms: transformed_lib.TransformSettings
    pgd: pgd_lib.PGDSettings
    pgd_per_identity: int
    seed: int
    seeds_per_identity: int  # 0: every clone's seed
    face: tuple[str, ...]  # keys of FACE_MODELS: the face judges to run

    @classmethod
    def from_config(cls, judges_config: ml_collections.ConfigDict) -> Settings:
        """Raises a JaxmiaError naming the first nonsensical field."""
        c = judges_config
        if not isinstance(c.eigenfaces, int) or c.eigenfaces < 1:
            raise JaxmiaError(
                f"config field judges.eigenfaces: expected an integer >= 1, got {c.eigenfaces!r}"
            )
        if not isinstance(c.pgd.per_identity, int) or c.pgd.per_identity < 0:
            raise JaxmiaError(
                "config field judges.pgd.per_identity: expected an integer >= 0, got "
                f"{c.pgd.per_identity!r}"
            )
        seeds = c.get("seeds_per_identity", 0)
        if not isinstance(seeds, int) or seeds < 0:
            raise JaxmiaError(
                "config field judges.seeds_per_identity: expected an integer >= 0 (0: all), got "
                f"{seeds!r}"
            )
        if c.sort_by not in ("", *JUDGE_TITLES):
            raise JaxmiaError(
                f"config field judges.sort_by: expected '' or one of {', '.join(JUDGE_TITLES)}, "
                f"got {c.sort_by!r}"
            )
        face = c.get("face", ())
        if (
            not isinstance(face, tuple | list)
            or any(f not in FACE_MODELS for f in face)
            or len(set(face)) != len(face)
        ):
            raise JaxmiaError(
                f"config field judges.face: expected a tuple of distinct face models from "
                f"{', '.join(FACE_MODELS)} (empty: none), got {face!r}"
            )
        t = c.transforms
        try:
            return cls(
                eigenfaces=c.eigenfaces,
                transforms=transformed_lib.TransformSettings(
                    max_shift=t.max_shift,
                    flip=t.flip,
                    scale=t.scale,
                    blur_sigma=t.blur_sigma,
                    noise_std=t.noise_std,
                    samples=t.samples,
                ),  # fmt: skip
                pgd=pgd_lib.PGDSettings(
                    epsilon=c.pgd.epsilon, step_size=c.pgd.step_size, steps=c.pgd.steps
                ),
                pgd_per_identity=c.pgd.per_identity,
                seed=t.seed,
                seeds_per_identity=seeds,
                face=tuple(face),
            )
        except JaxmiaError as e:  # the modules name their own fields; say where they are set
            raise JaxmiaError(f"config section judges.pgd / judges.transforms: {e}") from e


@dataclasses.dataclass(frozen=True)
class Panel:
    """The judges of one evaluation, fitted, and the held-out real photos they are checked on."""

    evaluator: LoadedRecognizer  # R_E: its label order is every judge's
    target: LoadedRecognizer | None  # R_T, for the PGD controls (its ranks: ``judges``' R_T)
    fitted: classical.Judges  # on R_E's real training photos, for the Fréchet distance
    real: np.ndarray  # held-out real photos of the attacked identities # [m, h, w, c]
    real_names: tuple[str, ...]  # [m] their identities
    settings: Settings
    notes: tuple[str, ...]
    judges: tuple[Judge, ...]  # fitted, in the order they run


# The fitted judges (``registry.Judge``).


@dataclasses.dataclass(frozen=True)
class RecognizerJudge:
    """A recognizer ranking the target by its softmax: R_T (beside the judges), R_E, R_E_other."""

    names: tuple[str]  # (its name in the registry,)
    recognizer: LoadedRecognizer
    labels: np.ndarray  # [k_E] its label of each of R_E's identities; -1: one it does not know
    identities: tuple[str, ...]  # [k_E] R_E's identities, to name the unknown ones

    def own_labels(self, targets: np.ndarray) -> np.ndarray:
        """Its labels of R_E's. # [n] -> [n]

        Raises:
          JaxmiaError: a target it does not know.
        """
        own = self.labels[targets]
        if (own < 0).any():
            unknown = sorted({self.identities[t] for t in targets[own < 0]})
            raise JaxmiaError(
                f"judges: the images include identities that "
                f"{getattr(self.recognizer, 'path', 'a judge')} does not know: "
                f"{', '.join(unknown[:5])}"
            )
        return own

    def rank(
        self, images: np.ndarray, targets: np.ndarray, *, batch_size: int = 256,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """``registry.Judge.rank``."""
        got = scores.score_images(
            self.recognizer, images, self.own_labels(targets), batch_size=batch_size,
            progress=progress, desc=self.names[0],
        )  # fmt: skip
        return {self.names[0]: got.rank}


def _recognizer_judge(name: str, recognizer: LoadedRecognizer, evaluator: LoadedRecognizer):
    index = {n: i for i, n in enumerate(recognizer.names)}
    labels = np.array([index.get(n, -1) for n in evaluator.names], np.int32)
    return RecognizerJudge((name,), recognizer, labels, tuple(evaluator.names))


@dataclasses.dataclass(frozen=True)
class TransformedJudge:
    """Recognizers' softmax averaged over random transforms (``jaxmia.judges.transformed``).

    The transforms are drawn and applied once for all its recognizers (R_E and R_E_other): they
    see the same transformed images.
    """

    recognizers: tuple[RecognizerJudge, ...]
    settings: transformed_lib.TransformSettings
    seed: int  # image i of a call is transformed with keys from fold_in(key(seed), i)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{r.names[0]}_transformed" for r in self.recognizers)

    def rank(
        self, images: np.ndarray, targets: np.ndarray, *, batch_size: int = 256,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """``registry.Judge.rank``."""
        got = transformed_lib.robust_scores_each(
            [r.recognizer for r in self.recognizers], images,
            [r.own_labels(targets) for r in self.recognizers], self.settings,
            jax.random.key(self.seed), batch_size=batch_size, progress=progress,
            desc="transformed",
        )  # fmt: skip
        return {name: g.rank for name, g in zip(self.names, got, strict=True)}


@dataclasses.dataclass(frozen=True)
class ClassicalJudge:
    """The judges that are not CNNs (``jaxmia.judges.classical``), with the KNN ratio and the
    residual energy as their measures."""

    fitted: classical.Judges
    names: tuple[str, ...] = classical.JUDGES

    def rank(
        self, images: np.ndarray, targets: np.ndarray, *, batch_size: int = 256,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """``registry.Judge.rank``: also "knn_ratio" and "residual_energy" [n]."""
        return classical.judge(self.fitted, images, targets)


@dataclasses.dataclass(frozen=True)
class FittedFaceModel:
    """A pretrained face recognizer with its gallery: R_E's real training photos, embedded."""

    name: str  # a key of FACE_MODELS
    embed: Callable[[np.ndarray], np.ndarray]  # aligned chips [n, 150, 150, 3] -> [n, d]
    gallery: face_lib.Gallery


@dataclasses.dataclass(frozen=True)
class FaceJudges:
    """The face judges of every face model, on chips aligned once for all of them."""

    models: tuple[FittedFaceModel, ...]  # in the order of settings.face

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(j for m in self.models for j in face_judge_names(m.name))

    def rank(
        self, images: np.ndarray, targets: np.ndarray, *, batch_size: int = 256,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """``registry.Judge.rank``: also ``FACE_DETECTED`` and ``FACE_DISTANCE`` + model [n]."""
        measured = face_measures(images, {m.name: m.embed for m in self.models}, progress=progress)
        out = {FACE_DETECTED: measured[FACE_DETECTED]}
        for m in self.models:
            got = face_lib.rank(m.gallery, measured[m.name], targets)
            nn, centroid = face_judge_names(m.name)
            out[nn], out[centroid] = got["nn"], got["centroid"]
            out[FACE_DISTANCE + m.name] = got["knn_dist"]
        return out


@functools.cache
def _face_embedder(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The face model, loaded once a process (its compiled functions kept with it)."""
    return FACE_MODELS[name].load()


def face_measures(
    images: np.ndarray, embedders: dict[str, Callable], *, progress: bool = False
) -> dict[str, np.ndarray]:
    """Aligned chips of images, each made once and embedded by every face model.

    Args:
      images: in [0, 1], grey or RGB; n >= 1. # [n, h, w, c]
      embedders: face model name -> its embedding of chips.
      progress: show a progress bar.

    Returns:
      {FACE_DETECTED: [n] bool, name: embeddings [n, d] for each face model}.
    """
    detected, embedded = [], {name: [] for name in embedders}
    starts = range(0, len(images), _CHIP_BATCH)
    for lo in tqdm(starts, desc="face judges", disable=not progress, unit="batch", leave=False):
        chips = face_lib.face_chips(images[lo : lo + _CHIP_BATCH])
        detected.append(chips.detected)
        n = len(chips.detected)
        padded = np.pad(chips.images, ((0, -n % EMBED_BATCH), (0, 0), (0, 0), (0, 0)))
        for name, embed in embedders.items():
            embedded[name].append(np.asarray(embed(padded), np.float64)[:n])
    return {FACE_DETECTED: np.concatenate(detected)} | {
        n: np.concatenate(e) for n, e in embedded.items()
    }


def _fit_face_judges(
    settings: Settings, gallery: np.ndarray, labels: np.ndarray, recognizer: LoadedRecognizer
) -> tuple[FaceJudges | None, list[str]]:
    """The face judges of ``settings.face`` fitted on R_E's real training photos (None: none),
    and notes.

    A model that cannot be had (not fetched, and no registry reachable) is left out with a note,
    so a machine without the weights still judges with the rest.
    """
    notes = []
    embedders = {}
    for name in settings.face:
        try:
            embedders[name] = _face_embedder(name)
        except fetch.FetchError as e:
            notes.append(f"face judge {name} not run: {e}")
    if not embedders:
        return None, notes
    k = recognizer.config.num_classes
    missing = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
    if len(missing):
        notes.append(
            f"face judges not run: R_E's real photos hold no photo of {len(missing)} of its {k} "
            f"identities (first: {recognizer.names[missing[0]]}); they rank among all of them"
        )
        return None, notes
    try:
        measured = face_measures(gallery, embedders)
    except fetch.FetchError as e:  # the shape predictor that aligns the chips
        notes.append(f"face judges not run: no face alignment: {e}")
        return None, notes
    fitted = FaceJudges(
        tuple(
            FittedFaceModel(
                name, embed, face_lib.fit(measured[name], labels, k, FACE_MODELS[name].metric)
            )
            for name, embed in embedders.items()
        )
    )
    detected = measured[FACE_DETECTED]
    notes.append(
        f"face judges ({', '.join(embedders)}): fitted on {len(gallery)} R_E training photos, "
        f"dlib's detector found a face in {100 * detected.mean():.1f}% of them"
        + (
            "; the photos are grey: the face judges see them as RGB (grey on all channels)"
            if gallery.shape[-1] == 1
            else ""
        )
    )
    return fitted, notes


def make_panel(
    evaluator: LoadedRecognizer,
    gallery: np.ndarray,
    gallery_names: list[str] | tuple[str, ...],
    real: np.ndarray,
    real_names: list[str] | tuple[str, ...],
    settings: Settings,
    *,
    other: LoadedRecognizer | None = None,
    target: LoadedRecognizer | None = None,
) -> Panel:
    """Fits every judge: the non-CNN judges and the face judges on R_E's real training photos.

    Args:
      evaluator: R_E; its label order is the judges' gallery order.
      gallery: R_E's real training photos. # [g, h, w, c]
      gallery_names: their identities (each known to R_E). # [g]
      real: held-out real photos of the attacked identities (none fitted on). # [m, h, w, c]
      real_names: their identities. # [m]
      settings: the judges' settings.
      other: a second R_E of another architecture, or None.
      target: R_T, or None (then no PGD controls).

    Raises:
      JaxmiaError: photos of another size than R_E takes, names R_E does not know, or too few
        photos for an eigenface space.
    """
    cfg = evaluator.config
    want = (*cfg.image_size, cfg.channels)
    if other is not None and (*other.config.image_size, other.config.channels) != want:
        o = other.config
        raise JaxmiaError(
            f"judges: the other R_E {getattr(other, 'path', '')} takes "
            f"{'x'.join(map(str, (*o.image_size, o.channels)))}, R_E takes "
            f"{'x'.join(map(str, want))}"
        )
    for what, images in (("R_E's real training photos", gallery), ("held-out photos", real)):
        if len(images) and tuple(images.shape[1:]) != want:
            raise JaxmiaError(
                f"judges: {what} are {'x'.join(map(str, images.shape[1:]))}, R_E takes "
                f"{'x'.join(map(str, want))}"
            )
    labels = _labels(gallery_names, evaluator, "R_E's real training photos")
    notes = []
    components = settings.eigenfaces
    if len(gallery) - 1 < components:
        if len(gallery) < 2:
            raise JaxmiaError(
                f"judges: {len(gallery)} real training photos of R_E; an eigenface space needs 2"
            )
        components = len(gallery) - 1
        notes.append(
            f"judges.eigenfaces={settings.eigenfaces}: {len(gallery)} real photos allow "
            f"{components} components, used"
        )
    fitted = classical.fit(
        classical.Gallery(np.asarray(gallery, np.float32), labels, cfg.num_classes), components
    )
    notes.append(
        f"eigenface space: {components} components of {len(gallery)} R_E training photos "
        f"({100 * fitted.eigenfaces.explained:.1f}% of their variance)"
    )
    face, face_notes = _fit_face_judges(
        settings, np.asarray(gallery, np.float32), labels, evaluator
    )
    notes += face_notes
    if not len(real):
        notes.append("no held-out real photos of the attacked identities: no ceiling control")
    if target is None:
        notes.append("no R_T: no PGD controls")
    # The order they run in: judge_groups gives their measures in it (the ranks in the
    # registry's order).
    cnns = tuple(
        _recognizer_judge(name, rec, evaluator)
        for name, rec in (("R_E", evaluator), ("R_E_other", other))
        if rec is not None
    )
    judges = (
        *(() if target is None else (_recognizer_judge("R_T", target, evaluator),)),
        *cnns,
        TransformedJudge(cnns, settings.transforms, settings.seed),
        ClassicalJudge(fitted),
        *(() if face is None else (face,)),
    )
    return Panel(
        evaluator=evaluator,
        target=target,
        fitted=fitted,
        real=np.asarray(real, np.float32),
        real_names=tuple(real_names),
        settings=settings,
        notes=tuple(notes),
        judges=judges,
    )


def panel_from_faces(
    evaluator: LoadedRecognizer,
    faces: FaceSet,
    identities: tuple[str, ...],
    settings: Settings,
    *,
    other: LoadedRecognizer | None = None,
    target: LoadedRecognizer | None = None,
) -> Panel:
    """The judges of ``jaxmia evaluate``: fitted on the face set's photos R_E trained on.

    The held-out real photos are those of the attacked ``identities`` that no given recognizer
    trained on (by the ``train_files`` their checkpoints record). Where the face set holds none
    of R_E's training files (another source), the judges are fitted on all its photos of R_E's
    identities and there is no held-out control (noted).
    """
    names = np.asarray(faces.names, object)[faces.labels]  # [n] each photo's identity
    known = np.isin(names, list(evaluator.names))
    files = np.asarray(faces.files or [""] * len(names), object)
    trained_e = np.isin(files, list(evaluator.meta.get("train_files") or ()))
    extra = []
    if trained_e.any():
        gallery = trained_e & known
        trained = trained_e.copy()
        for rec in (target, other):
            if rec is not None:
                trained |= np.isin(files, list(rec.meta.get("train_files") or ()))
        held_out = np.isin(names, list(identities)) & ~trained
    else:
        gallery, held_out = known, np.zeros(len(names), bool)
        extra.append(
            f"judges fitted on every photo of R_E's identities in {faces.source}: it holds none "
            "of R_E's training files"
        )
    panel = make_panel(
        evaluator, faces.images[gallery], list(names[gallery]), faces.images[held_out],
        list(names[held_out]), settings, other=other, target=target,
    )  # fmt: skip
    return dataclasses.replace(panel, notes=(*extra, *panel.notes))


def _labels(names, recognizer: LoadedRecognizer, what: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(recognizer.names)}
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        raise JaxmiaError(
            f"judges: {what} include identities that {getattr(recognizer, 'path', 'a judge')} "
            f"does not know: {', '.join(unknown[:5])}"
        )
    return np.array([index[n] for n in names], np.int32)


def pgd_controls(
    panel: Panel, seeds: np.ndarray, identities: tuple[str, ...], *, batch_size: int = 256
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The adversarial controls: the first seeds of each identity pushed towards it against R_T.

    Args:
      panel: the judges (its ``target`` must be set).
      seeds: each clone's seed. # [ids, clones, h, w, c]
      identities: the targets. # [ids]
      batch_size: images per compiled call.

    Returns:
      (images [ids * k, h, w, c], their targets' names), k = min(per_identity, clones).
    """
    k = min(panel.settings.pgd_per_identity, seeds.shape[1])
    start = seeds[:, :k].reshape(-1, *seeds.shape[2:])
    names = tuple(np.repeat(np.asarray(identities, object), k))
    if panel.target is None or k == 0:
        return start[:0], ()
    targets = _labels(names, panel.target, "the inversion's identities")
    images = pgd_lib.adversarial_controls(
        panel.target, start, targets, panel.settings.pgd, batch_size=batch_size
    )
    return images, names


def judge_groups(
    panel: Panel,
    groups: dict[str, tuple[np.ndarray, tuple[str, ...]]],
    *,
    known_r_e: dict[str, np.ndarray] | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """Every judge's rank of the target, and the realism measures, for each group of images.

    The groups are judged as one set of images, so each judge pads one last batch and compiles
    once, whatever the groups' sizes; R_E and R_E_other see the same random transforms.

    Args:
      panel: the judges.
      groups: group name -> (images [n, h, w, c], the target identity of each [n]).
      known_r_e: group name -> R_E's ranks of its images [n], where the caller has them (the
        evaluation scores the clones and seeds with R_E already): R_E scores only the others.
      batch_size: images per compiled call.
      progress: show progress bars.

    Returns:
      group -> {judge name -> ranks [n] (1 = top), in ``JUDGE_TITLES``' order, then "knn_ratio"
      [n], "residual_energy" [n], "frechet" and, with face judges, ``FACE_DETECTED`` [n] and
      ``FACE_DISTANCE`` + model [n]}.
    """
    cfg = panel.evaluator.config
    shape = (*cfg.image_size, cfg.channels)
    images = np.concatenate(
        [np.asarray(im, np.float32).reshape(-1, *shape) for im, _ in groups.values()]
    )  # [n, h, w, c]
    names = [name for _, group_names in groups.values() for name in group_names]
    bounds = np.cumsum([0, *(len(group_names) for _, group_names in groups.values())])
    spans = list(zip(groups, bounds[:-1], bounds[1:], strict=True))
    targets = _labels(names, panel.evaluator, "the images")  # [n] R_E's label of each
    given = {"R_E": known_r_e or {}}  # judge -> group -> its ranks the caller has
    found: dict[str, np.ndarray] = {}
    for judge in panel.judges:
        # a judge of one name does not score the groups whose ranks the caller has
        known = given.get(judge.names[0], {}) if len(judge.names) == 1 else {}
        todo = np.repeat([g not in known for g in groups], np.diff(bounds)).astype(bool)  # [n]
        got = {}
        if todo.any():
            got = judge.rank(images[todo], targets[todo], batch_size=batch_size, progress=progress)
        for key in dict.fromkeys((*judge.names, *got)):
            full = np.zeros(len(images), got[key].dtype if key in got else np.int32)  # [n]
            if key in got:
                full[todo] = got[key]
            for g, lo, hi in spans:
                if g in known:
                    full[lo:hi] = np.asarray(known[g]).reshape(-1)
            found[key] = full
    # the face judges first, as in every table
    found = {j: found[j] for j in JUDGE_TITLES if j in found} | {
        k: v for k, v in found.items() if k not in JUDGE_TITLES
    }
    out = {}
    for g, lo, hi in spans:
        out[g] = {j: v[lo:hi] for j, v in found.items()}
        out[g]["frechet"] = np.asarray(_frechet(panel, images[lo:hi]))
    return out


def _frechet(panel: Panel, images: np.ndarray) -> float:
    return classical.frechet_to_gallery(panel.fitted, images) if len(images) >= 2 else np.nan


def _mean(a: np.ndarray) -> float | None:
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def mean_top1(top1: dict[str, float], judges: tuple[str, ...] | list[str] = ROBUST) -> float | None:
    """The judges' mean: the mean top-1 of those of ``judges`` in ``top1`` (None if none is).

    Args:
      top1: judge name -> its top-1 on a group.
      judges: whose top-1 to average (the robust judges unless told).
    """
    got = [top1[j] for j in judges if j in top1]
    return float(np.mean(got)) if got else None


def summarise(verdicts: dict[str, dict[str, np.ndarray]], num_classes: int) -> dict[str, Any]:
    """The JSON-ready table: per group and judge top-1 / top-5, realism, adversarial inflation.

    Judges and realism measures come in ``JUDGE_TITLES``' order: the face judges first.
    """
    table: dict[str, dict[str, Any]] = {}
    realism: dict[str, dict[str, Any]] = {}
    for g, found in verdicts.items():
        ranks = {j: found[j] for j in JUDGE_TITLES if j in found}
        table[g] = {
            j: {
                "top1": float(np.mean(r <= 1)) if len(r) else None,
                "top5": float(np.mean(r <= 5)) if len(r) else None,
                "count": len(r),
            }
            for j, r in ranks.items()
        }
        ratio = np.asarray(found["knn_ratio"], np.float64)
        finite = ratio[np.isfinite(ratio)]
        realism[g] = {"count": len(ratio)}
        if FACE_DETECTED in found:
            realism[g]["face_detection_rate"] = _mean(found[FACE_DETECTED])
            realism[g] |= {
                k: _mean(v) for k, v in found.items() if k.startswith(FACE_DISTANCE)
            }  # the mean over the group: the field's "FaceNet distance"
        realism[g] |= {
            "frechet_eigenface": _mean(found["frechet"]),
            "knn_ratio_median": float(np.median(finite)) if finite.size else None,
            "knn_ratio_below_1": float(np.mean(finite < 1)) if finite.size else None,
            "residual_energy_mean": _mean(found["residual_energy"]),
        }
    judges_seen = [j for j in JUDGE_TITLES if any(j in t for t in table.values())]
    summary = {
        "judges": {j: JUDGE_TITLES[j] for j in judges_seen},
        "robust": [j for j in ROBUST if j in judges_seen],
        "groups": {g: GROUP_TITLES[g] for g in table},
        "top": table,
        "realism": realism,
        "chance_top1": 1 / num_classes,
    }
    clones = table.get("clones")
    if clones:
        robust_top1 = {j: clones[j]["top1"] for j in summary["robust"]}
        best = max(robust_top1, key=robust_top1.get)
        summary["inflation"] = {
            "adversarial_inflation": clones["R_E"]["top1"] - robust_top1[best],
            "most_generous_robust_judge": best,
            "per_judge": {j: clones["R_E"]["top1"] - v for j, v in robust_top1.items()},
        }
        if "R_E_other" in clones:
            other = clones["R_E_other"]["top1"]
            summary["inflation"]["vs_R_E_other"] = clones["R_E"]["top1"] - other
    return summary


def run(
    panel: Panel,
    clones: np.ndarray,
    seeds: np.ndarray,
    identities: tuple[str, ...],
    *,
    batch_size: int = 256,
    progress: bool = False,
    rank_e: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """All judges on an inversion's clones, its seeds and the controls.

    Args:
      panel: the fitted judges.
      clones: # [ids, clones, h, w, c]
      seeds: # [ids, clones, h, w, c]
      identities: the target of each row. # [ids]
      batch_size: images per compiled call.
      progress: show progress bars.
      rank_e: R_E's ranks of the clones and of the seeds (each [ids, clones]) where the caller
        has them: R_E does not score them again.

    Returns:
      (the summary of ``summarise`` with notes and seconds, per-clone ranks of every judge but
      R_E (the caller has those), the KNN ratio and residual energy, and with face judges
      whether a face was detected and each face model's KNN distance ``{name: [ids, clones]}``).
    """
    t0 = time.perf_counter()
    ids, n = clones.shape[:2]
    names = tuple(np.repeat(np.asarray(identities, object), n))
    pgd, pgd_names = pgd_controls(panel, seeds, identities, batch_size=batch_size)
    # the floor needs no more than a few seeds an identity: they sit near chance
    k = panel.settings.seeds_per_identity or n
    floor = seeds[:, :k]
    groups = {
        "clones": (clones.reshape(-1, *clones.shape[2:]), names),
        "seeds": (
            floor.reshape(-1, *floor.shape[2:]),
            tuple(np.repeat(np.asarray(identities, object), floor.shape[1])),
        ),
        "real": (panel.real, panel.real_names),
        "pgd": (pgd, pgd_names),
    }
    known = None if rank_e is None else {"clones": rank_e[0], "seeds": rank_e[1][:, :k]}
    verdicts = judge_groups(
        panel, groups, known_r_e=known, batch_size=batch_size, progress=progress
    )
    summary = summarise(verdicts, panel.evaluator.config.num_classes)
    summary["notes"] = list(panel.notes)
    summary["pgd"] = dataclasses.asdict(panel.settings.pgd) | {
        "per_identity": min(panel.settings.pgd_per_identity, n)
    }
    summary["transforms"] = dataclasses.asdict(panel.settings.transforms)
    summary["seeds_per_identity"] = floor.shape[1]
    summary["seconds"] = time.perf_counter() - t0
    found = verdicts["clones"]
    keys = [j for j in found if j in JUDGE_TITLES and j != "R_E"]
    keys += [k for k in found if k == FACE_DETECTED or k.startswith(FACE_DISTANCE)]
    keys += [k for k in ("knn_ratio", "residual_energy") if k in found]
    per_clone = {k: np.asarray(found[k]).reshape(ids, n) for k in keys}
    return summary, per_clone


def lines(judged: dict[str, Any] | None) -> list[str]:
    """What a command prints of the judges' summary (nothing if they did not run)."""
    if not judged:
        return []
    out = []
    for g, title in judged["groups"].items():
        if not next(iter(judged["top"][g].values()), {}).get("count"):
            continue  # no images in this group (no R_T: no PGD controls)
        cells = ", ".join(f"{j} {100 * v['top1']:.1f}%" for j, v in judged["top"][g].items())
        out.append(f"  {title}: {cells}")
    rates = {
        g: r["face_detection_rate"]
        for g, r in judged.get("realism", {}).items()
        if r.get("face_detection_rate") is not None
    }
    if rates:
        cells = ", ".join(f"{judged['groups'][g]} {100 * v:.1f}%" for g, v in rates.items())
        out.append(f"  a face found by dlib's detector: {cells}")
    inf = judged.get("inflation")
    if inf:
        out.append(
            f"adversarial inflation {100 * inf['adversarial_inflation']:.1f} points (R_E minus "
            f"{inf['most_generous_robust_judge']})"
        )
    return out
