"""Training-time defences: smoothing, DP-SGD and its budget, MID, and `jaxmia defend`."""

import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy import optimize, stats
from stages.test_train_stage import SMALL

from jaxmia import checkpoint, cli
from jaxmia.config import default_config
from jaxmia.recognizers import defences, models, train


def _tiny(bottleneck=0):
    cfg = models.ModelConfig(
        num_classes=4, image_size=(16, 16), conv_features=(3, 4), kernel_sizes=(3, 3),
        dense_features=(8,), bottleneck=bottleneck,
    )  # fmt: skip
    graphdef, state = models.init(cfg, jax.random.key(0))
    return graphdef, *models.split_trainable(graphdef, state)


@pytest.mark.parametrize("alpha", [0.0, 0.2, -0.1])
def test_smoothed_loss_equals_hand_cross_entropy(alpha):
    graphdef, params, rest = _tiny()
    x = jax.random.uniform(jax.random.key(1), (5, 16, 16, 1))
    y = jnp.array([0, 1, 2, 3, 1])
    got, _ = jax.jit(train._loss, static_argnums=(0, 7))(
        graphdef, params, rest, x, y, None, jnp.float32(alpha), 0.0
    )
    z = np.asarray(models.logits(graphdef, models.join(graphdef, params, rest), x), np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    # (1 - alpha) on the label plus alpha / K everywhere (negative off the label for alpha < 0)
    t = np.full((5, 4), alpha / 4) + (1 - alpha) * np.eye(4)[np.asarray(y)]
    assert float(got) == pytest.approx(-(t * log_p).sum(1).mean(), rel=1e-5)
    if alpha == 0:
        assert float(got) == pytest.approx(-log_p[np.arange(5), np.asarray(y)].mean(), rel=1e-5)


def test_fit_without_a_defence_section_equals_the_default_defence():
    cfg = default_config()
    cfg.data.image_size = (16, 16)
    cfg.model.conv_features, cfg.model.kernel_sizes = (3, 4), (3, 3)
    cfg.model.dense_features = (8,)
    cfg.train.epochs, cfg.train.batch_size = 2, 8
    x = np.random.default_rng(0).random((16, 16, 16, 1), np.float32)
    y = np.arange(16) % 4
    old = ml_collections.ConfigDict(cfg.train.to_dict())
    del old["defence"]  # a config of before the defences
    fitted = [
        train.fit(train.model_config_for(cfg, 4), t, x, y, key=jax.random.key(0))[1]
        for t in (cfg.train, old)
    ]
    jax.tree.map(np.testing.assert_array_equal, *fitted)


def test_smoothing_ramps_linearly_to_its_value():
    d = defences.Defence(label_smoothing=-0.2, smoothing_ramp_epochs=2)
    got = [defences.smoothing_at(d, s, steps_per_epoch=3) for s in range(8)]
    np.testing.assert_allclose(got, [-0.2 * min(1, (s + 1) / 6) for s in range(8)])
    assert defences.smoothing_at(defences.Defence(label_smoothing=0.1), 0, 3) == 0.1


@pytest.mark.parametrize("clip", [0.05, 1e3])
@pytest.mark.slow
def test_private_gradients_clip_each_example_like_a_loop(clip):
    graphdef, params, rest = _tiny()
    x = jax.random.uniform(jax.random.key(1), (6, 16, 16, 1))
    y = jnp.array([0, 1, 2, 3, 0, 1])

    def one(p, xi, yi):
        return train._loss(graphdef, p, rest, xi[None], yi[None], None, 0.0, 0.0)

    losses, got = jax.jit(defences.private_gradients, static_argnums=(0, 4, 5))(
        one, params, (x, y), jax.random.key(2), clip, 0.0
    )
    # the reference: one example at a time, clipped by hand in float64
    total = jax.tree.map(lambda v: np.zeros(v.shape), params)
    norms = []
    grad_one = jax.jit(jax.grad(lambda p, xi, yi: one(p, xi, yi)[0]))
    for i in range(6):
        g = grad_one(params, x[i], y[i])
        norm = math.sqrt(
            sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in jax.tree.leaves(g))
        )
        norms.append(norm)
        scale = min(1.0, clip / norm)
        total = jax.tree.map(lambda t, v, s=scale: t + np.asarray(v) * s, total, g)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b / 6, rtol=2e-4, atol=1e-7), got, total
    )
    np.testing.assert_allclose(
        losses, [float(one(params, x[i], y[i])[0]) for i in range(6)], rtol=1e-5
    )
    # the small bound clips every example, the large one none: both branches are exercised
    assert (min(norms) > clip) if clip < 1 else (max(norms) < clip)


@pytest.mark.slow
def test_private_gradients_add_noise_of_the_stated_std():
    graphdef, params, rest = _tiny()
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))
    y = jnp.array([0, 1, 2, 3])

    def one(p, xi, yi):
        return train._loss(graphdef, p, rest, xi[None], yi[None], None, 0.0, 0.0)

    run = jax.jit(defences.private_gradients, static_argnums=(0, 4, 5))
    _, clean = run(one, params, (x, y), jax.random.key(2), 1.0, 0.0)
    _, noisy = run(one, params, (x, y), jax.random.key(2), 1.0, 3.0)
    # (sum + N(0, 3^2)) / 4 - sum / 4 = N(0, 0.75^2), over every weight
    diff = np.concatenate(
        [
            np.ravel(a - b)
            for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(clean), strict=True)
        ]
    )
    assert diff.size > 600  # the std within 4 standard errors (2.7% each)
    assert np.std(diff) == pytest.approx(0.75, rel=0.11) and abs(np.mean(diff)) < 0.05


def _gaussian_delta(eps, mu):
    """The exact delta(eps) of a Gaussian mechanism of sensitivity/std mu (Balle & Wang 2018)."""
    return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


def test_epsilon_is_the_accountants_and_above_the_exact_full_batch_value():
    got = defences.epsilon(1.1, 32, 1000, 500, 1e-5)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.032, dp_accounting.GaussianDpEvent(1.1)), 500
    )
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(event)
    # RDP is an upper bound; the PLD accountant is near-exact: close, never below it
    assert pld.get_epsilon(1e-5) <= got <= 1.3 * pld.get_epsilon(1e-5)
    # full batches: T Gaussian steps are one Gaussian of mu = sqrt(T) / sigma, exactly
    sigma, steps, delta = 8.0, 16, 1e-5
    exact = optimize.brentq(
        lambda e: _gaussian_delta(e, math.sqrt(steps) / sigma) - delta, 1e-6, 50
    )
    rdp = defences.epsilon(sigma, 100, 100, steps, delta)
    assert exact <= rdp <= 1.35 * exact
    assert defences.epsilon(0.0, 32, 1000, 10, 1e-5) == math.inf


@pytest.mark.slow
def test_dp_training_records_the_accountants_epsilon(tmp_path, capsys):
    args = [
        "train", "--workdir", str(tmp_path), "--recognizer", "target", *SMALL,
        # two convolutions: per-example gradients compile slowly, the budget does not care
        "--config.model.conv_features=(4,8)", "--config.model.kernel_sizes=(3,3)",
        "--config.train.defence.dp=True", "--config.train.defence.dp_noise=2.0",
        "--config.train.defence.dp_clip=0.5", "--config.train.defence.dp_delta=1e-4",
        "--config.train.defence.epochs=1",  # R_T's own epochs, in place of train.epochs (2)
    ]  # fmt: skip
    assert cli.main(args) == 0
    target = checkpoint.load_recognizer(tmp_path / "target")
    privacy = target.meta["defence"]["privacy"]
    n = len(target.meta["train_files"])
    steps = math.ceil(n / 16)  # 1 epoch of batches of 16
    assert target.meta["epoch"] == 1
    assert (privacy["steps"], privacy["examples"], privacy["batch_size"]) == (steps, n, 16)
    assert privacy["epsilon"] == pytest.approx(defences.epsilon(2.0, 16, n, steps, 1e-4))
    summary = json.loads((tmp_path / "target" / "train_summary.json").read_text())
    assert summary["defence"]["privacy"]["epsilon"] == privacy["epsilon"]
    assert f"epsilon {privacy['epsilon']:.2f}" in capsys.readouterr().out


def test_bottleneck_kl_and_mean_code():
    b = models.Bottleneck(3, 2, rngs=nnx.Rngs(0))
    b.encode.kernel[...] = jnp.zeros((3, 4))
    b.encode.bias[...] = jnp.array([1.0, -2.0, 0.0, math.log(4.0)])  # mu (1, -2), log var (0, ln 4)
    h = jnp.ones((2, 3))
    z, kl = b(h)
    np.testing.assert_allclose(z, [[1, -2]] * 2)
    # 0.5 * sum(mu^2 + var - 1 - log var) = 0.5 * (1 + 0 + 4 + 3 - ln 4)
    np.testing.assert_allclose(kl, [0.5 * (8 - math.log(4))] * 2, rtol=1e-6)
    samples = jnp.stack([b(h, jax.random.key(i))[0][0] for i in range(400)])
    assert np.std(samples[:, 1]) == pytest.approx(2.0, rel=0.15)


@pytest.mark.slow
def test_mid_recognizer_infers_on_the_mean_and_is_r_t_only(tmp_path):
    args = [
        "train", "--workdir", str(tmp_path), "--recognizer", "both", *SMALL,
        "--config.train.defence.bottleneck=6", "--config.train.defence.bottleneck_weight=0.1",
        "--config.train.defence.dropout=0.0",
    ]  # fmt: skip
    assert cli.main(args) == 0
    target = checkpoint.load_recognizer(tmp_path / "target")
    evaluation = checkpoint.load_recognizer(tmp_path / "evaluation")
    assert (target.config.bottleneck, evaluation.config.bottleneck) == (6, 0)
    assert (target.config.dropout, evaluation.config.dropout) == (0.0, 0.5)
    assert "defence" in target.meta and "defence" not in evaluation.meta
    x = np.random.default_rng(0).random((3, 32, 32, 1), np.float32)
    np.testing.assert_array_equal(target.logits(x), target.logits(x))


@pytest.mark.parametrize(
    "override,message",
    [
        ("dp_noise=-1.0", "train.defence.dp_noise: expected a finite noise multiplier >= 0"),
        ("dp_clip=0.0", "train.defence.dp_clip: expected a finite L2 bound > 0"),
        ("dp_delta=1.0", "train.defence.dp_delta"),
        ("label_smoothing=-1.0", "train.defence.label_smoothing: expected in (-1, 1)"),
        ("bottleneck_weight=0.1", "bottleneck_weight: applies with train.defence.bottleneck"),
        ("weight_decay=-0.5", "train.defence.weight_decay"),
        ("epochs=0", "train.defence.epochs: expected >= 1, or -1"),
    ],
)
def test_nonsensical_defences_are_refused_in_one_line(tmp_path, capsys, override, message):
    extra = (
        []
        if override.startswith(("label", "bottleneck", "weight", "epochs"))
        else ["--config.train.defence.dp=True"]
    )
    args = [
        "train",
        "--workdir",
        str(tmp_path / "w"),
        *SMALL,
        *extra,
        f"--config.train.defence.{override}",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_dp_sgd_is_refused_for_batch_norm(tmp_path, capsys):
    args = ["train", "--workdir", str(tmp_path / "w"), *SMALL, "--config.model.arch=resnet",
            "--config.train.defence.dp=True"]  # fmt: skip
    assert cli.main(args) == 2
    assert "batch norm" in capsys.readouterr().err


SWEEP = [
    *SMALL,
    "--config.inversion.clones=2",
    "--config.inversion.steps=4",
    "--config.judges.other_arch=",
    "--config.judges.eigenfaces=6",
    "--config.judges.pgd.steps=2",
    "--config.judges.transforms.samples=2",
    # the face judges cost most of a tiny cell's judging; test_experiment runs them end to end
    "--config.judges.face=()",
    "--config.defences.cells=('none:', 'nls: train.defence.label_smoothing=-0.1')",
    "--config.defences.adaptive=('inversion.learning_rate=0.2',)",
]


@pytest.mark.slow
def test_defend_writes_the_table_shares_r_e_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["defend", "--workdir", str(out), *SWEEP]) == 0
    summary = json.loads((out / "defences.json").read_text())
    rows = summary["rows"]
    assert [r["cell"] for r in rows[:1]] == ["none"] and {r["cell"] for r in rows} == {
        "none",
        "nls",
    }
    for r in rows:
        assert 0 <= r["R_T_test_accuracy"] <= 1 and set(r["top1"]) >= {"R_E", "pixel_nn"}
        assert r["robust_mean_top1"] == pytest.approx(
            np.mean(
                [
                    r["top1"][j]
                    for j in ("R_E_transformed", "eigenface_nn", "eigenface_mean", "pixel_nn")
                ]
            )
        )
    nls = [r for r in rows if r["cell"] == "nls"]
    assert nls[0]["defence"] == "train.defence.label_smoothing=-0.1"
    assert len(nls[0]["adaptive_choice"]["trials"]) == 2
    for name in ("defences.csv", "defences.md", "defences.png"):
        assert (out / name).stat().st_size > 0
    # R_E is trained once and taken over (hard-linked) by the defended cell, never defended
    a, b = out / "cells" / "none", out / "cells" / "nls"
    first = json.loads((a / "stages.json").read_text())["evaluation"]
    assert json.loads((b / "stages.json").read_text())["evaluation"] == first
    meta = next((a / "evaluation").rglob("*.json"))
    assert meta.stat().st_ino == (b / meta.relative_to(a)).stat().st_ino
    target = checkpoint.load_recognizer(b / "target")
    assert target.meta["train"]["defence"]["label_smoothing"] == -0.1
    # a rerun resumes every cell; a changed cell is refused, naming the field
    capsys.readouterr()
    assert cli.main(["defend", "--workdir", str(out), *SWEEP]) == 0
    assert "train the target recognizer R_T: done before" in capsys.readouterr().out
    assert json.loads((out / "defences.json").read_text())["rows"] == rows
    changed = [a.replace("-0.1", "-0.2") for a in SWEEP]
    assert cli.main(["defend", "--workdir", str(out), *changed]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("jaxmia defend: error: defence cell 'nls': ")
    assert "train.defence.label_smoothing: -0.1 -> -0.2" in last
    # another sweep reusing a finished experiment trains nothing that experiment has
    again = tmp_path / "again"
    reuse = [*SWEEP, "--config.defences.cells=('none:',)", f"--config.defences.reuse={a}"]
    assert cli.main(["defend", "--workdir", str(again), *reuse]) == 0
    assert "taken over from" in capsys.readouterr().out
    c = again / "cells" / "none"
    for stage in ("target", "evaluation"):
        meta = next((a / stage).rglob("*.json"))
        assert meta.stat().st_ino == (c / meta.relative_to(a)).stat().st_ino
    assert json.loads((again / "defences.json").read_text())["rows"][0]["top1"] == rows[0]["top1"]
    bad = [*SWEEP, f"--config.defences.reuse={tmp_path / 'nothing'}"]
    assert cli.main(["defend", "--workdir", str(tmp_path / "bad"), *bad]) == 2
    assert "config field defences.reuse" in capsys.readouterr().err


def test_the_face_judges_are_the_tables_first_judges():
    from jaxmia.judges import panel
    from jaxmia.stages import defend as defend_lib

    top1 = {"R_E": 0.5, "pixel_nn": 0.25, "face_dlib": 0.125, "face_faceres": 0.0}
    row = {"cell": "none", "defence": "none", "attack": "as configured", "R_T_test_accuracy": 0.9,
           "epsilon": None, "robust_mean_top1": 0.3, "seed_top1": 0.1, "clones": 4,
           "top1": top1}  # fmt: skip
    assert defend_lib.JUDGE_COLUMNS[:4] == panel.FACE_JUDGES
    head = defend_lib.table([row]).splitlines()[0].split(" | ")
    assert head[5:9] == ["face_dlib", "face_faceres", "R_E", "pixel_nn"]
    assert defend_lib._csv([row]).splitlines()[0].split(",")[5:8] == [
        "top1_face_dlib", "top1_face_faceres", "top1_R_E"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "cells,message",
    [
        ("()", "at least one cell"),
        ("('a:', 'a: train.epochs=3')", "unique NAME"),
        ("('a b:',)", "unique NAME"),
        ("('a: train.defence.dp_noise=-1.0',)", "defence cell 'a'"),
        ("('a: train.nothing=1',)", "unknown config field config.train.nothing"),
    ],
)
def test_bad_cells_are_refused_before_any_work(tmp_path, capsys, cells, message):
    args = ["defend", "--workdir", str(tmp_path / "w"), *SMALL, f"--config.defences.cells={cells}"]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
