"""Tests of jaxmia.judges.transformed: each transform against a reference, per-image keys, the
verdict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from jaxmia import transforms
from jaxmia.errors import JaxmiaError
from jaxmia.judges import scores, transformed
from jaxmia.recognizers import models

TINY = models.ModelConfig(
    num_classes=5,
    image_size=(16, 16),
    channels=3,
    conv_features=(4, 8),
    kernel_sizes=(3, 3),
    dense_features=(16,),
)
NONE = transformed.TransformSettings(
    max_shift=0, flip=False, scale=0.0, blur_sigma=0.0, noise_std=0.0, samples=1
)
# Every transform at its default range. One settings value and few batch shapes in all tests:
# each new pair compiles the transforms again (seconds on a loaded CPU).
SOME = transformed.TransformSettings(samples=3)


@dataclasses.dataclass(frozen=True)
class Rec:
    """Stands in for checkpoint.LoadedRecognizer (what robust uses of it)."""

    graphdef: nnx.GraphDef
    params: nnx.State
    config: models.ModelConfig
    names: tuple[str, ...] = ("a", "b", "c", "d", "e")
    path: Path = Path("fake-ckpt")


@pytest.fixture(scope="module")
def rec() -> Rec:
    """TINY with He-like random weights drawn by NumPy (eager ``models.init`` compiles)."""
    graphdef, shapes = models.abstract(TINY)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(s.dtype),
        nnx.to_pure_dict(shapes),
    )
    return Rec(graphdef, params, TINY)


def _images(n: int, shape=(16, 16, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _transform(x, key, settings):
    return np.asarray(jax.jit(transformed.random_transform, static_argnums=2)(x, key, settings))


def _keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


# ------------------------------------------------------------------------- the transforms


def test_every_range_at_zero_is_the_identity():
    x = _images(1, (7, 9, 2))[0]
    for key in _keys(3):
        np.testing.assert_array_equal(_transform(x, key, NONE), x)


def test_flip_only_flips_the_columns_or_nothing():
    x = _images(1, (5, 6, 3))[0]
    settings = dataclasses.replace(NONE, flip=True)
    ys = [_transform(x, k, settings) for k in _keys(16)]
    flipped = [np.array_equal(y, x[:, ::-1]) for y in ys]
    unchanged = [np.array_equal(y, x) for y in ys]
    assert all(f != u for f, u in zip(flipped, unchanged, strict=True))  # one or the other
    assert any(flipped) and any(unchanged)


def test_blur_equals_scipy_and_sigma_zero_is_the_identity():
    x = _images(1, (9, 8, 2), seed=1)[0]
    blur = jax.jit(transforms.gaussian_blur, static_argnums=2)
    np.testing.assert_array_equal(blur(x, 0.0, 3), x)
    for sigma in (0.4, 1.0):
        # scipy's radius is int(truncate * sigma + 0.5): 3; "nearest" replicates the edges
        want = ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest", truncate=3 / sigma)
        np.testing.assert_allclose(blur(x, sigma, 3), want, atol=1e-6)


def test_noise_stays_in_the_image_range():
    x = _images(1, (8, 8, 1), seed=2)[0]
    x[:2], x[-2:] = 0.0, 1.0
    settings = dataclasses.replace(NONE, noise_std=0.5)
    y = _transform(x, jax.random.key(3), settings)
    assert np.all(y >= 0) and np.all(y <= 1)
    assert np.abs(y - x).mean() > 0.1


def test_zoom_is_bilinear_about_the_centre_with_edges_replicated():
    x = _images(1, (10, 12, 2), seed=3)[0]
    h, w, _ = x.shape
    zoom = jax.jit(transforms.zoom, static_argnums=2)
    np.testing.assert_allclose(zoom(x, 1.0, 0.3), x, atol=1e-6)
    for factor in (0.75, 1.2):
        # output pixel (i, j) shows the input at (i + 0.5 - h / 2) / factor + h / 2 - 0.5
        i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        u = (i + 0.5 - h / 2) / factor + h / 2 - 0.5
        v = (j + 0.5 - w / 2) / factor + w / 2 - 0.5
        want = np.stack(
            [ndimage.map_coordinates(x[..., c], [u, v], order=1, mode="nearest") for c in (0, 1)],
            axis=-1,
        )
        np.testing.assert_allclose(zoom(x, factor, 0.3), want, atol=1e-5)


def test_scale_keeps_a_constant_image_constant_and_is_deterministic_per_key():
    settings = dataclasses.replace(NONE, scale=0.3)
    flat = np.full((12, 12, 1), 0.37, np.float32)
    for key in _keys(4):
        np.testing.assert_allclose(_transform(flat, key, settings), flat, atol=1e-6)
    x = _images(1, (12, 12, 1), seed=4)[0]
    key, other = _keys(2)
    np.testing.assert_array_equal(_transform(x, key, settings), _transform(x, key, settings))
    assert not np.allclose(_transform(x, key, settings), _transform(x, other, settings))


def test_all_transforms_together_stay_finite_and_in_range():
    x = _images(1)[0]
    ys = np.stack([_transform(x, k, SOME) for k in _keys(6)])
    assert np.all(np.isfinite(ys)) and ys.min() >= 0 and ys.max() <= 1
    assert len({y.tobytes() for y in ys}) == len(ys)  # each key its own draw


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_shift=-1), r"robust max_shift=-1: expected an integer >= 0"),
        (dict(max_shift=1.5), r"robust max_shift=1.5: expected an integer >= 0"),
        (dict(samples=0), r"robust samples=0: expected an integer >= 1"),
        (dict(scale=-0.1), r"robust scale=-0.1: expected in \[0, 1\)"),
        (dict(scale=1.0), r"robust scale=1.0: expected in \[0, 1\)"),
        (dict(blur_sigma=-1.0), r"robust blur_sigma=-1.0: expected finite >= 0"),
        (dict(noise_std=float("nan")), r"robust noise_std=nan: expected finite >= 0"),
    ],
)
def test_bad_settings_are_jaxmia_errors(kwargs, message):
    with pytest.raises(JaxmiaError, match=message):
        transformed.TransformSettings(**kwargs)


# ------------------------------------------------------------------------- the verdict


def test_scores_do_not_depend_on_the_batching(rec):
    images, targets = _images(5, seed=5), np.arange(5) % 5
    key = jax.random.key(7)
    one = transformed.robust_scores(rec, images, targets, SOME, key, batch_size=1)
    four = transformed.robust_scores(rec, images, targets, SOME, key, batch_size=4)  # 4 + 1 padded
    np.testing.assert_allclose(one.score, four.score, rtol=1e-5)
    np.testing.assert_array_equal(one.rank, four.rank)
    assert one.features is None and one.score.shape == (5,) and one.rank.dtype == np.int32
    plain = scores.score_images(rec, images, targets, batch_size=4)
    assert not np.allclose(one.score, plain.score, rtol=1e-3)  # the transforms do something


def test_no_transforms_give_the_plain_scores(rec):
    images, targets = _images(6, seed=6), np.array([0, 1, 2, 3, 4, 0])
    got = transformed.robust_scores(rec, images, targets, NONE, jax.random.key(0), batch_size=4)
    want = scores.score_images(rec, images, targets, batch_size=4)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-5)
    # Ranks by probabilities or by logits agree (softmax keeps the order) unless two tie.
    np.testing.assert_array_equal(got.rank, want.rank)


def test_score_and_rank_equal_a_numpy_reference(rec):
    images, targets = _images(4, seed=8), np.array([3, 0, 4, 1])
    key = jax.random.key(11)
    got = transformed.robust_scores(rec, images, targets, SOME, key, batch_size=4)
    keys = transformed.image_keys(key, jnp.arange(4), SOME.samples)  # the documented draws
    for i in range(4):
        moved = np.stack([_transform(images[i], k, SOME) for k in keys[i]])  # [s, h, w, c]
        z = np.asarray(models.logits(rec.graphdef, rec.params, moved), np.float64)  # [s, k]
        p = np.exp(z - z.max(1, keepdims=True))
        p = (p / p.sum(1, keepdims=True)).mean(0)  # [k]: the mean probabilities
        np.testing.assert_allclose(got.score[i], p[targets[i]], rtol=1e-4)
        assert got.rank[i] == np.sum(p >= p[targets[i]]), i  # ties against the target


def test_one_compile_per_batch_shape(rec):
    images, targets = _images(7, seed=9), np.arange(7) % 5
    before = transformed._robust_batch._cache_size()
    for n in (5, 7):  # batches of 4, the last one padded; a new key is a traced argument
        transformed.robust_scores(
            rec, images[:n], targets[:n], SOME, jax.random.key(n), batch_size=4
        )
    assert transformed._robust_batch._cache_size() <= before + 1


def test_judges_sharing_the_transforms_score_as_each_alone(rec):
    # A second judge: the same network with other weights (halved: its scores differ).
    other = dataclasses.replace(rec, params=jax.tree.map(lambda p: 0.5 * p, rec.params))
    images, key = _images(5, seed=12), jax.random.key(3)
    t_rec, t_other = np.array([0, 1, 2, 3, 4]), np.array([4, 3, 2, 1, 0])
    both = transformed.robust_scores_each(
        (rec, other), images, (t_rec, t_other), SOME, key, batch_size=4
    )
    for got, judge, t in zip(both, (rec, other), (t_rec, t_other), strict=True):
        alone = transformed.robust_scores(judge, images, t, SOME, key, batch_size=4)
        np.testing.assert_allclose(got.score, alone.score, rtol=1e-5)
        np.testing.assert_array_equal(got.rank, alone.rank)
    assert not np.allclose(both[0].score, both[1].score, rtol=1e-3)
