"""Judges of clones that are not CNNs, and measures of how real the clones look.

A clone is made by gradient descent on a recognizer's input, and a CNN judge of the same
architecture is often fooled by the adversarial patterns that descent leaves. The judges here
are not gradient-trained: they are fitted on *real photos* (a ``Gallery``: R_E's real training
photos, in R_E's label order) and rank, for each image and its target identity, the target
among all gallery identities by distance (rank 1 = nearest):

- ``eigenface_nn``: the identity of the nearest photo in an eigenface space (a PCA of the
  photos' pixels);
- ``eigenface_mean``: the nearest identity's mean photo in that space;
- ``pixel_nn``: the identity of the nearest photo in raw pixels.

Small gradient patterns do not fool them: a perturbation of L-inf norm eps moves an image by at
most eps * sqrt(d) in pixels (its L2 norm), and its projection on the orthonormal eigenfaces by
no more, which is small against the distances between identities; a pattern must change the
face itself to move a clone to another identity. Fitted on R_E's training photos, they rank
among R_E's identities, so chance is R_E's (1 / num_classes).

Beside them, per image: the KNN ratio (eigenface distance to the target's nearest photo over
that to anyone else's: < 1 is "closer to the target than to anyone else") and the residual
energy (the fraction of the image's deviation from the mean photo that no eigenface holds: high
for patterns no face has). Per group of images: the Fréchet distance to the gallery photos,
FID's formula applied in the eigenface coefficient space, not in Inception features (which
cannot be downloaded here).

All host-side NumPy, in float64 where precision matters. Images are floats in [0, 1],
[n, h, w, c], flattened to [n, d].
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmia.errors import JaxmiaError

JUDGES = ("eigenface_nn", "eigenface_mean", "pixel_nn")

# float64 elements per intermediate array of class_distances (64 MB); a chunk holds a few.
_CHUNK = 2**23
# Where |q|^2 + |r|^2 - 2 q.r cancels below this fraction of |q|^2 + |r|^2, the expansion has
# lost more than 4 of float64's 16 digits: such pairs (near-duplicates) are recomputed exactly.
_CANCELLED = 1e-4


def _rows(images: np.ndarray) -> np.ndarray:
    """Images as float64 rows. # [n, ...] -> [n, d]"""
    images = np.asarray(images, np.float64)
    return images.reshape(images.shape[0], int(np.prod(images.shape[1:])))


# ---------------------------------------------------------------------------------------------
# Eigenfaces.


@dataclasses.dataclass(frozen=True)
class Eigenfaces:
    """A PCA of real photos' pixels."""

    mean: np.ndarray  # [d] the mean photo
    components: np.ndarray  # [k, d] orthonormal rows, by decreasing variance
    variance: np.ndarray  # [k] the photos' variance along each component (ddof=1)
    explained: float  # fraction of the photos' total variance the k components hold


def fit_eigenfaces(images: np.ndarray, n_components: int) -> Eigenfaces:
    """The first principal components of photos, by a thin SVD of the centred pixels.

    Args:
      images: real photos. # [m, h, w, c]
      n_components: how many components to keep, 1 .. min(m - 1, d).

    Raises:
      JaxmiaError: too few or too many components for the photos, or non-finite pixels.
    """
    x = _rows(images)  # [m, d]
    m, d = x.shape
    if n_components < 1:
        raise JaxmiaError(f"eigenface judge: {n_components} components; expected at least 1")
    # m photos span at most m - 1 directions around their mean
    if n_components > m - 1:
        raise JaxmiaError(
            f"eigenface judge: {n_components} components from {m} real photos; expected at "
            f"most {max(m - 1, 0)} (fewer components or more photos)"
        )
    if n_components > d:
        raise JaxmiaError(
            f"eigenface judge: {n_components} components of {d}-value photos; expected at most {d}"
        )
    bad = int(np.sum(~np.all(np.isfinite(x), axis=1)))
    if bad:
        raise JaxmiaError(
            f"eigenface judge: {bad} of {m} real photos hold NaN or Inf values (expected [0, 1])"
        )
    mean = x.mean(axis=0)  # [d]
    # thin SVD: [m, d] -> [m, r], [r], [r, d], r = min(m, d); a [d, d] covariance never forms
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    power = s**2  # [r]
    total = power.sum()
    return Eigenfaces(
        mean=mean,
        components=vt[:n_components],
        variance=power[:n_components] / (m - 1),
        # identical photos leave no variance outside any span
        explained=float(power[:n_components].sum() / total) if total > 0 else 1.0,
    )


def project(eig: Eigenfaces, images: np.ndarray) -> np.ndarray:
    """Eigenface coefficients of images. # [n, h, w, c] -> [n, k]"""
    return (_rows(images) - eig.mean) @ eig.components.T


def residual_energy(eig: Eigenfaces, images: np.ndarray) -> np.ndarray:
    """Fraction of each image's squared distance to the mean photo outside the eigenfaces' span.

    # [n, h, w, c] -> [n] in [0, 1]; 0 for the mean photo itself, NaN for a non-finite image.
    """
    centred = _rows(images) - eig.mean  # [n, d]
    # the residual itself rather than |x|^2 - |Px|^2: no cancellation for images near the span
    outside = centred - (centred @ eig.components.T) @ eig.components  # [n, d]
    total = np.einsum("nd,nd->n", centred, centred)  # [n]
    frac = np.divide(
        np.einsum("nd,nd->n", outside, outside), total, out=np.zeros_like(total), where=total != 0
    )
    return np.clip(frac, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Distances and ranks.


def class_distances(
    queries: np.ndarray, references: np.ndarray, labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """Euclidean distance from each query to the nearest reference of each class.

    # [n, d], [m, d], [m] -> [n, num_classes]; +inf for a class without references, NaN for a
    # non-finite query.

    The |q|^2 + |r|^2 - 2 q.r expansion (one matrix product) on data centred on the
    references' mean, in float64; the pairs where it cancels (near-duplicates) are recomputed
    from differences. Chunked over queries, so memory stays at a few times ``_CHUNK`` floats.
    """
    queries = np.asarray(queries, np.float64)
    references = np.asarray(references, np.float64)
    labels = np.asarray(labels)
    n, d = queries.shape
    out = np.full((n, num_classes), np.inf)
    if len(references) == 0:
        return out
    order = np.argsort(labels, kind="stable")
    # centred, the norms in the expansion are the data's spread rather than its offset from 0
    centre = references.mean(axis=0)  # [d]
    refs = references[order] - centre  # [m, d] sorted by class
    classes, starts = np.unique(labels[order], return_index=True)  # [p], [p]
    ref_sq = np.einsum("md,md->m", refs, refs)  # [m]
    rows = max(1, _CHUNK // max(len(refs), d))
    pairs = max(1, _CHUNK // max(d, 1))
    # a diverged (NaN or Inf) query is allowed: its distances come out NaN
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, n, rows):
            q = queries[lo : lo + rows] - centre  # [b, d]
            q_sq = np.einsum("bd,bd->b", q, q)  # [b]
            scale = q_sq[:, None] + ref_sq[None, :]  # [b, m]
            sq = scale - 2.0 * (q @ refs.T)  # [b, m]
            i, j = np.nonzero(sq < _CANCELLED * scale)
            for s in range(0, len(i), pairs):
                qi, rj = i[s : s + pairs], j[s : s + pairs]
                diff = q[qi] - refs[rj]  # [pairs, d]
                sq[qi, rj] = np.einsum("pd,pd->p", diff, diff)
            dist = np.sqrt(np.maximum(sq, 0.0))  # [b, m]; maximum keeps NaN
            out[lo : lo + len(q), classes] = np.minimum.reduceat(dist, starts, axis=1)
    return out


def distance_ranks(distances: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank of each row's target class by increasing distance, 1 = nearest. # [n, k], [n] -> [n]

    Ties count against the target (the rank is the number of classes at most as far), as in
    ``evaluation.target_ranks``; a row whose target distance is NaN or Inf ranks last (k).
    """
    distances = np.asarray(distances, np.float64)
    t = np.take_along_axis(distances, np.asarray(targets)[:, None], axis=1)  # [n, 1]
    rank = np.sum(distances <= t, axis=1, dtype=np.int32)
    return np.where(np.isfinite(t[:, 0]), rank, np.int32(distances.shape[1]))


def nearest_neighbour_ranks(
    gallery_x: np.ndarray,
    gallery_labels: np.ndarray,
    queries: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
) -> np.ndarray:
    """Rank of each query's target by its nearest gallery vector.

    # [m, d], [m], [n, d], [n] -> [n]
    """
    return distance_ranks(class_distances(queries, gallery_x, gallery_labels, num_classes), targets)


def class_mean_ranks(
    gallery_x: np.ndarray,
    gallery_labels: np.ndarray,
    queries: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
) -> np.ndarray:
    """Rank of each query's target by the nearest class mean. # [m, d], [m], [n, d], [n] -> [n]

    A class without gallery vectors has no mean and is never nearer than the target.
    """
    gallery_x = np.asarray(gallery_x, np.float64)
    gallery_labels = np.asarray(gallery_labels)
    classes, inverse = np.unique(gallery_labels, return_inverse=True)  # [p], [m]
    sums = np.zeros((len(classes), gallery_x.shape[1]))  # [p, d]
    np.add.at(sums, inverse, gallery_x)
    means = sums / np.bincount(inverse, minlength=len(classes))[:, None]  # [p, d]
    return nearest_neighbour_ranks(means, classes, queries, targets, num_classes)


def knn_ratio(distances: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distance to the target's nearest reference over that to any other class'. # [n, k] -> [n]

    < 1: closer to the target than to anyone else. 0 where no other class has references; inf
    where the target has none, or another class' reference coincides with the query; NaN where
    undefined (both 0 or both inf, or a non-finite query).
    """
    distances = np.asarray(distances, np.float64)
    rows = np.arange(len(distances))
    targets = np.asarray(targets)
    own = distances[rows, targets]  # [n]
    others = distances.copy()
    others[rows, targets] = np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        return own / others.min(axis=1, initial=np.inf)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula between Gaussians fitted to two feature sets. # [n, d], [m, d] -> scalar

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}) with sample
    covariances (ddof=1). The square roots come from symmetric eigendecompositions, their tiny
    negative eigenvalues (rounding) clipped to 0. NaN if a feature is not finite.

    Raises:
      JaxmiaError: fewer than 2 vectors in a set (no covariance), or different dimensions.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise JaxmiaError(
            f"Fréchet distance: sets of {len(a)} and {len(b)} feature vectors; expected at "
            "least 2 in each (a covariance needs 2)"
        )
    if a.shape[1] != b.shape[1]:
        raise JaxmiaError(
            f"Fréchet distance: features of {a.shape[1]} and {b.shape[1]} dimensions; expected "
            "the same"
        )
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))  # [d, d]
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))  # [d, d]
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T  # [d, d] S_a^{1/2}
    inner = root_a @ cov_b @ root_a
    # symmetric in exact arithmetic; averaging with its transpose keeps eigh's input so
    cross = np.sqrt(np.maximum(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0)).sum()
    mean_gap = np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2)
    fd = mean_gap + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross
    # rounding can leave identical sets a hair below 0
    return float(max(fd, 0.0))


# ---------------------------------------------------------------------------------------------
# The fitted judges.


@dataclasses.dataclass(frozen=True)
class Gallery:
    """Real photos of known identities that the judges are fitted on."""

    images: np.ndarray  # [m, h, w, c] real photos in [0, 1]
    labels: np.ndarray  # [m] int in [0, num_classes): R_E's label order
    num_classes: int

    def __post_init__(self):
        shape = np.shape(self.images)
        if len(shape) != 4 or shape[0] == 0:
            raise JaxmiaError(
                f"judges' gallery: photos of shape {shape}; expected [m, h, w, c] with m >= 1"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int | np.integer):
            raise JaxmiaError(f"judges' gallery: num_classes {self.num_classes!r}; expected int")
        if self.num_classes < 1:
            raise JaxmiaError(
                f"judges' gallery: num_classes {self.num_classes}; expected at least 1"
            )
        labels = np.asarray(self.labels)
        if labels.shape != (shape[0],):
            raise JaxmiaError(
                f"judges' gallery: labels of shape {labels.shape} for {shape[0]} photos; "
                f"expected ({shape[0]},)"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise JaxmiaError(f"judges' gallery: labels of dtype {labels.dtype}; expected ints")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise JaxmiaError(
                f"judges' gallery: labels span {labels.min()}..{labels.max()}; expected 0.."
                f"{self.num_classes - 1} ({self.num_classes} classes)"
            )


@dataclasses.dataclass(frozen=True)
class Judges:
    """The fitted non-CNN judges."""

    gallery: Gallery
    eigenfaces: Eigenfaces
    coefficients: np.ndarray  # [m, k] the gallery photos projected


def fit(gallery: Gallery, n_components: int) -> Judges:
    """Fits the eigenface space on the gallery photos and projects them.

    Raises:
      JaxmiaError: as ``fit_eigenfaces``.
    """
    eig = fit_eigenfaces(gallery.images, n_components)
    return Judges(gallery=gallery, eigenfaces=eig, coefficients=project(eig, gallery.images))


def _check_images(judges: Judges, images: np.ndarray, what: str) -> None:
    want = judges.gallery.images.shape[1:]
    got = np.shape(images)
    if len(got) != 4 or got[1:] != want:
        raise JaxmiaError(
            f"{what}: images of shape {got}; expected [n, {', '.join(map(str, want))}] like "
            f"the gallery's real photos {judges.gallery.images.shape}"
        )


def judge(judges: Judges, images: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Every judge's rank of each image's target, and the realism measures.

    Args:
      judges: the fitted judges.
      images: in [0, 1], the gallery photos' shape. # [n, h, w, c]
      targets: each image's target in the gallery's label order. # [n]

    Returns:
      {"eigenface_nn", "eigenface_mean", "pixel_nn": ranks [n] (1 = top), "knn_ratio": [n] (in
      eigenface space), "residual_energy": [n]}.

    Raises:
      JaxmiaError: images of another shape than the gallery's, or targets that do not fit.
    """
    _check_images(judges, images, "judges")
    targets = np.asarray(targets)
    k = judges.gallery.num_classes
    if targets.shape != (len(images),):
        raise JaxmiaError(
            f"judges: targets of shape {targets.shape} for {len(images)} images; expected "
            f"({len(images)},)"
        )
    if len(targets) and (targets.min() < 0 or targets.max() >= k):
        raise JaxmiaError(
            f"judges: targets span {targets.min()}..{targets.max()}; expected 0..{k - 1}"
        )
    labels = judges.gallery.labels
    coefficients = project(judges.eigenfaces, images)  # [n, k_eig]
    eigen = class_distances(coefficients, judges.coefficients, labels, k)  # [n, classes]
    return {
        "eigenface_nn": distance_ranks(eigen, targets),
        "eigenface_mean": class_mean_ranks(judges.coefficients, labels, coefficients, targets, k),
        "pixel_nn": nearest_neighbour_ranks(
            _rows(judges.gallery.images), labels, _rows(images), targets, k
        ),
        "knn_ratio": knn_ratio(eigen, targets),
        "residual_energy": residual_energy(judges.eigenfaces, images),
    }


def frechet_to_gallery(judges: Judges, images: np.ndarray) -> float:
    """Fréchet distance between images and the gallery photos in eigenface coefficients.

    FID's method in the eigenface coefficient space of the judges (``Judges.coefficients``),
    not in Inception features: 0 for images distributed like the real photos.

    Raises:
      JaxmiaError: images of another shape than the gallery's, or fewer than 2.
    """
    _check_images(judges, images, "Fréchet distance to the gallery")
    return frechet_distance(project(judges.eigenfaces, images), judges.coefficients)
