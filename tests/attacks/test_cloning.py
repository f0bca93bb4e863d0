"""The cloning attacker: near-duplicates, estimating altered answers, the split, scenario cells."""

import jax
import ml_collections
import numpy as np
import pytest

from jaxmia import config
from jaxmia.attacks import cloning
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models
from jaxmia.service import dedup
from jaxmia.service import policy as policy_lib

SHAPE = (16, 16, 1)


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
    return (0.1 + 0.8 * out[..., None]).astype(np.float32)


def test_estimate_on_a_constructed_case():
    # Truth 0 everywhere; the service altered the marked answers.
    answers = np.array(
        [
            [0, 0, 0],  # nothing altered
            [0, 3, 0],  # one altered: flagged
            [2, 0, 0],  # one altered: flagged
            [1, 2, 0],  # two altered, no majority: all flagged, dropped
            [4, 4, 0],  # two altered alike: the wrong majority wins, the true answer is flagged
        ]
    )
    altered = answers != 0
    label, keep, flagged = cloning.estimate(answers, "relabel")
    np.testing.assert_array_equal(label[keep], [0, 0, 0, 4])
    np.testing.assert_array_equal(keep, [True, True, True, False, True])
    np.testing.assert_array_equal(flagged.sum(1), [0, 1, 1, 3, 1])
    precision, recall = cloning.precision_recall(flagged, altered)
    # flagged: 6 answers, of which altered: 3 (row 1, row 2, row 3's two); altered in all: 6.
    assert precision == pytest.approx(4 / 6) and recall == pytest.approx(4 / 6)
    _, keep, _ = cloning.estimate(answers, "drop")
    np.testing.assert_array_equal(keep, [True, False, False, False, False])
    with pytest.raises(JaxmiaError, match="cloning.estimate"):
        cloning.estimate(answers, "vote")


def test_precision_recall_of_nothing_is_nan():
    p, r = cloning.precision_recall(np.zeros((2, 3), bool), np.zeros((2, 3), bool))
    assert np.isnan(p) and np.isnan(r)


def test_near_duplicates_are_close_deterministic_and_start_with_the_image():
    x = textured(8)
    p = cloning.Perturbation(shift=1, crop=0.05, noise=0.02, brightness=0.05, jpeg=0.02)
    v = np.asarray(cloning.near_duplicates(x, jax.random.key(0), m=3, p=p))
    assert v.shape == (8, 3, *SHAPE) and v.min() >= 0 and v.max() <= 1
    np.testing.assert_array_equal(v[:, 0], x)
    assert (np.abs(v[:, 1:] - x[:, None]).mean(axis=(2, 3, 4)) < 0.15).all()
    assert (np.abs(v[:, 1] - v[:, 2]).max(axis=(1, 2, 3)) > 0).all()
    again = np.asarray(cloning.near_duplicates(x, jax.random.key(0), m=3, p=p))
    np.testing.assert_array_equal(again, v)


@pytest.mark.parametrize(
    ("field", "value"), [("noise", 0.05), ("brightness", 0.1), ("shift", 2), ("jpeg", 0.05)]
)
def test_each_transform_alone(field, value):
    x = textured(8, seed=1)
    kw = {"noise": 0.0, "brightness": 0.0, "jpeg": 0.0, field: value}
    v = np.asarray(cloning.near_duplicates(x, jax.random.key(1), m=3, p=cloning.Perturbation(**kw)))
    diff = v[:, 1:] - x[:, None]  # [8, 2, h, w, c]
    if field == "noise":
        assert abs(diff.std() - value) < 0.01
    elif field == "brightness":
        per_image = diff.reshape(8, 2, -1)
        assert (np.ptp(per_image, axis=-1) < 1e-6).all() and (
            np.abs(per_image) <= value + 1e-6
        ).all()
    elif field == "shift":
        # Every variant equals the image moved by at most 2 pixels (edge padded).
        pad = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
        for i in range(8):
            for j in range(1, 3):
                assert any(
                    np.array_equal(v[i, j], pad[i, dy : dy + 16, dx : dx + 16])
                    for dy in range(5)
                    for dx in range(5)
                )
    else:
        assert 0 < np.abs(diff).mean() < 0.05


def test_outside_radius_variants_leave_the_radius():
    x = textured(8, seed=2)
    p = cloning.Perturbation(shift=1, crop=0.05, noise=0.01, brightness=0.0, jpeg=0.0)
    v, strength = cloning.outside_radius(
        x, jax.random.key(2), m=3, p=p, radius=4, ladder=(1.0, 2.0, 3.0)
    )
    h = dedup.dct_hash(v.reshape(-1, *SHAPE)).reshape(8, 3)
    top = strength[:, 1:] == 3.0
    d01, d02, d12 = (dedup.hamming(h[:, a], h[:, b]) for a, b in [(0, 1), (0, 2), (1, 2)])
    assert ((d01 > 4) | top[:, 0]).all() and ((np.minimum(d02, d12) > 4) | top[:, 1]).all()
    assert set(np.unique(strength[:, 1:])) <= {1.0, 2.0, 3.0} and (strength[:, 0] == 0).all()


def split_cfg(**kw):
    c = config.default_config().cloning
    c.update(kw)
    return c


def test_split_disjoint_pool_and_same_pool():
    labels = np.repeat(np.arange(12), 10)
    s = cloning.clone_split(labels, split_cfg(service_identities=5), seed=0)
    assert len(s.service_identities) == 5
    assert set(labels[s.service_train]) == set(labels[s.service_test]) == set(s.service_identities)
    assert not set(labels[s.pool]) & set(s.service_identities) and len(s.pool) == 70
    assert len(s.service_train) == 25 and len(s.service_test) == 25
    same = cloning.clone_split(
        labels,
        split_cfg(service_identities=-1, pool="same", train_per_identity=4, test_per_identity=3),
        seed=1,
    )
    assert len(same.service_identities) == 6 and len(same.pool) == 18
    assert set(labels[same.pool]) == set(same.service_identities)
    all_idx = np.concatenate([same.service_train, same.service_test, same.pool])
    assert len(np.unique(all_idx)) == len(all_idx)
    again = cloning.clone_split(labels, split_cfg(service_identities=5), seed=0)
    np.testing.assert_array_equal(again.pool, s.pool)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"service_identities": 12}, "service_identities"),
        ({"service_identities": 5, "train_per_identity": 8}, "needs 13"),
        ({"pool": "other"}, "cloning.pool"),
    ],
)
def test_split_bad_config(kw, message):
    with pytest.raises(JaxmiaError, match=message):
        cloning.clone_split(np.repeat(np.arange(12), 10), split_cfg(**kw), seed=0)


MODEL = models.ModelConfig(
    num_classes=6,
    image_size=SHAPE[:2],
    channels=1,
    conv_features=(4, 8),
    kernel_sizes=(3, 3),
    dense_features=(32,),
)
GRAPHDEF, PARAMS = models.init(MODEL, jax.random.key(0))


def make_service(**policy):
    return policy_lib.Service(
        GRAPHDEF,
        PARAMS,
        policy=policy_lib.Policy(**policy),
        key=jax.random.key(5),
        image_shape=SHAPE,
    )


LIGHT = cloning.Perturbation(noise=0.002, brightness=0.02, jpeg=0.0)


@pytest.mark.parametrize(("detector", "expect_recall"), [("none", "high"), ("hash", "low")])
def test_estimation_attack_finds_altered_answers_unless_the_service_detects(
    detector, expect_recall
):
    svc = make_service(misrecognition=0.3, detector=detector, radius=4)
    res = cloning.attack(
        svc,
        textured(200, seed=3),
        budget=600,
        kind="estimate",
        m=3,
        accounts=1,
        perturbation=LIGHT,
        rule="relabel",
        key=jax.random.key(3),
    )
    assert res.queries == 600 and res.distinct == 200 and len(res.labels) == 3 * res.kept
    assert 0.2 < res.altered < 0.4
    if expect_recall == "high":
        assert res.recall > 0.85 and res.precision > 0.7 and res.label_accuracy > 0.9
        assert res.detected == 0
    else:
        assert res.recall < 0.2 and res.detected > 0.9
        assert res.label_accuracy < 0.85  # consistent altered answers pass as true ones


def test_accounts_spread_the_variants_and_global_history_catches_them():
    for scope, caught in [("client", False), ("global", True)]:
        svc = make_service(misrecognition=0.3, detector="hash", scope=scope, radius=4)
        res = cloning.attack(
            svc,
            textured(60, seed=4),
            budget=180,
            kind="estimate",
            m=3,
            accounts=3,
            perturbation=LIGHT,
            rule="relabel",
            key=jax.random.key(4),
        )
        assert set(svc.clients) == {"attacker-0", "attacker-1", "attacker-2"}
        assert all(c.queries == 60 for c in svc.clients.values())
        assert (res.detected > 0.9) if caught else (res.detected < 0.1)


def test_plain_attack_stops_at_the_pool_and_budget_too_small():
    svc = make_service(budget=1000)
    res = cloning.attack(
        svc,
        textured(30),
        budget=100,
        kind="plain",
        m=3,
        accounts=1,
        perturbation=LIGHT,
        rule="relabel",
        key=jax.random.key(0),
    )
    assert res.queries == 30 and res.kept == 30 and res.label_accuracy == 1.0
    # It trains on 3 variants of each image it asked about, made locally: only 30 queries.
    assert len(svc.history()["index"]) == 30 and res.images.shape == (90, *SHAPE)
    np.testing.assert_array_equal(res.labels, np.repeat(svc.history()["true_label"], 3))
    np.testing.assert_array_equal(res.images[::3], textured(30))
    with pytest.raises(JaxmiaError, match="query budget 2: too small"):
        cloning.attack(
            svc,
            textured(30),
            budget=2,
            kind="estimate",
            m=3,
            accounts=1,
            perturbation=LIGHT,
            rule="relabel",
            key=jax.random.key(0),
        )


def test_run_scenario_row():
    cfg = config.default_config().cloning
    cfg.perturb.update(noise=0.002, brightness=0.02, jpeg=0.0)
    train_cfg = ml_collections.ConfigDict(config.default_config().train.to_dict())
    train_cfg.epochs, train_cfg.batch_size = 2, 16
    test_x = textured(20, seed=6)
    row = cloning.run_scenario(
        "countermeasure",
        60,
        0.5,
        cfg=cfg,
        recognizer=(GRAPHDEF, PARAMS),
        image_shape=SHAPE,
        pool=textured(40, seed=5),
        test=(test_x, np.zeros(20, np.int32)),
        clone_model=MODEL,
        clone_train=train_cfg,
        key=jax.random.key(1),
    )
    assert row["queries"] == 60 and row["images"] == 20 and row["detector"] == "hash"
    assert 0 <= row["clone_accuracy"] <= 1 and 0 <= row["fidelity"] <= 1
    assert row["suspicious_accounts"] == 1 and row["detected"] > 0.9
    with pytest.raises(JaxmiaError, match="unknown scenario"):
        cloning.run_scenario(
            "nope",
            60,
            0.5,
            cfg=cfg,
            recognizer=(GRAPHDEF, PARAMS),
            image_shape=SHAPE,
            pool=textured(40),
            test=(test_x, np.zeros(20, np.int32)),
            clone_model=MODEL,
            clone_train=train_cfg,
            key=jax.random.key(1),
        )


# -- the jaxmia clone command -----------------------------------------------------------------


def tiny_faces(monkeypatch):
    """8 people x 6 photos of 16x16 textures, in place of the data loader."""
    from types import SimpleNamespace

    from jaxmia.stages import clone as clone_lib

    base = textured(8, seed=11)
    rng = np.random.default_rng(12)
    images = np.clip(np.repeat(base, 6, 0) + rng.normal(0, 0.03, (48, *SHAPE)), 0, 1).astype(
        np.float32
    )
    faces = SimpleNamespace(
        images=images,
        labels=np.repeat(np.arange(8), 6),
        names=[f"p{i}" for i in range(8)],
        source="tiny",
        synthetic=True,
    )
    calls = []

    def load_faces(source, **kw):
        calls.append((source, kw))
        return faces

    monkeypatch.setattr(clone_lib.faces_lib, "load_faces", load_faces, raising=False)
    return calls


TINY = [
    "--config.cloning.image_size=(16, 16)",
    "--config.cloning.dense_features=(32,)",
    "--config.model.conv_features=(4, 8)",
    "--config.model.kernel_sizes=(3, 3)",
    "--config.cloning.service_identities=4",
    "--config.cloning.train_per_identity=3",
    "--config.cloning.test_per_identity=2",
    "--config.cloning.service_epochs=3",
    "--config.cloning.clone_epochs=2",
    "--config.cloning.budgets=(30,)",
    "--config.cloning.scenarios=('none', 'countermeasure')",
    "--config.cloning.adaptive=()",
]


@pytest.mark.slow
def test_clone_command_writes_the_table_and_resumes(tmp_path, monkeypatch, capsys):
    from jaxmia import cli

    calls = tiny_faces(monkeypatch)
    argv = ["clone", "--workdir", str(tmp_path), *TINY]
    assert cli.main(argv) == 0
    assert calls[0][1]["image_size"] == (16, 16)
    cells = sorted((tmp_path / "cells").iterdir())
    # The plain attacker's budget stops at the pool: 4 people x 6 photos.
    assert [c.name for c in cells] == ["countermeasure_b30_p0.3.json", "none_b24_p0.json"]
    for name in (
        "table.json",
        "table.csv",
        "roc.json",
        "accuracy.png",
        "estimation.png",
        "roc.png",
    ):
        assert (tmp_path / name).stat().st_size > 0
    table = __import__("json").loads((tmp_path / "table.json").read_text())
    assert [r["scenario"] for r in table["rows"]] == ["none", "countermeasure"]
    assert table["rows"][1]["queries"] == 30 and table["rows"][1]["images"] == 10
    assert table["summary"]["hash_detector"]["radius"] == 4
    header = (tmp_path / "table.csv").read_text().splitlines()[0]
    assert header.startswith("scenario,budget,p,queries,images")
    stamps = [c.stat().st_mtime_ns for c in cells]
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert [c.stat().st_mtime_ns for c in sorted((tmp_path / "cells").iterdir())] == stamps
    assert "countermeasure" in capsys.readouterr().out
    # Other settings in the same workdir: refused, nothing overwritten.
    assert cli.main([*argv, "--config.cloning.clone_epochs=3"]) == 2
    assert "cloning.clone_epochs: 2 -> 3" in capsys.readouterr().err
    assert [c.stat().st_mtime_ns for c in sorted((tmp_path / "cells").iterdir())] == stamps
    # More cells in the grid: allowed, the saved cells stay.
    assert cli.main([*argv, "--config.cloning.budgets=(30, 40)"]) == 0
    assert len(list((tmp_path / "cells").iterdir())) == 3


@pytest.mark.slow
def test_a_refused_clone_rerun_leaves_the_split_record(tmp_path, monkeypatch, capsys):
    """The settings check comes before any write: split.json stays the first run's."""
    from jaxmia import cli

    tiny_faces(monkeypatch)
    argv = ["clone", "--workdir", str(tmp_path), *TINY, "--no-plots"]
    assert cli.main(argv) == 0
    before = {n: (tmp_path / n).read_bytes() for n in ("split.json", "config.json")}
    capsys.readouterr()
    # Another seed draws another split: refused, and neither record is touched.
    assert cli.main([*argv, "--config.cloning.seed=1"]) == 2
    assert "cloning.seed: 0 -> 1" in capsys.readouterr().err
    assert {n: (tmp_path / n).read_bytes() for n in before} == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.cloning.scenarios=('none', 'magic')", "unknown scenario 'magic'"),
        ("--config.cloning.rates=(1.5,)", r"cloning.rates: expected probabilities in \[0, 1\]"),
        ("--config.cloning.budgets=(0,)", "cloning.budgets"),
        ("--config.cloning.wrong=random", "wrong"),
        ("--config.cloning.radius=70", "radius"),
        ("--config.cloning.near_duplicates=1", "near_duplicates"),
    ],
)
def test_clone_command_bad_config_is_one_line_and_exit_2(
    tmp_path, monkeypatch, capsys, override, message
):
    from jaxmia import cli

    tiny_faces(monkeypatch)
    assert cli.main(["clone", "--workdir", str(tmp_path), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxmia clone: error:") and len(err.splitlines()) == 1
    assert __import__("re").search(message, err)
