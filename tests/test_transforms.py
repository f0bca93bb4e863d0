"""jaxmia.transforms against NumPy: np.pad(mode="edge") and slicing, and flips; under jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmia import transforms
from jaxmia.attacks import inversion as inv


def np_shift(x, dy, dx, m):
    """The reference: the window at (m + dy, m + dx) of the edge-padded image."""
    h, w, _ = x.shape
    xp = np.pad(x, ((m, m), (m, m), (0, 0)), mode="edge")
    return xp[m + dy : m + dy + h, m + dx : m + dx + w]


def _image(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("shape", [(5, 7, 1), (6, 6, 3), (1, 4, 2)])
@pytest.mark.parametrize("max_shift", [0, 1, 3])
def test_shift_equals_edge_padded_window(shape, max_shift):
    x = _image(shape)
    traces = []

    @jax.jit
    def shift(x, dy, dx):
        traces.append(1)  # Python runs only while JAX traces
        return transforms.shift(x, dy, dx, max_shift)

    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            got = shift(jnp.asarray(x), jnp.int32(dy), jnp.int32(dx))
            np.testing.assert_array_equal(got, np_shift(x, dy, dx, max_shift))
    assert len(traces) == 1  # the offsets are traced: one program serves them all


def test_shift_direction_and_clamping():
    x = np.arange(5.0, dtype=np.float32).reshape(1, 5, 1)  # one row: 0 1 2 3 4
    row = lambda dy, dx, m: transforms.shift(jnp.asarray(x), dy, dx, m)[0, :, 0].tolist()  # noqa: E731
    assert row(0, 1, 2) == [1, 2, 3, 4, 4]  # positive dx: the content moves left
    assert row(0, -2, 2) == [0, 0, 0, 1, 2]
    assert row(0, 5, 2) == row(0, 2, 2)  # beyond max_shift: clamped to it
    assert row(3, 0, 1) == x[0, :, 0].tolist()  # a single row replicated vertically
    with pytest.raises(ValueError, match="max_shift"):
        transforms.shift(jnp.asarray(x), 0, 0, -1)


@pytest.mark.parametrize("max_shift", [1, 2])
def test_random_shift_draws_uniform_offsets(max_shift):
    x = _image((6, 5, 2), seed=1)
    keys = jax.random.split(jax.random.key(0), 400)
    got = np.asarray(
        jax.jit(jax.vmap(functools.partial(transforms.random_shift, max_shift=max_shift)))(
            jnp.broadcast_to(x, (len(keys), *x.shape)), keys
        )
    )
    # the documented draw: randint(key, (2,), 0, 2 m + 1) - m, dy first
    offsets = np.asarray(
        jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 2 * max_shift + 1))(keys) - max_shift
    )
    for g, (dy, dx) in zip(got, offsets, strict=True):
        np.testing.assert_array_equal(g, np_shift(x, dy, dx, max_shift))
    side = 2 * max_shift + 1
    counts = np.zeros((side, side), int)
    np.add.at(counts, (offsets[:, 0] + max_shift, offsets[:, 1] + max_shift), 1)
    expected = len(keys) / side**2  # 400 / 9 or 400 / 25
    assert counts.min() > 0.3 * expected and counts.max() < 2.0 * expected, counts
    np.testing.assert_array_equal(transforms.random_shift(jnp.asarray(x), keys[0], 0), x)


def test_random_flip_is_a_fair_coin():
    x = _image((4, 6, 3), seed=2)
    keys = jax.random.split(jax.random.key(1), 400)
    got = np.asarray(
        jax.jit(jax.vmap(transforms.random_flip))(jnp.broadcast_to(x, (400, *x.shape)), keys)
    )
    flipped = np.array([np.array_equal(g, x[:, ::-1]) for g in got])
    kept = np.array([np.array_equal(g, x) for g in got])
    assert np.all(flipped ^ kept)  # x is not symmetric: every output is exactly one of them
    np.testing.assert_array_equal(flipped, jax.vmap(jax.random.bernoulli)(keys))
    assert 150 < flipped.sum() < 250  # 1/2 of 400 (sd 10)


@pytest.mark.parametrize("jitter,flip", [(0, False), (0, True), (2, False), (2, True)])
def test_inversion_random_transform_is_shift_then_flip(jitter, flip):
    x = _image((7, 7, 1), seed=3)
    transform = jax.jit(inv.random_transform, static_argnums=(2, 3))
    for i in range(6):
        key = jax.random.key(i)
        kshift, kflip = jax.random.split(key)
        want = x
        if jitter:
            dy, dx = np.asarray(jax.random.randint(kshift, (2,), 0, 2 * jitter + 1)) - jitter
            want = np_shift(x, dy, dx, jitter)
        if flip and jax.random.bernoulli(kflip):
            want = want[:, ::-1]
        np.testing.assert_array_equal(transform(jnp.asarray(x), key, jitter, flip), want)


def test_random_resized_crop_is_a_resampled_box():
    # On a ramp image (value = row index), a box [y0, y0 + ch) resized to h rows has row o at
    # y0 + (o + 0.5) ch / h - 0.5: pixel centres mapped linearly, for any draw.
    h = w = 16
    ramp = jnp.tile(jnp.arange(h, dtype=jnp.float32)[:, None, None], (1, w, 1))
    for seed in range(4):
        out = np.asarray(transforms.random_resized_crop(ramp, jax.random.key(seed), 0.3))
        rows = out[:, w // 2, 0]
        step = np.diff(rows)
        assert out.shape == ramp.shape
        np.testing.assert_allclose(step, step.mean(), atol=1e-4)  # linear in o
        assert 0.3**0.5 * 0.8 < step.mean() <= 1.0 + 1e-6  # a box of >= 0.3 of the area
        assert rows.min() >= -0.5 and rows.max() <= h - 0.5
    full = transforms.random_resized_crop(ramp, jax.random.key(0), 1.0, ratio=(1.0, 1.0))
    np.testing.assert_allclose(full, ramp, atol=1e-5)  # the whole box: the image itself


def test_saturate_by_hand():
    x = jnp.asarray([[[1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(transforms.saturate(x, 0.0), [[[0.299] * 3]], rtol=1e-6)
    np.testing.assert_allclose(transforms.saturate(x, 1.0), x)
    grey = jnp.ones((2, 2, 1))
    np.testing.assert_array_equal(transforms.saturate(grey, 0.0), grey)
