"""The face judge: a pretrained face recognizer's embedding of aligned face chips, ranked.

The field judges a reconstruction with a face recognizer trained on millions of *other* people:
is the image, to it, the target person? Here that recognizer is dlib's ResNet-29 face embedder
(``jaxmia.pretrained.dlib_resnet``), fed the way dlib feeds it:

1. ``face_chips``: dlib's HOG face detector finds the face (a fixed central box where it finds
   none, recorded as ``detected=False``: the rate of detected faces is itself a verdict), the
   5-point shape predictor places eyes and nose in that box, and ``dlib.get_face_chip`` cuts a
   150x150 chip aligned on them. Host-side NumPy and dlib, outside any gradient path.
2. an embedder maps chips to vectors (128-d for dlib);
3. ``fit`` keeps real photos' embeddings of known identities (a ``Gallery``: R_E's real training
   photos, in R_E's label order) and ``rank`` ranks each image's target among all gallery
   identities (rank 1 = the target first), by the nearest photo of each identity and by the
   nearest identity centroid, with the distance to the target's nearest photo (the field's "KNN
   distance").

Ties count against the target, as in ``jaxmia.judges.classical.distance_ranks``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np

from jaxmia.errors import JaxmiaError
from jaxmia.judges import classical

CHIP_SIZE = 150
CHIP_PADDING = 0.25  # compute_face_descriptor's default for dlib_face_recognition_resnet_model_v1
METRICS = ("euclidean", "cosine")
# HOG's sliding window finds faces of about 80 px and up; smaller images are upsampled (dlib's
# image pyramid, x2 per step) until their shorter side reaches this. Measured on AT&T (92x112)
# and CelebA (128x128) photos resized to 64x64: 0 steps find 0-4% of faces, 1 step 86-89%,
# 2 steps 87-90% at 4x the time.
_DETECT_MIN_SIDE = 128
# The fixed box where no face is found: a central square of this fraction of the shorter side.
# The detector's boxes on real AT&T and CelebA photos (faces filling the frame) are squares of
# 0.65-0.85 of the shorter side around the centre. With this box for every held-out 64x64
# photo (detector off), dlib's nearest gallery photo is still the right person for 95.8% of
# AT&T and 94.0% of CelebA (50 people) photos: the landmarks, not the box, align the chip.
_FALLBACK_SIDE = 0.75
_CHUNK = 2**22  # float64 differences held at once by the distances (32 MB)


# ---------------------------------------------------------------------------------------------
# Aligned chips.


@dataclasses.dataclass(frozen=True)
class Chips:
    """Face chips aligned the way dlib's face embedder expects."""

    images: np.ndarray  # [n, 150, 150, 3] float32 in [0, 1] (uint8 values / 255)
    detected: np.ndarray  # [n] bool: the HOG detector found a face (else the fixed box)


@functools.cache
def _dlib_models():
    import dlib  # noqa: PLC0415 - dlib is needed only by the face judge

    from jaxmia.pretrained import fetch  # noqa: PLC0415

    path = fetch.model_files("dlib_landmarks5")["shape_predictor_5_face_landmarks.dat"]
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path))


def _upsampling(h: int, w: int) -> int:
    """dlib pyramid steps (x2 each) for the shorter side to reach ``_DETECT_MIN_SIDE``."""
    return max(0, math.ceil(math.log2(_DETECT_MIN_SIDE / min(h, w))))


def to_uint8_rgb(images: np.ndarray, what: str = "face judge") -> np.ndarray:
    """Images in [0, 1] as uint8 RGB, grey repeated on 3 channels. # [n,h,w,c] -> [n,h,w,3]

    Values are rounded (jaxmia's photos are uint8 / 255, so they come back exactly); NaN
    becomes 0.

    Raises:
      JaxmiaError: not [n, h, w, 1 or 3].
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise JaxmiaError(
            f"{what}: images of shape {images.shape}; expected [n, h, w, c] with c 1 or 3"
        )
    u8 = np.rint(np.nan_to_num(np.clip(images, 0.0, 1.0), nan=0.0) * 255.0).astype(np.uint8)
    return np.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8


def face_chips(images: np.ndarray) -> Chips:
    """dlib-aligned 150x150 face chips of images.

    Grey images are converted to RGB (the grey value on all three channels): dlib's embedder
    takes RGB only. Each image goes to dlib's HOG face detector (upsampled when its shorter
    side is under 128 px; the largest face is kept); where it finds none, a fixed central
    square of 0.75 of the shorter side stands in for the face's box and ``detected`` is False.
    The 5-point shape predictor places the landmarks in the box, and ``dlib.get_face_chip``
    (size 150, padding 0.25, as ``compute_face_descriptor`` uses) cuts the aligned chip.

    Args:
      images: float32 in [0, 1]. # [n, h, w, c], c in (1, 3)

    Returns:
      The chips ([n, 150, 150, 3] float32 in [0, 1]) and which images had a face detected.

    Raises:
      JaxmiaError: images not [n, h, w, 1 or 3].
    """
    dlib, detector, predictor = _dlib_models()
    u8 = to_uint8_rgb(images, "face judge: face_chips")  # [n, h, w, 3]
    n, h, w, _ = u8.shape
    up = _upsampling(h, w)
    side = _FALLBACK_SIDE * min(h, w)
    left, top = round((w - side) / 2), round((h - side) / 2)
    fixed = dlib.rectangle(left, top, left + round(side) - 1, top + round(side) - 1)
    out = np.empty((n, CHIP_SIZE, CHIP_SIZE, 3), np.float32)
    detected = np.zeros(n, bool)
    for i in range(n):
        img = np.ascontiguousarray(u8[i])
        boxes = detector(img, up)
        if len(boxes):
            box, detected[i] = max(boxes, key=lambda b: b.area()), True
        else:
            box = fixed
        shape = predictor(img, box)
        chip = dlib.get_face_chip(img, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
        out[i] = np.asarray(chip, np.float32) / 255.0
    return Chips(images=out, detected=detected)


# ---------------------------------------------------------------------------------------------
# The gallery and ranks.


@dataclasses.dataclass(frozen=True)
class Gallery:
    """A fitted face judge: real photos' embeddings of known identities."""

    embeddings: np.ndarray  # [g, d] float64
    labels: np.ndarray  # [g] int in [0, num_classes): R_E's label order
    num_classes: int
    metric: str  # "euclidean" or "cosine" (1 - cosine similarity)


def fit(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, metric: str) -> Gallery:
    """A gallery of real photos' embeddings, every identity present.

    Args:
      embeddings: of real photos. # [g, d]
      labels: each photo's identity. # [g]
      num_classes: identities 0 .. num_classes - 1, each with at least one photo.
      metric: "euclidean", or "cosine" (distance 1 - cosine similarity).

    Raises:
      JaxmiaError: an unknown metric, shapes that do not fit, non-finite embeddings (or zero
        ones under cosine), labels out of range, or an identity without a photo.
    """
    if metric not in METRICS:
        raise JaxmiaError(f"face judge: metric {metric!r}; expected one of {', '.join(METRICS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise JaxmiaError(f"face judge: num_classes {num_classes!r}; expected an int")
    if num_classes < 1:
        raise JaxmiaError(f"face judge: num_classes {num_classes}; expected at least 1")
    x = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) == 0:
        raise JaxmiaError(
            f"face judge: gallery embeddings of shape {x.shape}; expected [g, d] with g >= 1"
        )
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
        raise JaxmiaError(
            f"face judge: gallery labels of shape {labels.shape} and dtype {labels.dtype}; "
            f"expected ({len(x)},) ints"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise JaxmiaError(
            f"face judge: gallery labels span {labels.min()}..{labels.max()}; expected "
            f"0..{num_classes - 1}"
        )
    missing = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
    if len(missing):
        raise JaxmiaError(
            f"face judge: a judge gallery with an identity missing: no photo of "
            f"{len(missing)} of {num_classes} identities (first: {missing[0]}); expected at "
            f"least one photo of each"
        )
    if not np.all(np.isfinite(x)):
        raise JaxmiaError("face judge: gallery embeddings hold NaN or Inf; expected finite")
    if metric == "cosine" and np.any(np.linalg.norm(x, axis=1) == 0):
        raise JaxmiaError("face judge: a zero gallery embedding has no cosine; expected nonzero")
    return Gallery(embeddings=x, labels=labels, num_classes=int(num_classes), metric=metric)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to norm 1; a zero row becomes NaN (no direction). # [n, d] -> [n, d]"""
    with np.errstate(divide="ignore", invalid="ignore"):
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def _nearest_by_class(
    queries: np.ndarray, references: np.ndarray, labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """Euclidean distance to each class' nearest reference. # [n, d], [m, d], [m] -> [n, k]

    From the differences themselves, not the |q|^2 + |r|^2 - 2 q.r expansion: embeddings are
    short (d ~ 128), and equal distances then come out equal (ties are exact). Chunked over
    queries to about ``_CHUNK`` floats. NaN for a non-finite query.
    """
    n, d = queries.shape
    out = np.empty((n, num_classes))
    order = np.argsort(labels, kind="stable")
    refs = references[order]  # [m, d] sorted by class; every class present (``fit``)
    starts = np.searchsorted(labels[order], np.arange(num_classes))  # [k]
    rows = max(1, _CHUNK // max(len(refs) * d, 1))
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, n, rows):
            diff = queries[lo : lo + rows, None, :] - refs[None]  # [b, m, d]
            dist = np.sqrt(np.einsum("bmd,bmd->bm", diff, diff))  # [b, m]
            out[lo : lo + rows] = np.minimum.reduceat(dist, starts, axis=1)
    return out


def _class_distances(gallery: Gallery, queries: np.ndarray, references: np.ndarray, labels):
    """Metric distance to each class' nearest reference. # [n, d], [m, d], [m] -> [n, k]"""
    if gallery.metric == "euclidean":
        return _nearest_by_class(queries, references, labels, gallery.num_classes)
    # between unit vectors |u - v|^2 = 2 (1 - cos): the same order, and 1 - cos exactly
    euclid = _nearest_by_class(_unit(queries), _unit(references), labels, gallery.num_classes)
    return euclid**2 / 2.0


def rank(gallery: Gallery, embeddings: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Each image's target ranked among the gallery's identities (1 = the target first).

    Args:
      gallery: the fitted judge.
      embeddings: of the images judged. # [n, d]
      targets: each image's identity in the gallery's label order. # [n]

    Returns:
      {"nn": [n] int32 rank of the target by the nearest photo of each identity,
       "centroid": [n] int32 rank by the nearest identity centroid (under cosine, the mean of
         the photos' unit vectors),
       "knn_dist": [n] float64 distance (the gallery's metric) to the target's nearest photo}.
      Ties count against the target; a non-finite embedding ranks last, its distance NaN.

    Raises:
      JaxmiaError: embeddings of another dimension than the gallery's, or targets that do not
        fit.
    """
    x = np.asarray(embeddings, np.float64)
    d = gallery.embeddings.shape[1]
    if x.ndim != 2 or x.shape[1] != d:
        raise JaxmiaError(f"face judge: embeddings of shape {x.shape}; expected [n, {d}]")
    targets = np.asarray(targets)
    k = gallery.num_classes
    if targets.shape != (len(x),) or (len(x) and not np.issubdtype(targets.dtype, np.integer)):
        raise JaxmiaError(
            f"face judge: targets of shape {targets.shape} and dtype {targets.dtype} for "
            f"{len(x)} embeddings; expected ({len(x)},) ints"
        )
    if len(targets) and (targets.min() < 0 or targets.max() >= k):
        raise JaxmiaError(
            f"face judge: targets span {targets.min()}..{targets.max()}; expected 0..{k - 1}"
        )
    labels = gallery.labels
    near = _class_distances(gallery, x, gallery.embeddings, labels)  # [n, k]
    refs = gallery.embeddings if gallery.metric == "euclidean" else _unit(gallery.embeddings)
    sums = np.zeros((k, d))
    np.add.at(sums, labels, refs)
    centroids = sums / np.bincount(labels, minlength=k)[:, None]  # [k, d]
    central = _class_distances(gallery, x, centroids, np.arange(k))  # [n, k]
    return {
        "nn": classical.distance_ranks(near, targets),
        "centroid": classical.distance_ranks(central, targets),
        "knn_dist": np.take_along_axis(near, targets[:, None].astype(np.intp), axis=1)[:, 0],
    }


# ---------------------------------------------------------------------------------------------
# End to end.

Embedder = Callable[[Chips], np.ndarray]  # chips -> [n, d] embeddings


def dlib_embedder(batch_size: int = 32) -> Embedder:
    """dlib's ResNet-29 descriptors of chips (``jaxmia.pretrained.dlib_resnet``, loaded once).

    Raises:
      JaxmiaError: the ``dlib_resnet`` model cannot be had (see ``jaxmia models fetch``).
    """
    from jaxmia.pretrained import dlib_resnet  # noqa: PLC0415 - JAX only when a judge is made

    model = dlib_resnet.load_dlib_resnet()

    def embed(chips: Chips) -> np.ndarray:
        return dlib_resnet.embed_chips(model, chips, batch_size=batch_size)

    return embed


def fit_images(
    embed: Embedder, images: np.ndarray, labels: np.ndarray, num_classes: int, metric: str
) -> Gallery:
    """``fit`` on the embeddings of real photos' chips. # [g, h, w, c] in [0, 1], [g]

    Raises:
      JaxmiaError: as ``face_chips`` and ``fit``.
    """
    return fit(embed(face_chips(images)), labels, num_classes, metric)


def judge_images(
    gallery: Gallery, embed: Embedder, images: np.ndarray, targets: np.ndarray
) -> dict[str, np.ndarray]:
    """``rank``'s verdicts on images, and whether a face was detected in each.

    Args:
      gallery: the fitted judge (embeddings by the same ``embed``).
      embed: chips -> embeddings, such as ``dlib_embedder()``.
      images: in [0, 1], grey or RGB, any size. # [n, h, w, c]
      targets: each image's identity in the gallery's label order. # [n]

    Returns:
      {"nn", "centroid": [n] ranks (1 = the target first), "knn_dist": [n], "detected": [n]
      bool}.

    Raises:
      JaxmiaError: as ``face_chips`` and ``rank``.
    """
    chips = face_chips(images)
    return {**rank(gallery, embed(chips), targets), "detected": chips.detected}
