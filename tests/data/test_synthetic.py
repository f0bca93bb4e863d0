import numpy as np
import pytest

from jaxmia.data import synthetic

# One shape for most tests so the renderer compiles once (test_data.py uses it too).
IDS, PER, SIZE = 20, 6, (32, 32)


@pytest.fixture(scope="module")
def grey():
    return synthetic.make_faces(IDS, PER, SIZE, 1, seed=0)


def test_shapes_range_and_names(grey):
    images, labels, names = grey
    assert images.shape == (IDS * PER, *SIZE, 1)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.1  # not blank
    np.testing.assert_array_equal(labels, np.repeat(np.arange(IDS), PER))
    assert names[0] == "synthetic_0000" and names[-1] == f"synthetic_{IDS - 1:04d}"
    assert len(set(names)) == IDS


def test_same_seed_same_bytes_other_seed_differs(grey):
    again, _, _ = synthetic.make_faces(IDS, PER, SIZE, 1, seed=0)
    assert again.tobytes() == grey[0].tobytes()
    other, _, _ = synthetic.make_faces(IDS, PER, SIZE, 1, seed=1)
    assert np.abs(other - grey[0]).mean() > 0.02


def test_photos_of_one_identity_differ(grey):
    images, labels, _ = grey
    first = images[labels == 0]
    diffs = [np.abs(first[0] - first[j]).mean() for j in range(1, PER)]
    assert min(diffs) > 0.005


def test_grey_is_luma_of_rgb(grey):
    rgb, _, _ = synthetic.make_faces(IDS, PER, SIZE, 3, seed=0)
    assert rgb.shape == (IDS * PER, *SIZE, 3)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(grey[0][..., 0], luma, atol=1e-5)
    # Colour: the channels are not all equal.
    assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 0.02


def _nearest_class_mean(features, labels, train):
    means = np.stack([features[train & (labels == k)].mean(0) for k in range(IDS)])
    test = ~train
    d = ((features[test][:, None, :] - means[None]) ** 2).sum(-1)
    return (d.argmin(1) == labels[test]).mean()


def test_identities_are_distinguishable_but_not_by_mean_colour(grey):
    images, labels, _ = grey
    train = np.tile(np.arange(PER) < PER // 2, IDS)
    chance = 1 / IDS
    pixels = _nearest_class_mean(images.reshape(len(images), -1), labels, train)
    colour = _nearest_class_mean(images.mean(axis=(1, 2)), labels, train)
    assert pixels > 10 * chance  # far above chance from pixels ...
    assert colour < 0.5  # ... while the mean brightness of a photo is a poor cue
    assert pixels > colour + 0.3
