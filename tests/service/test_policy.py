"""The recognition service: answers, accounting, misrecognition, the countermeasure, bad input."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models
from jaxmia.service import policy as policy_lib

SHAPE = (16, 16, 1)
N_CLASSES = 6
CONFIG = models.ModelConfig(
    num_classes=N_CLASSES,
    image_size=SHAPE[:2],
    channels=1,
    conv_features=(4, 8),
    kernel_sizes=(3, 3),
    dense_features=(32,),
)
GRAPHDEF, PARAMS = models.init(CONFIG, jax.random.key(0))


def make(**policy) -> policy_lib.Service:
    return policy_lib.Service(
        GRAPHDEF,
        PARAMS,
        policy=policy_lib.Policy(**policy),
        key=jax.random.key(7),
        image_shape=SHAPE,
    )


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def textured(n, seed=0):
    """Images whose hash is stable under light noise: random low-frequency patterns."""
    rng = np.random.default_rng(seed)
    g = np.linspace(0, np.pi, SHAPE[0])
    out = sum(
        rng.normal(size=(n, 1, 1)) * np.cos(u * g)[:, None] * np.cos(v * g)[None, :] / (1 + u + v)
        for u in range(8)
        for v in range(8)
    )
    out = (out - out.min(axis=(1, 2), keepdims=True)) / np.ptp(out, axis=(1, 2), keepdims=True)
    return out[..., None].astype(np.float32)


@pytest.mark.parametrize(
    ("p", "wrong"),
    [(0.0, "uniform"), (0.1, "uniform"), (0.3, "runner_up"), (0.7, "uniform"), (1.0, "runner_up")],
)
def test_misrecognition_rate_matches_p(p, wrong):
    svc = make(misrecognition=p, wrong=wrong)
    x = images(2000, seed=1)
    answers = svc.query("a", x).labels
    h = svc.history()
    n = len(x)
    rate = h["altered"].mean()
    assert abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9
    np.testing.assert_array_equal(h["answer"], answers)
    np.testing.assert_array_equal(h["altered"], answers != h["true_label"])
    probs = np.asarray(jax.nn.softmax(models.logits(GRAPHDEF, PARAMS, x)))
    np.testing.assert_array_equal(h["true_label"], probs.argmax(1))
    if wrong == "runner_up":
        second = np.argsort(-probs, 1)[:, 1]
        np.testing.assert_array_equal(answers[h["altered"]], second[h["altered"]])


def test_uniform_wrong_identity_covers_all_others_evenly():
    svc = make(misrecognition=1.0)
    svc.query("a", images(3000, seed=2))
    h = svc.history()
    offset = (h["answer"] - h["true_label"]) % N_CLASSES
    counts = np.bincount(offset, minlength=N_CLASSES)
    assert counts[0] == 0
    expected = len(offset) / (N_CLASSES - 1)
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


def test_per_query_randomness_gives_one_image_different_answers():
    svc = make(misrecognition=0.5)
    x = np.repeat(images(1, seed=3), 200, axis=0)
    svc.query("a", x[:100])
    svc.query("a", x[100:])
    altered = svc.history()["altered"]
    assert 60 < altered.sum() < 140
    # The coins depend on the query counter only, not on how the queries were batched.
    again = make(misrecognition=0.5)
    for chunk in np.array_split(x, 7):
        again.query("a", chunk)
    np.testing.assert_array_equal(again.history()["altered"], altered)


@pytest.mark.parametrize("answer", ["label", "topk", "probs"])
def test_answer_modes(answer):
    svc = make(answer=answer, top_k=3, misrecognition=0.5)
    out = svc.query("a", images(50, seed=4))
    h = svc.history()
    np.testing.assert_array_equal(out.labels, h["answer"])
    if answer == "label":
        assert out.top_labels is None and out.probabilities is None
    elif answer == "topk":
        assert out.top_labels.shape == (50, 3) and out.probabilities.shape == (50, 3)
        np.testing.assert_array_equal(out.top_labels[:, 0], out.labels)
        assert (np.diff(out.probabilities, axis=1) <= 0).all()
        assert all(len(set(row)) == 3 for row in out.top_labels)
    else:
        assert out.probabilities.shape == (50, N_CLASSES)
        np.testing.assert_allclose(out.probabilities.sum(1), 1, atol=1e-5)
        np.testing.assert_array_equal(out.probabilities.argmax(1), out.labels)


def test_one_compile_per_bucket():
    svc = make(buckets=(8, 32))
    policy_lib._infer.clear_cache()
    policy_lib.misrecognize.clear_cache()
    for b in (1, 3, 8, 5, 2):
        svc.query("a", images(b, seed=b))
    assert policy_lib._infer._cache_size() == 1 and policy_lib.misrecognize._cache_size() == 1
    svc.query("a", images(40, seed=9))  # 32 + 8: no new shape
    svc.query("a", images(20, seed=9))
    assert policy_lib._infer._cache_size() == 2 and policy_lib.misrecognize._cache_size() == 2
    assert svc.clients["a"].queries == 1 + 3 + 8 + 5 + 2 + 40 + 20


def test_budget_per_client():
    svc = make(budget=10)
    svc.query("a", images(6))
    svc.query("b", images(10))
    before = svc.history()
    with pytest.raises(JaxmiaError, match=r"client 'a': query budget 10 exceeded \(6 used, 5 more"):
        svc.query("a", images(5))
    after = svc.history()
    for name in policy_lib.HISTORY_COLUMNS:
        np.testing.assert_array_equal(after[name], before[name])
    assert svc.clients["a"].queries == 6
    svc.query("a", images(4))
    assert svc.clients["a"].queries == 10


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 16, 15, 1), np.float32), r"shape \[batch, 16, 16, 1\], got \[2, 16, 15, 1\]"),
        (np.zeros((16, 16, 1), np.float32), "shape"),
        (np.zeros((2, 16, 16, 1), np.uint8), "float dtype"),
        (np.zeros((0, 16, 16, 1), np.float32), "empty batch"),
        (
            np.where(np.arange(512).reshape(2, 16, 16, 1) == 7, np.nan, 0.5).astype(np.float32),
            "NaN",
        ),
        (np.full((1, 16, 16, 1), 1.5, np.float32), r"values in \[0, 1\]"),
        ([[0.5]], "numpy array"),
    ],
)
@pytest.mark.parametrize("detector", ["none", "hash"])
def test_bad_queries_leave_the_service_unchanged(bad, message, detector):
    svc = make(detector=detector, misrecognition=0.3, budget=100)
    svc.query("a", images(3))
    before = svc.history()
    with pytest.raises(JaxmiaError, match=message):
        svc.query("a", bad)
    after = svc.history()
    for name in policy_lib.HISTORY_COLUMNS:
        np.testing.assert_array_equal(after[name], before[name])
    assert svc.clients["a"].queries == 3 and svc.detector_size()[0] == (
        3 if detector == "hash" else 0
    )
    # Still serving, and the next query counter follows the last good one.
    svc.query("a", images(2, seed=5))
    np.testing.assert_array_equal(svc.history()["index"], np.arange(5))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("misrecognition", 1.5, r"misrecognition: expected a probability in \[0, 1\], got 1.5"),
        ("misrecognition", -0.1, "misrecognition"),
        ("wrong", "random", "wrong"),
        ("answer", "scores", "answer"),
        ("detector", "phash", "detector"),
        ("budget", -1, "budget"),
        ("radius", 70, "radius"),
    ],
)
def test_bad_policy(field, value, message):
    with pytest.raises(JaxmiaError, match=message):
        policy_lib.Policy(
            **{field: value, "detector": "hash"} if field != "detector" else {field: value}
        )


def near_dups(x, seed):
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0, 0.005, x.shape) + 0.02, 0, 1).astype(np.float32)


@pytest.mark.parametrize("detector", ["hash", "embedding"])
def test_countermeasure_answers_near_duplicates_like_the_original(detector):
    svc = make(misrecognition=0.5, detector=detector, radius=4, cosine=0.995)
    x = textured(60, seed=6)
    first = svc.query("a", x).labels
    assert not svc.clients["a"].suspicious
    again = svc.query("a", near_dups(x, 1)).labels
    dup = svc.history()["duplicate"][60:]
    assert dup.mean() >= 0.9
    np.testing.assert_array_equal(again[dup], first[dup])
    assert svc.clients["a"].suspicious and svc.clients["a"].duplicates == dup.sum()
    # Without the countermeasure the same near-duplicates get fresh coins: many answers differ.
    naive = make(misrecognition=0.5)
    a = naive.query("a", x).labels
    b = naive.query("a", near_dups(x, 1)).labels
    assert (a != b).mean() > 0.2


def test_near_duplicates_within_one_batch_are_detected():
    svc = make(misrecognition=0.5, detector="hash", radius=4)
    x = textured(30, seed=8)
    batch = np.concatenate([x, near_dups(x, 2), near_dups(x, 3)])
    answers = svc.query("a", batch).labels.reshape(3, 30)
    dup = svc.history()["duplicate"].reshape(3, 30)
    assert not dup[0].any() and dup[1:].mean() >= 0.9
    both = dup[1] & dup[2]
    assert (answers[1][both] == answers[0][both]).all() and (
        answers[2][both] == answers[0][both]
    ).all()
    stored, nbytes = svc.detector_size()
    assert stored == 30 + (~dup[1:]).sum() and nbytes <= 16 * stored


@pytest.mark.parametrize(
    ("scope", "keyed", "caught"), [("client", "query", False), ("global", "query", True)]
)
def test_scope_against_several_accounts(scope, keyed, caught):
    svc = make(misrecognition=0.5, detector="hash", scope=scope, keyed=keyed)
    x = textured(60, seed=9)
    svc.query("acct-0", x)
    svc.query("acct-1", near_dups(x, 4))
    dup = svc.history()["duplicate"][60:]
    assert (dup.mean() >= 0.9) if caught else not dup.any()
    assert svc.clients["acct-1"].suspicious == caught
    # Exact copies from a third account: one coin per hash globally, fresh coins per client.
    svc.query("acct-2", x)
    altered = svc.history()["altered"]
    assert np.array_equal(altered[120:], altered[:60]) == caught


def test_fingerprint_keyed_misrecognition_is_a_function_of_the_fingerprint():
    svc = make(misrecognition=0.5, keyed="fingerprint", fingerprint_bits=16)
    x = textured(200, seed=10)
    a = svc.query("acct-0", x).labels
    b = svc.query("acct-1", x).labels  # exact copies, another account, no history needed
    np.testing.assert_array_equal(a, b)
    assert 0.3 < svc.history()["altered"][:200].mean() < 0.7
    h = svc.history()["hash"]
    mask = np.uint64(0xFFFF)
    same_fp = (h[:200, None] & mask) == (h[None, :200] & mask)
    coins = svc.history()["altered"][:200]
    assert (coins[:, None] == coins[None, :])[same_fp].all()


def test_history_records_clients_in_order():
    svc = make(misrecognition=0.2)
    svc.query("x", images(3))
    svc.query("y", images(2))
    svc.query("x", images(1))
    h = svc.history()
    np.testing.assert_array_equal(h["client"], [0, 0, 0, 1, 1, 0])
    assert list(h["client_names"]) == ["x", "y"]
    assert {k: c.queries for k, c in svc.clients.items()} == {"x": 4, "y": 2}


def test_true_labels_are_unrecorded_and_unaltered():
    svc = make(misrecognition=1.0)
    x = images(10)
    np.testing.assert_array_equal(
        svc.true_labels(x), np.asarray(models.logits(GRAPHDEF, PARAMS, x)).argmax(1)
    )
    assert len(svc.history()["index"]) == 0 and not svc.clients


def test_policy_is_a_frozen_record():
    pol = policy_lib.Policy(misrecognition=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pol.misrecognition = 0.5


def test_service_from_a_checkpoint_answers_like_the_saved_model(tmp_path):
    from jaxmia import checkpoint

    checkpoint.save_recognizer(
        tmp_path / "rec", PARAMS, CONFIG, [f"id{i}" for i in range(N_CLASSES)]
    )
    svc = policy_lib.Service.from_checkpoint(
        str(tmp_path / "rec"), policy=policy_lib.Policy(), key=jax.random.key(0)
    )
    assert svc.image_shape == SHAPE and svc.num_classes == N_CLASSES
    x = images(5, seed=11)
    np.testing.assert_array_equal(svc.query("a", x).labels, make().true_labels(x))
