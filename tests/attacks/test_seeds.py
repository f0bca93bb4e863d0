import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxmia.attacks import seeds
from jaxmia.errors import JaxmiaError

SHAPE = (4, 5, 1)


def _pool(values):
    """Constant images, one per value: a seed's pixel value says which faces it averages."""
    return jnp.stack([jnp.full(SHAPE, v, jnp.float32) for v in values])


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_mean_face_of_a_small_pool_is_its_mean():
    pool = _pool([0.1, 0.2, 0.6])
    np.testing.assert_allclose(seeds.mean_face(pool, jax.random.key(0), 256), 0.3, rtol=1e-6)


def test_mean_face_averages_distinct_faces():
    pool = _pool([2.0**-i for i in range(6)])  # any subset has its own sum
    got = float(seeds.mean_face(pool, jax.random.key(3), 3)[0, 0, 0])
    sums = {sum(c) / 3 for c in itertools.combinations([2.0**-i for i in range(6)], 3)}
    assert min(abs(got - s) for s in sums) < 1e-6
    np.testing.assert_array_equal(
        seeds.mean_face(pool, jax.random.key(3), 3), seeds.mean_face(pool, jax.random.key(3), 3)
    )


def test_paper_mean_is_one_image_for_every_clone():
    pool = _pool(np.linspace(0, 1, 10))
    s = seeds.make_seeds("mean", _keys(4), SHAPE, pool=pool, pool_size=256)
    assert s.shape == (4, *SHAPE)
    np.testing.assert_allclose(s, 0.5, rtol=1e-6)


def test_subset_means_differ_per_clone_and_average_subset_size_faces():
    values = [2.0**-i for i in range(8)]
    s = seeds.make_seeds("subset_mean", _keys(5), SHAPE, pool=_pool(values), subset_size=3)
    sums = {sum(c) / 3 for c in itertools.combinations(values, 3)}
    got = np.asarray(s[:, 0, 0, 0])
    assert all(min(abs(g - v) for v in sums) < 1e-6 for g in got)
    assert len(set(np.round(got, 6))) > 1
    # a subset as large as the pool would make every clone's seed the same: half the pool is used
    s = seeds.make_seeds("subset_mean", _keys(5), SHAPE, pool=_pool(values), subset_size=256)
    sums = {sum(c) / 4 for c in itertools.combinations(values, 4)}
    got = np.asarray(s[:, 0, 0, 0])
    assert all(min(abs(g - v) for v in sums) < 1e-6 for g in got)
    assert len(set(np.round(got, 6))) > 1


def test_mean_noise_has_the_set_scale():
    pool = jnp.stack([jnp.full((16, 16, 1), 0.4), jnp.full((16, 16, 1), 0.6)])  # mean 0.5
    s = seeds.make_seeds("mean_noise", _keys(64), (16, 16, 1), pool=pool, noise_scale=0.05)
    assert 0.045 < float(jnp.std(s - 0.5)) < 0.055
    assert float(jnp.abs(s[0] - s[1]).max()) > 0.01
    clipped = seeds.make_seeds("mean_noise", _keys(4), SHAPE, pool=_pool([0.5]), noise_scale=10.0)
    assert float(clipped.min()) == 0.0 and float(clipped.max()) == 1.0


def test_grey_and_uniform():
    np.testing.assert_array_equal(seeds.make_seeds("grey", _keys(2), SHAPE, grey=0.25), 0.25)
    u = seeds.make_seeds("uniform", _keys(3), (8, 8, 1))
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert float(jnp.abs(u[0] - u[1]).max()) > 0.1
    np.testing.assert_array_equal(u, seeds.make_seeds("uniform", _keys(3), (8, 8, 1)))  # same keys


def test_files_are_cycled_over_clones():
    images = np.stack([np.full(SHAPE, 0.1, np.float32), np.full(SHAPE, 0.9, np.float32)])
    s = seeds.make_seeds("files", _keys(5), SHAPE, images=images)
    np.testing.assert_allclose(s[:, 0, 0, 0], [0.1, 0.9, 0.1, 0.9, 0.1])


@pytest.mark.parametrize(
    "kind,kwargs,match",
    [
        ("mean", {}, "needs an auxiliary face pool"),
        ("subset_mean", {"pool": jnp.zeros((0, *SHAPE))}, "needs an auxiliary face pool"),
        ("mean", {"pool": jnp.zeros((3, 8, 8, 1))}, r"\(8, 8, 1\), expected \(4, 5, 1\)"),
        ("files", {}, "no seed image files"),
        ("sketch", {}, "inversion.seed='sketch'"),
    ],
)
def test_bad_seed_settings(kind, kwargs, match):
    with pytest.raises(JaxmiaError, match=match):
        seeds.make_seeds(kind, _keys(2), SHAPE, **kwargs)


def test_load_images_converts_colour_and_scales(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    grey = seeds.load_images([tmp_path / "red.png"], (4, 5, 1))
    np.testing.assert_allclose(grey, round(0.299 * 255) / 255, atol=1 / 255)
    colour = seeds.load_images([tmp_path / "red.png"], (4, 5, 3))
    np.testing.assert_array_equal(colour[0, 0, 0], [1.0, 0.0, 0.0])


def test_load_images_bad_files(tmp_path):
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "tall.png")
    with pytest.raises(JaxmiaError, match=r"tall.png: size 6x5 \(h x w\), expected 4x5"):
        seeds.load_images([tmp_path / "tall.png"], (4, 5, 1))
    with pytest.raises(JaxmiaError, match="gone.png: not found"):
        seeds.load_images([tmp_path / "gone.png"], (4, 5, 1))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(JaxmiaError, match="junk.png: not a readable image"):
        seeds.load_images([tmp_path / "junk.png"], (4, 5, 1))
