"""Inversion by queries alone: scores from answers, the NES and BREP updates, the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmia.attacks import query
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models
from jaxmia.service import policy as policy_lib

SHAPE = (8, 8, 1)
CONFIG = models.ModelConfig(
    num_classes=4, image_size=SHAPE[:2], channels=1, conv_features=(4,), kernel_sizes=(3,),
    dense_features=(16,),
)  # fmt: skip
GRAPHDEF, PARAMS = models.init(CONFIG, jax.random.key(0))
BASIS = jax.random.normal(jax.random.key(1), (6, *SHAPE)) * 0.2


def decode(params, code):
    """A linear 'generator' of 6-dim codes, squashed to [0, 1]."""
    return jax.nn.sigmoid(jnp.tensordot(code, params, axes=1))


def make(**policy):
    return policy_lib.Service(
        GRAPHDEF, PARAMS, policy=policy_lib.Policy(buckets=(8, 64), **policy),
        key=jax.random.key(2), image_shape=SHAPE,
    )  # fmt: skip


def test_score_shows_only_what_the_answer_shows():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32)
    targets = np.array([2, 2])
    full = policy_lib.Answers(labels=np.array([1, 0]), probabilities=probs)
    np.testing.assert_allclose(query.score(full, targets), [0.3, 0.3])
    top1 = policy_lib.Answers(
        labels=np.array([1, 0]),
        top_labels=np.array([[1], [0]]),
        probabilities=probs.max(1)[:, None],
    )
    np.testing.assert_allclose(query.score(top1, targets), [0.0, 0.0])
    top2 = policy_lib.Answers(
        labels=np.array([1, 0]), top_labels=np.array([[1, 2], [0, 2]]),
        probabilities=np.array([[0.6, 0.3], [0.5, 0.3]]),
    )  # fmt: skip
    np.testing.assert_allclose(query.score(top2, targets), [0.3, 0.3])
    label = policy_lib.Answers(labels=np.array([2, 0]))
    np.testing.assert_allclose(query.score(label, targets), [1.0, 0.0])


def test_nes_update_by_hand():
    u = jnp.array([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    scores = jnp.array([[3.0, 0.0, 1.0, 2.0]])  # ranks 3, 0, 1, 2 -> weights .5, -.5, -1/6, 1/6
    got = query.nes_update(jnp.zeros((1, 2)), u, scores, 2.0)
    w = np.array([0.5, -0.5, -1 / 6, 1 / 6])
    np.testing.assert_allclose(got, 2.0 * (w[:, None] * np.asarray(u[0])).mean(0)[None], atol=1e-6)
    # nothing visible (all scores equal): the code stays
    flat = query.nes_update(jnp.ones((1, 2)), u, jnp.zeros((1, 4)), 2.0)
    np.testing.assert_array_equal(flat, jnp.ones((1, 2)))


def test_brep_update_by_hand():
    u = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    is_target = jnp.array([[False, True], [True, True]])
    codes, radius = query.brep_update(
        jnp.zeros((2, 2)), u, is_target, jnp.array([2.0, 2.0]), 0.5, 1.5
    )
    np.testing.assert_allclose(codes, [[-1.0, 0.0], [0.0, 0.0]])  # away from (1, 0) by .5 * 2
    np.testing.assert_allclose(radius, [2.0, 3.0])  # all the target's: the sphere grows


@pytest.mark.parametrize("attack", ["nes", "brep"])
def test_invert_counts_queries_and_raises_the_target(attack):
    svc = make(answer="probs")
    targets = np.array([0, 1, 2, 3])
    s = query.Settings(attack=attack, steps=30, samples=8, init_codes=200, learning_rate=2)
    got = query.invert(svc, decode, BASIS, targets, 6, s, jax.random.key(3), progress=False)
    assert got["clones"].shape == (4, *SHAPE) and got["queries"] == 30 * 8
    assert svc.queries == got["shared_queries"] + 30 * 8 * got["found"].sum()
    p_start = svc.true_labels(got["starts"])
    probs = jax.nn.softmax(models.logits(GRAPHDEF, PARAMS, got["clones"]))
    start = jax.nn.softmax(models.logits(GRAPHDEF, PARAMS, got["starts"]))
    rows = np.arange(4)[got["found"]]
    if attack == "nes":  # the target's probability rose (one class of this random model is
        # out of the 6-dim codes' reach)
        gain = np.asarray(probs[rows, targets[rows]] - start[rows, targets[rows]])
        assert (gain > 0).sum() >= 3 and gain.mean() > 0.15
    else:  # each clone started at a code the service labels as its target, and stays one
        assert (p_start[rows] == targets[rows]).all()
        assert (svc.true_labels(got["clones"])[rows] == targets[rows]).all()


def test_bad_settings_are_refused():
    with pytest.raises(JaxmiaError, match="expected one of"):
        query.Settings(attack="magic")
    with pytest.raises(JaxmiaError, match="even samples"):
        query.Settings(samples=3)
    with pytest.raises(JaxmiaError, match="growth"):
        query.Settings(growth=1.0)
