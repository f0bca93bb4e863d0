"""Tests of jaxmia.judges.pgd: the budget, the attack's effect, per-image steps, one compile."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmia.attacks import inversion as inv
from jaxmia.errors import JaxmiaError
from jaxmia.judges import pgd as pgd_lib
from jaxmia.recognizers import models

TINY = models.ModelConfig(
    num_classes=4,
    image_size=(16, 16),
    channels=1,
    conv_features=(4, 8),
    kernel_sizes=(3, 3),
    dense_features=(16,),
)
TINY_RESNET = models.ModelConfig(
    num_classes=4,
    image_size=(16, 16),
    arch="resnet",
    widths=(4, 8),
    blocks=(1, 1),
    stem_kernel=3,
    stem_stride=1,
)


@dataclasses.dataclass(frozen=True)
class Rec:
    """Stands in for checkpoint.LoadedRecognizer (what adversarial uses of it)."""

    graphdef: nnx.GraphDef
    params: nnx.State | dict
    config: models.ModelConfig
    names: tuple[str, ...] = ("ann", "bob", "cy", "dee")
    path: Path = Path("fake-ckpt")


def _faces(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four identities, each a fixed random pattern plus a little noise. # [n, 16, 16, 1], [n]"""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(0).uniform(0.2, 0.8, (4, 16, 16, 1))
    labels = np.arange(n) % 4
    images = np.clip(protos[labels] + rng.normal(0, 0.05, (n, 16, 16, 1)), 0, 1)
    return images.astype(np.float32), labels.astype(np.int32)


def numpy_state(config: models.ModelConfig, seed: int) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, a pure-dict state of random weights and batch statistics) drawn by NumPy.

    Nothing compiles (``models.init`` of a ResNet compiles its initialiser: seconds on a CPU),
    and the statistics are not the identity, so batch norm's inference mode is exercised.
    """
    graphdef, shapes = models.abstract(config)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":  # He-like: unit-scale activations whatever the fan-in
            value = rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, s.shape)
        else:  # bias, mean
            value = 0.1 * rng.normal(size=s.shape)
        return value.astype(s.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(shapes))


@pytest.fixture(scope="module")
def trained() -> Rec:
    """TINY fitted (full batch, Adam) until it tells the four identities apart with margin."""
    images, labels = _faces(32)
    graphdef, params = numpy_state(TINY, 0)  # the paper CNN has no batch statistics
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            z = models.logits(graphdef, p, images)
            return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()

        updates, opt_state = opt.update(jax.grad(loss)(params), opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for _ in range(20):
        params, opt_state = step(params, opt_state)
    rec = Rec(graphdef, params, TINY)
    assert np.all(np.argmax(models.logits(graphdef, params, images), 1) == labels)
    return rec


def _margins(rec: Rec, x, targets) -> np.ndarray:
    z = models.logits(rec.graphdef, rec.params, x)  # [n, k]
    return np.asarray(jax.vmap(inv.logit_margin)(z, targets))


def _attack_case(n: int = 8):
    """Unseen faces, each attacked towards the next identity. # [n, 16, 16, 1], [n], [n]"""
    start, labels = _faces(n, seed=1)
    return start, labels, (labels + 1) % 4


# The tests share settings and batch shapes where they can: each new pair compiles the attack.
SETTINGS = pgd_lib.PGDSettings(epsilon=8 / 255, step_size=3 / 255, steps=5)


def test_output_stays_within_the_budget_and_the_image_range(trained):
    start, _, targets = _attack_case()
    start[:, :3] = 0.0  # pixels at the range's ends, where the two clips meet
    start[:, -3:] = 1.0
    x = np.asarray(pgd_lib.pgd(trained.graphdef, trained.params, start, targets, SETTINGS))
    eps = np.float32(SETTINGS.epsilon)  # float32 bounds, as the projection computes them
    assert x.dtype == np.float32 and x.shape == start.shape
    assert np.all(x >= start - eps) and np.all(x <= start + eps)
    assert np.all(x >= 0) and np.all(x <= 1)
    assert np.isclose(np.abs(x - start).max(), eps)  # the budget is used, not more


def test_pgd_raises_the_target_margin_and_a_generous_budget_reaches_the_target(trained):
    start, labels, targets = _attack_case()
    before = _margins(trained, start, targets)
    assert np.all(before < 0)  # R_T sees the true identities

    def attack(settings):
        return pgd_lib.pgd(trained.graphdef, trained.params, start, targets, settings)

    assert np.all(_margins(trained, attack(SETTINGS), targets) > before + 1)
    big = attack(pgd_lib.PGDSettings(epsilon=0.3, step_size=0.02, steps=40))
    top = np.argmax(models.logits(trained.graphdef, trained.params, big), 1)
    assert np.mean(top == targets) >= 7 / 8
    # One step of one grey level moves the margins little and changes no verdict.
    tiny = attack(pgd_lib.PGDSettings(epsilon=1 / 255, step_size=1 / 255, steps=1))
    assert np.abs(np.asarray(tiny) - start).max() <= 1 / 255 + 1e-6
    after = _margins(trained, tiny, targets)
    assert np.all(after < 0) and np.all(np.abs(after - before) < 0.25 * np.abs(before))
    top = np.argmax(models.logits(trained.graphdef, trained.params, tiny), 1)
    np.testing.assert_array_equal(top, labels)


@pytest.mark.parametrize("arch", ["paper", "resnet"])
def test_batch_equals_a_per_image_loop_of_the_step(trained, arch):
    rec = trained if arch == "paper" else Rec(*numpy_state(TINY_RESNET, 5), TINY_RESNET)
    start, _, targets = _attack_case()
    got = np.asarray(pgd_lib.pgd(rec.graphdef, rec.params, start, targets, SETTINGS))
    step = jax.jit(pgd_lib.pgd_step, static_argnums=(0, 5))
    for i in range(len(start)):
        x = jnp.asarray(start[i])
        for _ in range(SETTINGS.steps):
            x = step(rec.graphdef, rec.params, x, start[i], targets[i], SETTINGS)
        np.testing.assert_allclose(got[i], x, atol=1e-6)
    # Among other neighbours an image is attacked alike: no image's gradient depends on another's
    # (batch norm in inference mode; the same shape, so no new compile).
    perm = np.roll(np.arange(len(start)), 3)
    moved = pgd_lib.pgd(rec.graphdef, rec.params, start[perm], targets[perm], SETTINGS)
    np.testing.assert_allclose(moved, got[perm], atol=1e-6)
    assert np.isclose(np.abs(got - start).max(), SETTINGS.epsilon)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(epsilon=0.0), r"pgd epsilon=0.0: expected a budget in \(0, 1\]"),
        (dict(epsilon=1.5), r"pgd epsilon=1.5: expected a budget in \(0, 1\]"),
        (dict(step_size=-0.1), r"pgd step_size=-0.1: expected finite > 0"),
        (dict(step_size=float("inf")), r"pgd step_size=inf: expected finite > 0"),
        (dict(steps=0), r"pgd steps=0: expected an integer >= 1"),
        (dict(steps=2.5), r"pgd steps=2.5: expected an integer >= 1"),
    ],
)
def test_bad_settings_are_jaxmia_errors(kwargs, message):
    with pytest.raises(JaxmiaError, match=message):
        pgd_lib.PGDSettings(**kwargs)


def test_controls_in_padded_batches_compile_once_per_shape(trained):
    start, _, targets = _attack_case()
    before = pgd_lib.pgd._cache_size()
    got = pgd_lib.adversarial_controls(trained, start, targets, SETTINGS, batch_size=3)
    compiled = pgd_lib.pgd._cache_size()
    assert compiled <= before + 1  # 8 images: batches of 3, the last one padded
    again = pgd_lib.adversarial_controls(trained, start[:4], targets[:4], SETTINGS, batch_size=3)
    assert pgd_lib.pgd._cache_size() == compiled  # 4 images: the same shape
    assert isinstance(got, np.ndarray) and got.shape == start.shape and got.dtype == np.float32
    whole = pgd_lib.pgd(trained.graphdef, trained.params, start, targets, SETTINGS)
    np.testing.assert_allclose(got, whole, atol=1e-6)
    np.testing.assert_allclose(again, got[:4], atol=1e-6)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s, t: (s * 2, t), r"adversarial seeds: expected values in \[0, 1\]"),
        (lambda s, t: (s[..., :8, :], t), "images are 16x8x1 but the target"),
        (lambda s, t: (s[0], t), r"shape \(16, 16, 1\), expected \[n, h, w, c\]"),
        (lambda s, t: (s, t + 4), r"expected 3 labels in \[0, 4\)"),
        (lambda s, t: (s, t[:2]), r"expected 3 labels in \[0, 4\), got shape \(2,\)"),
    ],
)
def test_controls_reject_inputs_that_do_not_fit(trained, change, message):
    start, _, targets = _attack_case(3)
    seeds, targets = change(start, targets)
    with pytest.raises(JaxmiaError, match=message):
        pgd_lib.adversarial_controls(trained, seeds, targets, pgd_lib.PGDSettings())
