"""Tests of jaxmia.judges.classical against hand-derived and brute-force references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from jaxmia.errors import JaxmiaError
from jaxmia.judges import classical


def as_images(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return x.reshape(len(x), h, w, 1)


# ---------------------------------------------------------------------------------------------
# Eigenfaces.


def test_eigenfaces_match_the_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    # anisotropic, so the eigenvalues are distinct and the eigenvectors defined up to sign
    x = rng.normal(size=(30, 4)) * np.array([3.0, 2.0, 1.0, 0.5]) + 0.5  # [m, d]
    eig = classical.fit_eigenfaces(as_images(x, 2, 2), 3)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    values, vectors = values[::-1], vectors[:, ::-1]  # decreasing

    np.testing.assert_allclose(eig.components @ eig.components.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(eig.mean, x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(eig.variance, values[:3], rtol=1e-10)
    np.testing.assert_allclose(np.abs(eig.components @ vectors[:, :3]), np.eye(3), atol=1e-10)
    assert eig.explained == pytest.approx(values[:3].sum() / values.sum(), rel=1e-12)


def test_project_gives_coordinates_along_the_components():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(10, 9))
    eig = classical.fit_eigenfaces(as_images(x, 3, 3), 2)
    coeffs = classical.project(eig, as_images(x, 3, 3))
    assert coeffs.shape == (10, 2)
    np.testing.assert_allclose(coeffs, (x - x.mean(0)) @ eig.components.T, atol=1e-12)
    # the photos' coefficients have the fitted variance
    np.testing.assert_allclose(coeffs.var(axis=0, ddof=1), eig.variance, rtol=1e-10)


def test_residual_energy_in_the_span_orthogonal_to_it_and_at_the_mean():
    # photos on the plane of e0, e1, in +- pairs so that their mean is exactly `mean`
    rng = np.random.default_rng(2)
    mean = np.full(4, 0.5)
    offsets = rng.normal(size=(6, 2)) @ np.eye(4)[:2]
    x = mean + np.concatenate([offsets, -offsets])
    eig = classical.fit_eigenfaces(as_images(x, 2, 2), 2)
    assert eig.explained == pytest.approx(1.0)
    queries = np.stack(
        [
            mean + np.array([0.3, -0.2, 0.0, 0.0]),  # in the span
            mean + np.array([0.0, 0.0, 0.1, -0.4]),  # orthogonal to it
            mean + np.array([0.1, 0.0, 0.1, 0.0]),  # half and half
            mean,  # no deviation at all
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = classical.residual_energy(eig, as_images(queries, 2, 2))
    np.testing.assert_allclose(r, [0.0, 1.0, 0.5, 0.0], atol=1e-12)


def test_residual_energy_of_a_nan_image_is_nan():
    eig = classical.fit_eigenfaces(as_images(np.eye(4), 2, 2), 2)
    image = np.full((1, 2, 2, 1), np.nan)
    assert np.isnan(classical.residual_energy(eig, image)[0])


@pytest.mark.parametrize(
    ("m", "k", "message"),
    [
        (
            12,
            40,
            "eigenface judge: 40 components from 12 real photos; expected at most 11 "
            "(fewer components or more photos)",
        ),
        (12, 12, "12 components from 12 real photos; expected at most 11"),
        (12, 0, "eigenface judge: 0 components; expected at least 1"),
        (20, 10, "10 components of 9-value photos; expected at most 9"),
    ],
)
def test_fit_eigenfaces_rejects_impossible_component_counts(m, k, message):
    x = np.random.default_rng(3).uniform(size=(m, 3, 3, 1))
    with pytest.raises(JaxmiaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        classical.fit_eigenfaces(x, k)


def test_fit_eigenfaces_rejects_non_finite_photos():
    x = np.random.default_rng(4).uniform(size=(5, 2, 2, 1))
    x[2, 0, 0, 0] = np.nan
    with pytest.raises(JaxmiaError, match="1 of 5 real photos hold NaN or Inf"):
        classical.fit_eigenfaces(x, 2)


# ---------------------------------------------------------------------------------------------
# Distances and ranks.


def brute_class_distances(q, r, labels, k):
    out = np.full((len(q), k), np.inf)
    for i in range(len(q)):
        for j in range(len(r)):
            d = np.sqrt(np.sum((q[i] - r[j]) ** 2))
            out[i, labels[j]] = min(out[i, labels[j]], d)
    return out


@pytest.mark.parametrize("chunk", [None, 7])
def test_class_distances_match_a_double_loop(monkeypatch, chunk):
    if chunk is not None:  # several chunks of queries and of recomputed pairs
        monkeypatch.setattr(classical, "_CHUNK", chunk * 5)
    rng = np.random.default_rng(5)
    q = rng.uniform(size=(9, 5))
    r = rng.uniform(size=(11, 5))
    labels = rng.permutation(np.arange(11) % 4)  # classes 0..3 in mixed order; class 4 empty
    q[3] = r[6]  # an exact duplicate: distance 0
    got = classical.class_distances(q, r, labels, 5)
    want = brute_class_distances(q, r, labels, 5)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert np.all(np.isinf(got[:, 4]))
    assert got[3, labels[6]] == 0.0


def test_class_distances_of_a_near_duplicate_are_accurate():
    # far from the origin, where |q|^2 + |r|^2 - 2 q.r alone would lose the answer
    rng = np.random.default_rng(6)
    d = 256
    r = 0.5 + 0.01 * rng.normal(size=(6, d))
    sign = rng.choice([-1.0, 1.0], size=d)
    q = r[2] + 1e-6 * sign  # differs by 1e-6 in every value
    got = classical.class_distances(q[None], r, np.arange(6), 6)
    # the expansion alone, even centred, is off by ~1e-8 here
    assert got[0, 2] == pytest.approx(1e-6 * np.sqrt(d), rel=1e-10)


def test_class_distances_without_references_are_inf():
    got = classical.class_distances(np.zeros((3, 2)), np.zeros((0, 2)), np.zeros(0, int), 4)
    assert got.shape == (3, 4) and np.all(np.isinf(got))


def test_class_distances_of_a_nan_query_are_nan():
    r = np.eye(3)
    q = np.array([[np.nan, 0.0, 0.0], [1.0, 0.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = classical.class_distances(q, r, np.array([0, 1, 2]), 3)
    assert np.all(np.isnan(got[0]))
    np.testing.assert_allclose(got[1], [0.0, np.sqrt(2), np.sqrt(2)], atol=1e-15)


@pytest.mark.parametrize(
    ("distances", "target", "rank"),
    [
        ([1.0, 2.0, 4.0], 0, 1),
        ([1.0, 2.0, 4.0], 2, 3),
        ([3.0, 2.0, 4.0, 0.5], 1, 2),
        ([2.0, 2.0, 4.0], 0, 2),  # a tie counts against the target
        ([2.0, 2.0, 2.0], 2, 3),
        ([1.0, np.inf, 4.0], 1, 3),  # no photo of the target: last
        ([1.0, np.nan, 4.0], 1, 3),
        ([np.nan, np.nan, np.nan], 0, 3),
        ([1.0, np.inf, 4.0], 2, 2),  # a class without photos is never nearer
    ],
)
def test_distance_ranks(distances, target, rank):
    assert classical.distance_ranks(np.array([distances]), np.array([target]))[0] == rank


def test_distance_ranks_of_many_rows_and_of_none():
    d = np.array([[1.0, 2.0, 4.0], [5.0, 2.0, 4.0]])
    np.testing.assert_array_equal(classical.distance_ranks(d, np.array([2, 0])), [3, 3])
    assert classical.distance_ranks(np.zeros((0, 3)), np.zeros(0, int)).shape == (0,)


def test_nearest_neighbour_and_class_mean_ranks_can_disagree():
    # class 0: photos at -1 and +1 (mean 0); class 1: one photo at 0.8
    gallery = np.array([[-1.0], [1.0], [0.8]])
    labels = np.array([0, 0, 1])
    queries = np.array([[0.95], [0.1]])
    targets = np.array([0, 0])
    nn = classical.nearest_neighbour_ranks(gallery, labels, queries, targets, 3)
    mean = classical.class_mean_ranks(gallery, labels, queries, targets, 3)
    # 0.95: nearest photo 1.0 (class 0), nearest mean 0.8 (class 1)
    # 0.1: nearest photo 0.8 (class 1), nearest mean 0 (class 0)
    np.testing.assert_array_equal(nn, [1, 2])
    np.testing.assert_array_equal(mean, [2, 1])
    # class 2 has no photos: its target ranks last
    assert classical.class_mean_ranks(gallery, labels, queries[:1], np.array([2]), 3)[0] == 3


@pytest.mark.parametrize(
    ("distances", "target", "ratio"),
    [
        ([1.0, 2.0, 4.0], 0, 0.5),
        ([1.0, 2.0, 4.0], 1, 2.0),
        ([1.0, 2.0, 4.0], 2, 4.0),
        ([1.0, np.inf, np.inf], 0, 0.0),  # nobody else has photos
        ([np.inf, 2.0, 4.0], 0, np.inf),  # the target has none
        ([1.0, 0.0, 4.0], 0, np.inf),
        ([0.0, 0.0, 4.0], 0, np.nan),
        ([np.inf, np.inf, np.inf], 0, np.nan),
        ([np.nan, np.nan, np.nan], 0, np.nan),
    ],
)
def test_knn_ratio(distances, target, ratio):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = classical.knn_ratio(np.array([distances]), np.array([target]))[0]
    np.testing.assert_equal(got, ratio)


# ---------------------------------------------------------------------------------------------
# Fréchet distance.


def test_frechet_distance_of_identical_sets_is_zero():
    a = np.random.default_rng(7).normal(size=(50, 6))
    assert classical.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_in_one_dimension_is_the_closed_form():
    rng = np.random.default_rng(8)
    a = rng.normal(1.0, 2.0, size=(200, 1))
    b = rng.normal(-0.5, 0.7, size=(150, 1))
    want = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert classical.frechet_distance(a, b) == pytest.approx(want, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_and_is_symmetric():
    from scipy import linalg

    rng = np.random.default_rng(9)
    a = rng.normal(size=(40, 2)) @ np.array([[2.0, 0.5], [0.0, 1.0]])
    b = rng.normal(size=(60, 2)) @ np.array([[0.5, -0.3], [0.2, 1.5]]) + [1.0, -2.0]
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = (
        np.sum((a.mean(0) - b.mean(0)) ** 2)
        + np.trace(sa)
        + np.trace(sb)
        - 2 * np.trace(linalg.sqrtm(sa @ sb)).real
    )
    assert classical.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert classical.frechet_distance(b, a) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(("n", "m"), [(1, 5), (5, 1), (0, 0)])
def test_frechet_distance_needs_two_vectors_per_set(n, m):
    with pytest.raises(JaxmiaError, match="expected at least 2 in each"):
        classical.frechet_distance(np.zeros((n, 3)), np.zeros((m, 3)))


def test_frechet_distance_of_non_finite_features_is_nan():
    a = np.random.default_rng(10).normal(size=(5, 2))
    b = a.copy()
    b[1, 1] = np.nan
    assert np.isnan(classical.frechet_distance(a, b))


# ---------------------------------------------------------------------------------------------
# The fitted judges on synthetic faces.

CLASSES, PER_CLASS, SIDE = 6, 10, 8


@pytest.fixture(scope="module")
def faces():
    """6 identities of 8x8x1 "faces": a random prototype each, photos with small noise."""
    rng = np.random.default_rng(11)
    prototypes = rng.uniform(0.2, 0.8, size=(CLASSES, SIDE, SIDE, 1))

    def photos(n):
        noise = 0.03 * rng.normal(size=(CLASSES, n, SIDE, SIDE, 1))
        return np.clip(prototypes[:, None] + noise, 0, 1).reshape(-1, SIDE, SIDE, 1)

    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    gallery = classical.Gallery(photos(PER_CLASS), labels, CLASSES)
    held_out = photos(4)
    return classical.fit(gallery, 5), prototypes, held_out, np.repeat(np.arange(CLASSES), 4)


def test_fit_projects_the_gallery(faces):
    fitted = faces[0]
    assert fitted.coefficients.shape == (CLASSES * PER_CLASS, 5)
    np.testing.assert_allclose(
        fitted.coefficients, classical.project(fitted.eigenfaces, fitted.gallery.images)
    )
    # 6 prototypes span 5 directions around their mean: those hold nearly all the variance
    assert fitted.eigenfaces.explained > 0.9


def test_held_out_photos_rank_their_identity_first(faces):
    fitted, _, held_out, targets = faces
    found = classical.judge(fitted, held_out, targets)
    assert set(found) == {*classical.JUDGES, "knn_ratio", "residual_energy"}
    for name in classical.JUDGES:
        assert found[name].shape == (len(held_out),)
        np.testing.assert_array_equal(found[name], 1, err_msg=name)
    assert np.all(found["knn_ratio"] < 1)
    assert np.all((found["residual_energy"] >= 0) & (found["residual_energy"] <= 1))


def test_judges_rank_the_other_identities_behind(faces):
    fitted, _, held_out, targets = faces
    wrong = (targets + 1) % CLASSES
    found = classical.judge(fitted, held_out, wrong)
    for name in classical.JUDGES:
        assert np.all(found[name] > 1), name
    assert np.all(found["knn_ratio"] > 1)


def test_a_small_perturbation_does_not_move_a_face_to_another_identity(faces):
    fitted, prototypes, _, _ = faces
    rng = np.random.default_rng(12)
    # every prototype pushed 0.02 in L-inf, in the sign pattern of the direction towards
    # another identity's prototype: the worst a small gradient step could do
    towards = np.sign(np.roll(prototypes, 1, axis=0) - prototypes)
    for perturbation in (towards, rng.choice([-1.0, 1.0], size=prototypes.shape)):
        images = np.clip(prototypes + 0.02 * perturbation, 0, 1)
        found = classical.judge(fitted, images, np.arange(CLASSES))
        for name in classical.JUDGES:
            np.testing.assert_array_equal(found[name], 1, err_msg=name)


def test_random_patterns_have_high_residual_energy(faces):
    fitted, _, held_out, targets = faces
    noise = np.random.default_rng(13).uniform(size=(8, SIDE, SIDE, 1))
    real = classical.judge(fitted, held_out, targets)["residual_energy"]
    fake = classical.judge(fitted, noise, np.zeros(8, int))["residual_energy"]
    assert fake.min() > real.max()


def test_judge_of_no_images(faces):
    fitted = faces[0]
    found = classical.judge(fitted, np.zeros((0, SIDE, SIDE, 1)), np.zeros(0, int))
    assert all(v.shape == (0,) for v in found.values())


def test_nan_clones_rank_last(faces):
    fitted = faces[0]
    images = np.full((2, SIDE, SIDE, 1), np.nan)
    found = classical.judge(fitted, images, np.array([0, 3]))
    for name in classical.JUDGES:
        np.testing.assert_array_equal(found[name], CLASSES, err_msg=name)


@pytest.mark.parametrize("shape", [(3, SIDE, SIDE, 3), (3, 4, 4, 1), (3, SIDE * SIDE)])
def test_judge_rejects_images_of_another_shape(faces, shape):
    fitted = faces[0]
    with pytest.raises(JaxmiaError, match=r"expected \[n, 8, 8, 1\] like the gallery"):
        classical.judge(fitted, np.zeros(shape), np.zeros(3, int))
    with pytest.raises(JaxmiaError, match="Fréchet distance to the gallery"):
        classical.frechet_to_gallery(fitted, np.zeros(shape))


@pytest.mark.parametrize(
    ("targets", "message"),
    [([0, 1], r"targets of shape \(2,\) for 3 images"), ([0, 1, 6], "targets span 0..6")],
)
def test_judge_rejects_targets_that_do_not_fit(faces, targets, message):
    with pytest.raises(JaxmiaError, match=message):
        classical.judge(faces[0], faces[2][:3], np.array(targets))


def test_frechet_to_gallery_is_small_for_real_photos_and_large_for_noise(faces):
    fitted, _, held_out, _ = faces
    noise = np.random.default_rng(14).uniform(size=(24, SIDE, SIDE, 1))
    real = classical.frechet_to_gallery(fitted, held_out)
    fake = classical.frechet_to_gallery(fitted, noise)
    assert classical.frechet_to_gallery(fitted, fitted.gallery.images) == pytest.approx(0, abs=1e-9)
    assert fake > 10 * real


@pytest.mark.parametrize(
    ("images", "labels", "num_classes", "message"),
    [
        (np.zeros((4, 2, 2)), [0, 1, 0, 1], 2, r"photos of shape \(4, 2, 2\)"),
        (np.zeros((0, 2, 2, 1)), [], 2, "expected .m, h, w, c. with m >= 1"),
        (np.zeros((4, 2, 2, 1)), [0, 1, 0], 2, r"labels of shape \(3,\) for 4 photos"),
        (np.zeros((4, 2, 2, 1)), [0.0, 1.0, 0.0, 1.0], 2, "labels of dtype float64"),
        (np.zeros((4, 2, 2, 1)), [0, 1, 2, 1], 2, r"labels span 0..2; expected 0..1"),
        (np.zeros((4, 2, 2, 1)), [0, -1, 0, 1], 2, r"labels span -1..1"),
        (np.zeros((4, 2, 2, 1)), [0, 0, 0, 0], 0, "num_classes 0; expected at least 1"),
        (np.zeros((4, 2, 2, 1)), [0, 0, 0, 0], 2.0, "num_classes 2.0; expected int"),
    ],
)
def test_gallery_rejects_malformed_input(images, labels, num_classes, message):
    with pytest.raises(JaxmiaError, match=message):
        classical.Gallery(images, np.asarray(labels), num_classes)
