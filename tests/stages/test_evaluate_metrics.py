"""Tests of jaxmia.stages.evaluate: ranks, top-k, CMC, best clone, KNN distance, name matching."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmia.attacks import inversions_file
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models
from jaxmia.stages import evaluate as evaluate_lib

TINY = models.ModelConfig(
    num_classes=4,
    image_size=(16, 16),
    channels=1,
    conv_features=(2, 4, 4, 4),
    kernel_sizes=(3, 3, 3, 3),
    dense_features=(8, 8),
)
NAMES = ("ann", "bob", "cy", "dee")


@dataclasses.dataclass(frozen=True)
class Rec:
    """Stands in for checkpoint.LoadedRecognizer (what evaluation uses of it)."""

    graphdef: nnx.GraphDef
    params: nnx.State
    config: models.ModelConfig
    names: tuple[str, ...]
    path: Path = Path("fake-ckpt")
    meta: dict = dataclasses.field(default_factory=dict)


def tiny_recognizer(names=NAMES, seed=0) -> Rec:
    graphdef, params = models.init(TINY, jax.random.key(seed))
    return Rec(graphdef, params, TINY, tuple(names))


def permuted(rec: Rec, names: tuple[str, ...]) -> Rec:
    """The same function with its classes in the order of ``names``: each identity's logit moves
    with it, so a name-matched score is unchanged."""
    perm = np.array([rec.names.index(n) for n in names])
    pure = nnx.to_pure_dict(rec.params)
    pure["head"]["kernel"] = pure["head"]["kernel"][:, perm]
    pure["head"]["bias"] = pure["head"]["bias"][perm]
    params = jax.tree.map(lambda x: x, rec.params)
    nnx.replace_by_pure_dict(params, pure)
    return Rec(rec.graphdef, params, rec.config, names)


def fake_inversions(
    ids=("cy", "ann"), n=3, seed=0, shape=(16, 16, 1)
) -> inversions_file.Inversions:
    rng = np.random.default_rng(seed)
    clones = rng.uniform(size=(len(ids), n, *shape)).astype(np.float32)
    seeds = np.broadcast_to(np.full(shape, 0.5, np.float32), clones.shape)
    return inversions_file.Inversions(
        clones=clones,
        seeds=seeds,
        identities=tuple(ids),
        target_confidence=rng.uniform(size=(len(ids), n)),
        seed_target_confidence=None,
        diverged=np.zeros((len(ids), n), bool),
        steps=np.full((len(ids), n), 10),
        summary={},
        source="fake.npz",
    )


def write_fake_run(folder: Path, inv: inversions_file.Inversions, **extra) -> Path:
    """An inversions.npz as ``jaxmia invert`` writes it (one shared seed: [1, 1, h, w, c])."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = inv.diverged.shape
    arrays = dict(
        clones=inv.clones,
        seeds=np.ascontiguousarray(inv.seeds[:1, :1]),
        identities=np.array(inv.identities, dtype=str),
        labels=np.arange(len(inv.identities), dtype=np.int32),
        steps=inv.steps,
        loss=np.zeros(shape, np.float32),
        confidence=inv.target_confidence,
        seed_confidence=np.full(shape, 0.25, np.float32),
        reason=np.ones(shape, np.int32),
        diverged=inv.diverged,
        stop_reasons=np.array(["running", "steps", "confidence", "patience", "diverged"]),
    )
    arrays.update(extra)
    np.savez(folder / "inversions.npz", **arrays)
    return folder


# ------------------------------------------------------------------ ranks, top-k, CMC by hand

# Rank = number of classes whose logit is >= the target's: ties count against the target.
RANK_CASES = [
    ([[3.0, 1.0, 2.0]], [0], [1]),  # clear top
    ([[0.0, 5.0, 1.0]], [0], [3]),  # clear bottom
    ([[2.0, 5.0, 1.0]], [0], [2]),
    ([[1.0, 1.0, 1.0]], [1], [3]),  # all tied: last
    ([[2.0, 2.0, 0.0]], [1], [2]),  # tied for first: second
    ([[np.nan, 0.0, 0.0]], [2], [3]),  # non-finite: last
    ([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], [2, 2], [2, 3]),
]


@pytest.mark.parametrize("logits,targets,expected", RANK_CASES)
def test_target_ranks_by_hand(logits, targets, expected):
    got = evaluate_lib.target_ranks(np.array(logits, np.float32), np.array(targets))
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_target_ranks_jit_equals_eager():
    z = np.random.default_rng(1).normal(size=(20, 7)).astype(np.float32)
    t = np.arange(20) % 7
    eager = evaluate_lib.target_ranks(z, t)
    np.testing.assert_array_equal(jax.jit(evaluate_lib.target_ranks)(z, t), eager)
    # and equals the position of the target after a descending sort
    order = np.argsort(-z, axis=1, kind="stable")
    np.testing.assert_array_equal(
        eager, [list(o).index(tt) + 1 for o, tt in zip(order, t, strict=True)]
    )


# ranks of 5 clones among 3 classes: [1, 3, 3, 2, 1]
TOY_RANKS = np.array([1, 3, 3, 2, 1])


@pytest.mark.parametrize("k,expected", [(1, 2 / 5), (2, 3 / 5), (3, 1.0), (5, 1.0)])
def test_topk_by_hand(k, expected):
    assert evaluate_lib.topk_accuracy(TOY_RANKS, k) == pytest.approx(expected)


@pytest.mark.parametrize(
    "ranks,num_classes,expected",
    [
        (TOY_RANKS, 3, [0.4, 0.6, 1.0]),
        ([1, 1, 1, 1], 2, [1.0, 1.0]),
        ([4, 4], 4, [0.0, 0.0, 0.0, 1.0]),
        ([2, 5, 1, 5], 5, [0.25, 0.5, 0.5, 0.5, 1.0]),
    ],
)
def test_cmc_by_hand(ranks, num_classes, expected):
    np.testing.assert_allclose(evaluate_lib.cmc_curve(np.array(ranks), num_classes), expected)


@pytest.mark.parametrize(
    "scores,expected",
    [([0.1, 0.9, 0.3], 1), ([0.1, np.nan, 0.9, 0.9], 2), ([np.nan, np.nan], None), ([0.0], 0)],
)
def test_best_index(scores, expected):
    assert evaluate_lib.best_index(np.array(scores)) == expected


def test_knn_distances_equal_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(9, 6)), rng.normal(size=(4, 6))
    r[2] = q[3]  # an exact duplicate is at distance 0
    want = [min(np.sqrt(sum((a - b) ** 2)) for b in r) for a in q]
    got = evaluate_lib.knn_distances(q, r)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[3] == 0.0
    assert np.isnan(evaluate_lib.knn_distances(q, r[:0])).all()


# ------------------------------------------------------------------ device scoring


def test_score_images_match_model_and_padding():
    rec = tiny_recognizer()
    x = np.random.default_rng(2).uniform(size=(7, 16, 16, 1)).astype(np.float32)
    t = np.array([0, 1, 2, 3, 0, 1, 2])
    got = evaluate_lib.score_images(
        rec, x, t, with_features=True, batch_size=3
    )  # 3 batches, padded
    z = np.asarray(models.logits(rec.graphdef, rec.params, x))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(got.score, p[np.arange(7), t], rtol=1e-5)
    np.testing.assert_array_equal(got.rank, (z >= z[np.arange(7), t][:, None]).sum(1))
    np.testing.assert_allclose(
        got.features, models.features(rec.graphdef, rec.params, x), rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------ names and shapes


def test_labels_by_name_follow_the_recognizer_order():
    rec = tiny_recognizer(names=("dee", "ann", "cy", "bob"))
    np.testing.assert_array_equal(
        evaluate_lib.labels_by_name(("cy", "ann"), rec, "evaluator"), [2, 1]
    )


def test_unknown_identity_is_an_error_naming_it():
    with pytest.raises(JaxmiaError, match="'zed'.*evaluator"):
        evaluate_lib.labels_by_name(("ann", "zed"), tiny_recognizer(), "evaluator")


def test_wrong_image_size_is_an_error():
    inv = fake_inversions(shape=(8, 8, 1))
    with pytest.raises(JaxmiaError, match="8x8x1.*16x16x1"):
        evaluate_lib.evaluate(inv, tiny_recognizer())


# ------------------------------------------------------------------ the whole evaluation


def test_evaluate_matches_scores_by_name_and_summarises_them():
    r_e = tiny_recognizer()
    # R_T: the same function with another label order, so its name-matched scores equal R_E's
    r_t = permuted(r_e, ("dee", "cy", "bob", "ann"))
    inv = fake_inversions(ids=("cy", "ann"), n=5)
    # real faces: cy's clone 2 is one of cy's real faces, so its KNN distance is 0
    reals = {"cy": np.stack([inv.clones[0, 2], inv.seeds[0, 0] * 0.3]), "ann": inv.clones[1, :1]}
    ev = evaluate_lib.evaluate(inv, r_e, real_faces=reals, target=r_t, batch_size=4)
    s, c = ev.summary, ev.clones

    flat = inv.clones.reshape(-1, 16, 16, 1)
    labels = np.repeat([2, 0], 5)  # cy, ann in R_E's order
    direct = evaluate_lib.score_images(r_e, flat, labels)
    np.testing.assert_allclose(c["score_E"].ravel(), direct.score)
    np.testing.assert_array_equal(c["rank_E"].ravel(), direct.rank)
    np.testing.assert_allclose(c["score_T"], c["score_E"], rtol=1e-5)
    np.testing.assert_allclose(c["seed_score_T"], c["seed_score_E"], rtol=1e-5)

    assert [i["name"] for i in s["identities"]] == ["cy", "ann"]
    assert [i["label_E"] for i in s["identities"]] == [2, 0]
    for i, ident in enumerate(s["identities"]):
        ranks = c["rank_E"][i]
        assert ident["top1"] == np.mean(ranks == 1)
        assert ident["top5"] == 1.0  # 4 classes
        np.testing.assert_allclose(ident["cmc"], [np.mean(ranks <= k) for k in range(1, 5)])
        assert ident["best_clone"] == int(np.argmax(c["score_E"][i]))
        assert ident["best_score_E"] == pytest.approx(c["score_E"][i].max())
        assert ident["seed"]["top1"] == np.mean(c["seed_rank_E"][i] == 1)
    assert c["knn_distance"][0, 2] == pytest.approx(0.0, abs=1e-4)
    assert s["identities"][0]["knn_min"] == pytest.approx(0.0, abs=1e-4)
    assert s["identities"][0]["knn_mean"] == pytest.approx(c["knn_distance"][0].mean())
    assert s["overall"]["top1"] == np.mean(c["rank_E"] == 1)
    assert s["overall"]["count"] == 10
    np.testing.assert_array_equal(ev.real_face["cy"], reals["cy"][0])


def test_evaluate_without_target_uses_recorded_confidence_and_no_reals():
    inv = fake_inversions()
    ev = evaluate_lib.evaluate(inv, tiny_recognizer())
    np.testing.assert_allclose(ev.clones["score_T"], inv.target_confidence)
    assert np.isnan(ev.clones["seed_score_T"]).all()
    assert ev.summary["identities"][0]["knn_mean"] is None
    assert ev.summary["identities"][0]["seed"]["mean_score_T"] is None


# ------------------------------------------------------------------ reading a run folder


def test_load_inversions_round_trip(tmp_path):
    inv = fake_inversions()
    folder = write_fake_run(tmp_path / "run", inv)
    got = inversions_file.load_inversions(folder)
    np.testing.assert_array_equal(got.clones, inv.clones)
    assert got.seeds.shape == inv.clones.shape
    assert got.identities == inv.identities
    np.testing.assert_allclose(got.target_confidence, inv.target_confidence)


def test_load_inversions_broadcasts_one_seed_per_identity(tmp_path):
    inv = fake_inversions()
    folder = write_fake_run(tmp_path / "run", inv, seeds=np.full((2, 1, 16, 16, 1), 0.5))
    assert inversions_file.load_inversions(folder).seeds.shape == inv.clones.shape


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: d / "absent", "not found"),
        (lambda d: d, "inversions.npz: not found"),
        (
            lambda d: write_fake_run(d, fake_inversions(), identities=np.array(["a"])),
            "1 identities",
        ),
        (
            lambda d: write_fake_run(d, fake_inversions(), diverged=np.zeros(3, bool)),
            "diverged has shape",
        ),
    ],
)
def test_load_inversions_bad_input(tmp_path, make, match):
    with pytest.raises(JaxmiaError, match=match):
        inversions_file.load_inversions(make(tmp_path))


def test_load_inversions_missing_array(tmp_path):
    np.savez(tmp_path / "inversions.npz", clones=np.zeros((1, 1, 16, 16, 1)))
    with pytest.raises(JaxmiaError, match="lacks the array.*seeds, identities"):
        inversions_file.load_inversions(tmp_path)
