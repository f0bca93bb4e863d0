"""The face judge: fit and rank against distances worked out by hand; aligned chips of photos."""

import numpy as np
import pytest

from jaxmia.data import faces
from jaxmia.errors import JaxmiaError
from jaxmia.judges import face as face_lib
from jaxmia.pretrained import fetch

# Euclidean gallery, 2-d: identity 0 at (0, 0) and (4, 0) (centroid (2, 0)), identity 1 at
# (2, 1), identity 2 far away at (10, 10). Every value below is a dyadic rational, so the
# distances' ties are exact in float64.
_X = np.array([[0.0, 0.0], [4.0, 0.0], [2.0, 1.0], [10.0, 10.0]])
_Y = np.array([0, 0, 1, 2])


def _euclidean():
    return face_lib.fit(_X, _Y, 3, "euclidean")


def test_rank_nearest_photo_and_centroid_disagree():
    # (0, 0.6): nearest photo of 0 at 0.6, of 1 at sqrt(4.16); centroid of 0 at sqrt(4.36),
    # of 1 at sqrt(4.16). So identity 0 is first by photo and second by centroid.
    q = np.array([[0.0, 0.6], [0.0, 0.6]])
    out = face_lib.rank(_euclidean(), q, np.array([0, 1]))
    np.testing.assert_array_equal(out["nn"], [1, 2])
    np.testing.assert_array_equal(out["centroid"], [2, 1])
    np.testing.assert_allclose(out["knn_dist"], [0.6, np.sqrt(4.16)], rtol=1e-12)


def test_rank_ties_count_against_the_target():
    # (1, 0.5) is sqrt(1.25) from (0, 0) and from (2, 1): identities 0 and 1 tie by photo.
    # (2, 0.5) is 0.5 from centroid (2, 0) and from (2, 1): 0 and 1 tie by centroid.
    q = np.array([[1.0, 0.5], [1.0, 0.5], [2.0, 0.5], [2.0, 0.5]])
    out = face_lib.rank(_euclidean(), q, np.array([0, 1, 0, 1]))
    np.testing.assert_array_equal(out["nn"], [2, 2, 2, 1])
    np.testing.assert_array_equal(out["centroid"], [2, 2, 2, 2])
    np.testing.assert_allclose(out["knn_dist"], [1.25**0.5, 1.25**0.5, 4.25**0.5, 0.5])


def test_rank_far_identity_is_last_and_nonfinite_ranks_last():
    q = np.array([[2.0, 1.0], [np.nan, 0.0]])
    out = face_lib.rank(_euclidean(), q, np.array([2, 1]))
    np.testing.assert_array_equal(out["nn"], [3, 3])
    np.testing.assert_array_equal(out["centroid"], [3, 3])
    assert out["knn_dist"][0] == pytest.approx(np.hypot(8, 9))
    assert np.isnan(out["knn_dist"][1])


def test_cosine_is_by_angle_not_length():
    # identity 0 at (1, 0), identity 1 at (10, 1). (9, 0.1) is 1.0 from (10, 1) but 8 from
    # (1, 0); its angle to (1, 0) is atan(0.1/9) = 0.011 rad, to (10, 1) 0.0997 - 0.011.
    g = np.array([[1.0, 0.0], [10.0, 1.0]])
    q = np.array([[9.0, 0.1]])
    euc = face_lib.rank(face_lib.fit(g, np.array([0, 1]), 2, "euclidean"), q, np.array([0]))
    cos = face_lib.rank(face_lib.fit(g, np.array([0, 1]), 2, "cosine"), q, np.array([0]))
    assert euc["nn"][0] == 2 and euc["knn_dist"][0] == pytest.approx(np.hypot(8, 0.1))
    assert cos["nn"][0] == 1 and cos["centroid"][0] == 1
    assert cos["knn_dist"][0] == pytest.approx(1 - 9 / np.hypot(9, 0.1), abs=1e-12)


def test_cosine_centroid_is_the_mean_direction():
    # identity 0: (1, 0) and (0, 2), unit vectors (1, 0), (0, 1), mean direction 45 degrees;
    # identity 1: (-1, -1). The query (3, 3) is 1 - cos(45) from identity 0's nearest photo
    # and 0 from its centroid; 1 - cos(180) = 2 from identity 1.
    g = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    gallery = face_lib.fit(g, np.array([0, 0, 1]), 2, "cosine")
    out = face_lib.rank(gallery, np.array([[3.0, 3.0], [3.0, 3.0]]), np.array([0, 1]))
    np.testing.assert_array_equal(out["nn"], [1, 2])
    np.testing.assert_array_equal(out["centroid"], [1, 2])
    np.testing.assert_allclose(out["knn_dist"], [1 - np.sqrt(0.5), 2.0], atol=1e-12)


def test_fit_refuses_a_missing_identity():
    with pytest.raises(JaxmiaError, match="identity missing.*first: 1"):
        face_lib.fit(_X[[0, 1, 3]], np.array([0, 0, 2]), 3, "euclidean")


@pytest.mark.parametrize(
    ("x", "labels", "k", "metric", "match"),
    [
        (_X, _Y, 3, "manhattan", "metric"),
        (_X, _Y, 2, "euclidean", "labels span"),
        (_X, _Y[:3], 3, "euclidean", "labels of shape"),
        (_X[:, 0], _Y, 3, "euclidean", "embeddings of shape"),
        (np.where(_X == 4, np.nan, _X), _Y, 3, "euclidean", "NaN"),
        (_X, _Y, 3, "cosine", "zero gallery embedding"),
    ],
)
def test_fit_refuses_bad_input(x, labels, k, metric, match):
    with pytest.raises(JaxmiaError, match=match):
        face_lib.fit(x, labels, k, metric)


def test_rank_refuses_bad_input():
    g = _euclidean()
    with pytest.raises(JaxmiaError, match="expected \\[n, 2\\]"):
        face_lib.rank(g, np.zeros((1, 3)), np.array([0]))
    with pytest.raises(JaxmiaError, match="targets span"):
        face_lib.rank(g, np.zeros((1, 2)), np.array([3]))
    with pytest.raises(JaxmiaError, match="targets of shape"):
        face_lib.rank(g, np.zeros((2, 2)), np.array([0]))


def test_face_chips_of_noise_are_chips_without_a_face():
    noise = np.random.default_rng(0).random((3, 64, 64, 1), dtype=np.float32)
    chips = face_lib.face_chips(noise)
    assert chips.images.shape == (3, 150, 150, 3) and chips.images.dtype == np.float32
    assert chips.images.min() >= 0 and chips.images.max() <= 1
    # grey to RGB: all three channels equal
    np.testing.assert_array_equal(chips.images[..., 0], chips.images[..., 2])
    assert not chips.detected.any()


def test_face_chips_refuse_a_wrong_shape():
    with pytest.raises(JaxmiaError, match="c 1 or 3"):
        face_lib.face_chips(np.zeros((1, 64, 64, 2), np.float32))


# ---------------------------------------------------------------------------------------------
# End to end with dlib's embedder: the controls on real photos.


def _model_files(name: str) -> None:
    try:
        fetch.model_files(name)
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip(f"no registry reachable: run `jaxmia models fetch {name}`")
        raise


@pytest.fixture(scope="module")
def embed():
    _model_files("dlib_resnet")
    _model_files("dlib_landmarks5")
    return face_lib.dlib_embedder(batch_size=20)


def test_held_out_real_photos_are_recognised(embed):
    # 10 AT&T people at jaxmia's size (64x64 grey): 8 photos each in the gallery, 2 held out
    att = faces.load_faces("att", image_size=(64, 64), channels=1, progress=False)
    keep = att.labels < 10
    images, labels = att.images[keep], att.labels[keep]
    held = np.zeros(len(labels), bool)
    for k in range(10):
        held[np.flatnonzero(labels == k)[-2:]] = True
    gallery = face_lib.fit_images(embed, images[~held], labels[~held], 10, "euclidean")
    out = face_lib.judge_images(gallery, embed, images[held], labels[held])
    assert set(out) == {"nn", "centroid", "knn_dist", "detected"}
    assert np.mean(out["nn"] == 1) >= 0.9 and np.mean(out["centroid"] == 1) >= 0.9
    assert np.mean(out["detected"]) >= 0.8
    # dlib's own threshold for "the same person" is a distance of 0.6
    assert np.median(out["knn_dist"]) < 0.6
    # another person's photo is not the target
    wrong = face_lib.judge_images(gallery, embed, images[held], (labels[held] + 1) % 10)
    assert np.mean(wrong["nn"] == 1) <= 0.1 and np.median(wrong["knn_dist"]) > 0.6


def test_rgb_noise_has_no_face():
    noise = np.random.default_rng(1).random((8, 64, 64, 3), dtype=np.float32)
    assert not face_lib.face_chips(noise).detected.any()
