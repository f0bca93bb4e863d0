"""jaxmia experiment end to end on tiny synthetic faces: outputs, skip, resume, redo, bad input."""

from __future__ import annotations

import html
import json
import re
import shutil

import jax
import numpy as np
import pytest

from jaxmia import checkpoint, cli, config, files
from jaxmia.attacks import inversion as inv
from jaxmia.attacks import selection
from jaxmia.data import faces as data_lib
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import train
from jaxmia.stages import experiment

TINY = [
    "--config.data.source=synthetic",
    "--config.data.image_size=(32,32)",
    "--config.data.synthetic.num_identities=10",
    "--config.data.synthetic.images_per_identity=6",
    "--config.split.num_attacked=2",
    "--config.split.test_per_identity=2",
    "--config.model.conv_features=(4,8,8,8)",
    "--config.model.dense_features=(32,32)",
    "--config.train.batch_size=16",
    "--config.train.epochs=2",
    "--config.train.checkpoint_every=1",
    "--config.inversion.clones=2",
    "--config.inversion.steps=4",
    "--config.inversion.seed=mean",
    "--config.inversion.loss=cross_entropy",
    "--config.inversion.optimizer=adam",
    "--config.inversion.learning_rate=0.05",
    "--config.inversion.max_batch=2",
    "--config.judges.other_model.widths=(4,8)",
    "--config.judges.other_model.blocks=(1,1)",
    "--config.judges.other_train.epochs=2",
    "--config.judges.eigenfaces=8",
    "--config.judges.transforms.samples=2",
    "--config.judges.pgd.steps=3",
    "--config.judges.pgd.per_identity=2",
]


@pytest.fixture(autouse=True)
def only_experiment(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"experiment": cli.COMMANDS["experiment"]})


def run_cli(capsys, workdir, *extra):
    rc = cli.main(["experiment", "--workdir", str(workdir), *TINY, *map(str, extra)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err, *words):
    """One line of error (besides progress bars, which redraw with carriage returns)."""
    lines = [line for line in err.strip().splitlines() if "\r" not in line and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("jaxmia experiment: error:"), err
    for w in words:
        assert w in lines[0], err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One run (restarts 2: selection by R_T is part of it), killed twice on the way.

    First in R_E's training, then in the inversion's second chunk; each rerun resumes.
    Returns the workdir and what the three runs printed.
    """
    work = tmp_path_factory.mktemp("exp") / "run"
    argv = ["experiment", "--workdir", str(work), *TINY, "--config.experiment.restarts=2"]
    outs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "COMMANDS", {"experiment": cli.COMMANDS["experiment"]})
        real_step, steps = train.train_step, []

        def interrupted_step(*args, **kwargs):
            steps.append(1)
            if len(steps) == 6:  # R_T: 2 epochs x 2 batches; then R_E's second epoch
                raise KeyboardInterrupt
            return real_step(*args, **kwargs)

        mp.setattr(train, "train_step", interrupted_step)
        outs.append((cli.main(argv), _records(work), _epochs(work)))

    with pytest.MonkeyPatch.context() as mp:
        real_batch, batches = inv.invert_batch, []

        def interrupted_batch(*args, **kwargs):
            batches.append(1)
            if len(batches) == 2:
                raise KeyboardInterrupt
            return real_batch(*args, **kwargs)

        mp.setattr(cli, "COMMANDS", {"experiment": cli.COMMANDS["experiment"]})
        mp.setattr(inv, "invert_batch", interrupted_batch)
        rc = cli.main(argv)
        chunks = len(list((work / "inversions" / "chunks").glob("chunk_*.npz")))
        outs.append((rc, _records(work), _epochs(work), chunks))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "COMMANDS", {"experiment": cli.COMMANDS["experiment"]})
        outs.append((cli.main(argv), _records(work)))
    return work, outs


def _records(work):
    return {k: v["status"] for k, v in json.loads((work / "stages.json").read_text()).items()}


def _epochs(work):
    return [m["epoch"] for m in files.read_jsonl(work / "evaluation" / "metrics.jsonl")]


@pytest.mark.slow
def test_interrupted_stages_resume(finished):
    work, (first, second, third) = finished
    rc, records, epochs = first
    assert rc == 130
    assert records == {"split": "done", "target": "done", "evaluation": "running"}
    assert epochs == [1]  # R_E's first epoch is checkpointed
    rc, records, epochs, chunks = second
    assert rc == 130 and records["inversions"] == "running" and chunks == 1
    assert epochs == [1, 2]  # resumed after epoch 1 rather than started over
    rc, records = third
    assert rc == 0 and set(records.values()) == {"done"}
    summary = json.loads((work / "inversions" / "summary.json").read_text())
    assert summary["timing"]["chunks"] == 4 and summary["timing"]["chunks_resumed"] == 1


@pytest.mark.slow
def test_outputs_and_report_numbers_equal_json(finished):
    w = finished[0]
    for name in ("split.json", "config.json", "stages.json", "experiment.json"):
        assert (w / name).is_file(), name
    for name in ("report.html", "evaluation.json", "clones.csv", "identities.csv", "cmc.png"):
        assert (w / "report" / name).is_file(), name
    assert checkpoint.load_recognizer(w / "target").step == 2
    assert checkpoint.load_recognizer(w / "evaluation").step == 2
    other = checkpoint.load_recognizer(w / "evaluation_other")
    assert other.config.arch == "resnet" and other.config.widths == (4, 8)
    assert other.names == checkpoint.load_recognizer(w / "evaluation").names
    records = json.loads((w / "stages.json").read_text())
    assert [records[s]["status"] for s in experiment.STAGES] == ["done"] * 8

    summary = json.loads((w / "report" / "evaluation.json").read_text())
    assert summary["num_identities"] == 2 and summary["clones_per_identity"] == 2
    assert summary["inversions"].endswith("selected/inversions.npz")
    page = (w / "report" / "report.html").read_text()
    o, s = summary["overall"], summary["overall"]["seed"]
    head = re.search(r"Top-1 attack accuracy by R_E: ([\d.]+)%</b>\s*\(top-5 ([\d.]+)%\)", page)
    assert head and float(head[1]) == round(100 * o["top1"], 1)
    assert float(head[2]) == round(100 * o["top5"], 1)
    seed = re.search(r"the seed alone: ([\d.]+)%\s*\(top-5 ([\d.]+)%\)", page)
    assert float(seed[1]) == round(100 * s["top1"], 1) and float(seed[2]) == round(
        100 * s["top5"], 1
    )
    # The table's exact values (hover titles) are the JSON's.
    overall_row = page[page.index('<tr class="overall">') :].split("</tr>")[0]
    titles = dict(re.findall(r'data-key="(\w+)" title="([^"]*)"', overall_row))
    assert float(html.unescape(titles["top1"])) == o["top1"]
    assert float(html.unescape(titles["top5"])) == o["top5"]
    head_json = json.loads((w / "experiment.json").read_text())["headline"]
    assert head_json["top1"] == o["top1"] and head_json["seed_top1"] == s["top1"]

    # Every judge on every group, R_E's row the same as its own table, the report shows them.
    judged = summary["judges"]
    assert set(judged["top"]) == {"clones", "seeds", "real", "pgd"}
    face = ["face_dlib", "face_dlib_centroid", "face_faceres", "face_faceres_centroid"]
    every = {"R_T", "R_E", "R_E_transformed", "R_E_other", "R_E_other_transformed",
             "eigenface_nn", "eigenface_mean", "pixel_nn", *face}  # fmt: skip
    assert set(judged["top"]["clones"]) == every
    # The face judges come first: in the summary, its tables and the clones' CSV.
    assert list(judged["judges"])[:4] == face and judged["robust"][:4] == face
    for g in ("clones", "seeds", "real", "pgd"):
        assert list(judged["top"][g])[:4] == face
        assert 0 <= judged["realism"][g]["face_detection_rate"] <= 1
        assert judged["realism"][g]["face_knn_distance_dlib"] > 0
    assert judged["top"]["real"]["face_dlib"]["count"] == 4
    assert page.index("face judge, dlib") < page.index("R_E (R_T&#x27;s architecture")
    assert judged["top"]["clones"]["R_E"]["top1"] == o["top1"]
    assert judged["top"]["seeds"]["R_E"]["top1"] == s["top1"]
    assert judged["top"]["clones"]["R_E"]["count"] == 4
    assert judged["top"]["pgd"]["R_T"]["count"] == 4  # 2 per identity
    assert judged["top"]["real"]["R_E"]["count"] == 4  # 2 test photos of each attacked person
    inflation = judged["inflation"]
    best = max(judged["robust"], key=lambda j: judged["top"]["clones"][j]["top1"])
    assert inflation["adversarial_inflation"] == pytest.approx(
        o["top1"] - judged["top"]["clones"][best]["top1"]
    )
    assert head_json["adversarial_inflation"] == inflation["adversarial_inflation"]
    assert any("8 components of 16 R_E training photos" in n for n in judged["notes"])
    assert "Judges beside R_E" in page and "Adversarial inflation" in page
    assert (w / "report" / "judges.png").is_file()
    header = (w / "report" / "clones.csv").read_text().splitlines()[0].split(",")
    assert "rank_pixel_nn" in header and "rank_R_E_other" in header and "knn_ratio" in header
    judges_columns = [h for h in header if h.startswith("rank_") and h != "rank_E"]
    assert judges_columns[:4] == [f"rank_{j}" for j in face]
    assert {"face_detected", "face_knn_distance_dlib", "face_knn_distance_faceres"} <= set(header)


@pytest.mark.slow
def test_selection_keeps_the_best_by_r_t(finished):
    finished = finished[0]
    sel = finished / "inversions" / "selected" / "inversions.npz"
    with np.load(finished / "inversions" / "inversions.npz") as z, np.load(sel) as k:
        assert z["clones"].shape[:2] == (2, 4) and k["clones"].shape[:2] == (2, 2)
        for i in range(2):
            picked = k["selected"][i]
            np.testing.assert_array_equal(k["clones"][i], z["clones"][i, picked])
            np.testing.assert_array_equal(k["confidence"][i], z["confidence"][i, picked])
            # best first, and nothing left out scores higher than what was kept
            assert np.all(np.diff(k["select_score"][i]) <= 0)
    rec_t = checkpoint.load_recognizer(finished / "target")
    with np.load(finished / "inversions" / "inversions.npz") as z:
        flat = z["clones"].reshape(-1, *z["clones"].shape[2:])
        labels = np.repeat(z["labels"], z["clones"].shape[1])
    cfg = config.default_config()
    scores = selection.robust_margins(
        rec_t, flat, labels, jitter=2, flip=True, samples=8,
        key=jax.random.fold_in(jax.random.key(cfg.inversion.rng_seed), 2),
    ).reshape(2, 4)  # fmt: skip
    with np.load(sel) as k:
        for i in range(2):
            np.testing.assert_allclose(
                k["select_score"][i], np.sort(scores[i])[::-1][:2], rtol=1e-5
            )


@pytest.mark.slow
def test_logit_margins_by_hand(finished):
    rec_t = checkpoint.load_recognizer(finished[0] / "target")
    x = np.random.default_rng(0).uniform(size=(300, 32, 32, 1)).astype(np.float32)  # 2 batches
    y = np.arange(300) % rec_t.config.num_classes
    z = np.asarray(rec_t.logits(x), np.float64)
    others = z.copy()
    others[np.arange(300), y] = -np.inf
    want = z[np.arange(300), y] - others.max(axis=1)
    np.testing.assert_allclose(selection.logit_margins(rec_t, x, y), want, rtol=1e-4, atol=1e-4)
    # Without transforms the robust margin is the plain one.
    robust = selection.robust_margins(
        rec_t, x[:3], y[:3], jitter=0, flip=False, samples=2, key=jax.random.key(0)
    )
    np.testing.assert_allclose(robust, want[:3], rtol=1e-4, atol=1e-4)


def _record_stages(monkeypatch) -> list[str]:
    """The stages that run from now on, in order (each still runs)."""
    called = []
    real = dict(experiment.STAGE_FUNCTIONS)
    monkeypatch.setattr(
        experiment,
        "STAGE_FUNCTIONS",
        {s: (lambda run, s=s: called.append(s) or real[s](run)) for s in experiment.STAGES},
    )
    return called


@pytest.mark.slow
def test_rerun_skips_every_stage(finished, capsys, monkeypatch):
    finished = finished[0]

    def boom(run):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(experiment, "STAGE_FUNCTIONS", dict.fromkeys(experiment.STAGES, boom))
    before = (finished / "report" / "evaluation.json").stat().st_mtime_ns
    rc, out, err = run_cli(capsys, finished, "--config.experiment.restarts=2")
    assert rc == 0, err
    assert out.count("skipped") == 8
    summary = json.loads((finished / "report" / "evaluation.json").read_text())
    assert f"top-1 by R_E {100 * summary['overall']['top1']:.1f}%" in out
    assert f"report: {finished / 'report' / 'report.html'}" in out
    assert (finished / "report" / "evaluation.json").stat().st_mtime_ns == before
    # the face judge's line first among the judges'
    assert "face judge face_dlib: clones top-1" in out and "a face found by dlib's detector" in out
    assert out.index("face judge face_dlib") < out.index("judges beside R_E")


@pytest.mark.slow
def test_reuse_takes_over_the_stages_with_equal_settings(finished, tmp_path, capsys, monkeypatch):
    """Another attack on the same split: R_T and the judges are taken over, never trained."""
    called = _record_stages(monkeypatch)
    work = tmp_path / "other-attack"
    reuse = f"--config.experiment.reuse={finished[0]}"
    rc, out, err = run_cli(
        capsys, work, "--config.experiment.restarts=2", "--config.inversion.steps=5", reuse
    )
    assert rc == 0, err
    assert "taken over from" in out and "target" in out.split("taken over from")[1]
    assert called == ["inversions", "report"]
    for name in ("target", "evaluation"):
        assert (work / name).is_dir()
    rc, _, err = run_cli(capsys, tmp_path / "x", f"--config.experiment.reuse={tmp_path}")
    assert rc == 2
    one_line_error(err, "experiment.reuse", "expected the workdir of a jaxmia experiment")


@pytest.mark.slow
def test_reuse_takes_a_priors_baseline_from_a_pixel_experiment(
    finished, tmp_path, capsys, monkeypatch
):
    """A prior's pixel baseline with the pixel run's settings is that run's clones, not rerun."""
    called = _record_stages(monkeypatch)
    work = tmp_path / "linear"
    prior = (
        "--config.experiment.restarts=2",
        "--config.inversion.prior=linear",
        "--config.inversion.prior_components=4",
    )
    reuse = f"--config.experiment.reuse={finished[0]}"
    rc, out, err = run_cli(capsys, work, *prior, reuse)
    assert rc == 0, err
    assert "baseline (their inversions)" in out
    assert called == ["inversions", "report"]
    a, b = finished[0] / "inversions" / "inversions.npz", work / "baseline" / "inversions.npz"
    with np.load(a) as theirs, np.load(b) as ours:
        np.testing.assert_array_equal(theirs["clones"], ours["clones"])
    called[:] = []  # recorded with this config's settings: a rerun skips every stage
    rc, out, err = run_cli(capsys, work, *prior, reuse)
    assert rc == 0, err
    assert called == [] and out.count("skipped") == 8
    # with other pixel settings the baseline runs
    other, called[:] = tmp_path / "other", []
    rc, out, err = run_cli(capsys, other, *prior, reuse, "--config.inversion.learning_rate=0.5")
    assert rc == 0, err
    assert "baseline (their" not in out and "baseline" in called


@pytest.mark.slow
def test_changed_setting_is_an_error_then_redo(finished, tmp_path, capsys, monkeypatch):
    work = tmp_path / "copy"
    shutil.copytree(finished[0], work)
    rc, _, err = run_cli(
        capsys, work, "--config.experiment.restarts=2", "--config.inversion.steps=5"
    )
    assert rc == 2
    one_line_error(err, "'inversions'", "inversion.steps: 4 -> 5", "--redo")

    called = _record_stages(monkeypatch)
    rc, out, err = run_cli(
        capsys, work, "--config.experiment.restarts=2", "--config.inversion.steps=5", "--redo"
    )
    assert rc == 0, err
    assert called == ["inversions", "report"]  # the recognizers were kept
    with np.load(work / "inversions" / "inversions.npz") as z:
        assert (z["steps"] == 5).all()


@pytest.mark.slow
def test_a_stage_that_failed_on_bad_input_holds_nothing(tmp_path, capsys):
    """A split asking for more identities than the data has fails; the corrected rerun runs."""
    work = tmp_path / "w"
    rc, _, err = run_cli(capsys, work, "--config.split.num_attacked=9", "--config.split.num_aux=2")
    assert rc == 2
    one_line_error(err, "identities")
    assert experiment.read_records(work)["split"]["status"] == "running"
    cfg = config.default_config()
    config.apply_overrides(cfg, TINY)
    records = experiment.run_stages(cfg, work, until="split", progress=False)
    assert records["split"]["status"] == "done" and (work / "split.json").is_file()


@pytest.mark.slow
def test_an_interrupted_stage_with_outputs_holds_its_settings(finished, tmp_path, capsys):
    """Interrupted after writing: other settings are refused (--redo restarts it)."""
    work = tmp_path / "copy"
    shutil.copytree(finished[0], work)
    records = experiment.read_records(work)
    records["inversions"] = {"status": "running", "attempted": records["inversions"]["settings"]}
    del records["report"]
    files.write_json(work / experiment.RECORD, records)
    rc, _, err = run_cli(
        capsys, work, "--config.experiment.restarts=2", "--config.inversion.learning_rate=0.1"
    )
    assert rc == 2
    one_line_error(err, "'inversions' was interrupted", "inversion.learning_rate", "--redo")


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--config.experiment.restarts=0"], ["experiment.restarts"]),
        (["--config.experiment.select=best"], ["experiment.select", "robust"]),
        (["--config.experiment.select_samples=0"], ["experiment.select_samples"]),
        (["--config.inversion.clones=0"], ["inversion.clones"]),
        (["--config.inversion.loss=l1"], ["inversion.loss"]),
        (["--config.data.source=nowhere:x"], ["nowhere"]),
        (["--config.split.num_aux=0", "--config.split.num_attacked=2"], ["split.num_aux=0"]),
        (["--config.split.num_attacked=9", "--config.split.num_aux=2"], ["identities"]),
        (["--config.experiment.bogus=1"], ["experiment.bogus"]),
        (["--config.judges.other_arch=vgg"], ["judges.other_arch", "resnet"]),
        (["--config.judges.other_train.epochs=0"], ["second R_E", "epochs"]),
        (["--config.judges.sort_by=bogus"], ["judges.sort_by", "pixel_nn"]),
        (["--config.judges.pgd.epsilon=0"], ["epsilon"]),
        (["--config.judges.eigenfaces=0"], ["judges.eigenfaces"]),
        (["--config.inversion.feature_weight=0.1"], ["no batch normalisation", "resnet"]),
        (["--config.inversion.prior=generator", "--config.prior.widths=(8,8,8,8,8,8)"], ["prior"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, extra, words):
    rc, _, err = run_cli(capsys, tmp_path / "w", *extra)
    assert rc == 2
    one_line_error(err, *words)


def test_bad_workdir_and_record(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    rc, _, err = run_cli(capsys, target)
    assert rc == 2
    one_line_error(err, "not a folder")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "stages.json").write_text("{not json")
    rc, _, err = run_cli(capsys, tmp_path / "w")
    assert rc == 2
    one_line_error(err, "stages.json", "delete it")


def _faces(identities: int, photos: int = 7) -> data_lib.FaceSet:
    return data_lib.FaceSet(
        images=np.zeros((identities * photos, 8, 8, 1), np.float32),
        labels=np.repeat(np.arange(identities), photos).astype(np.int32),
        names=tuple(f"p{i}" for i in range(identities)),
        source="test",
        synthetic=True,
    )


@pytest.mark.parametrize(
    "identities,attacked,aux",
    [(40, 5, 7), (8, 2, 1), (4, 1, 1), (6, 1, 1)],
)
def test_split_scales_down_to_small_data_sets(identities, attacked, aux):
    cfg = config.default_config()
    split, used, notes = experiment.make_split(cfg, _faces(identities))
    assert len(split.attacked) == attacked and len(split.aux_identities) == aux
    assert used.split.num_attacked == attacked
    assert len(split.evaluation.identities) > attacked  # R_E also knows others
    scaled = any("too few for split.num_attacked=5" in n for n in notes)
    assert scaled == (attacked < 5)
    assert any(f"{aux * 7} faces" in n for n in notes)
    assert any("SYNTHETIC" in n for n in notes)


def test_split_needs_four_identities():
    with pytest.raises(JaxmiaError, match="3 identities; the experiment needs at least 4"):
        experiment.make_split(config.default_config(), _faces(3))


def test_stage_settings_chain(tmp_path):
    cfg = config.default_config()
    base = experiment.stage_settings(cfg)
    done = {s: {"status": "done", "settings": base[s]} for s in base}
    cfg.inversion.steps = 7
    after = experiment.stage_settings(cfg)
    assert experiment.changed_stage(done, after, tmp_path) == (
        "inversions",
        "ran",
        ["inversion.steps"],
    )
    cfg.data.cache_dir = "/elsewhere"  # where the cache is does not change a result
    cfg.inversion.shard = not cfg.inversion.shard  # nor how the inversion runs
    cfg.inversion.steps = config.default_config().inversion.steps
    assert experiment.stage_settings(cfg)["split"] == base["split"]
    assert experiment.stage_settings(cfg)["inversions"] == base["inversions"]
    cfg.train.epochs = 1
    changed = experiment.changed_stage(done, experiment.stage_settings(cfg), tmp_path)
    assert changed[0] == "target"


GENERATOR = [
    "--config.inversion.prior=generator",
    "--config.inversion.prior_residual=True",
    "--config.inversion.residual_weight=1.0",
    "--config.inversion.denoise=gaussian",
    "--config.prior.epochs=2",
    "--config.prior.widths=(8,16)",
    "--config.prior.latent_dim=8",
    "--config.prior.batch_size=8",
    "--config.judges.other_arch=",
    "--config.judges.pgd.per_identity=0",  # the controls are the pixel experiment's to test
    "--config.judges.face=()",  # the face judges are the pixel experiment's to test
]


@pytest.mark.slow
def test_a_prior_experiment_trains_its_generator_and_judges_the_pixel_attack_beside_it(
    finished, tmp_path, capsys
):
    # The finished experiment's recognizers serve (a redo from the prior stage on).
    work = tmp_path / "w"
    shutil.copytree(finished[0], work)
    rc, out, err = run_cli(capsys, work, "--config.experiment.restarts=2", *GENERATOR, "--redo")
    assert rc == 0, err
    assert "[2/8] target: train the target recognizer R_T: done before" in out
    records = experiment.read_records(work)
    assert [records[s]["status"] for s in experiment.STAGES] == ["done"] * 8
    assert records["prior"]["result"]["faces"] > 0 and (work / "prior" / "samples.png").is_file()
    run = json.loads((work / "inversions" / "run.json").read_text())["settings"]
    assert run["inversion.prior"] == "generator"
    assert run["inversion.prior_checkpoint"] == str(work / "prior")
    base = json.loads((work / "baseline" / "run.json").read_text())["settings"]
    # (settings at their default are left out of a record: jaxmia.workdir.LATER_DEFAULTS)
    assert base.get("inversion.prior", "pixels") == "pixels"
    assert not base.get("inversion.prior_residual", False)
    assert base["inversion.denoise"] == "gaussian"  # the same attack otherwise
    with (
        np.load(work / "inversions" / "inversions.npz") as a,
        np.load(work / "baseline" / "inversions.npz") as b,
    ):
        np.testing.assert_array_equal(a["seeds"], b["seeds"])  # the same seeds
        assert np.abs(a["clones"] - b["clones"]).max() > 1e-3  # other clones
    assert (work / "baseline" / "selected" / "inversions.npz").is_file()  # kept by R_T alike
    # The comparison is the two reports' own figures.
    ours = json.loads((work / "report" / "evaluation.json").read_text())
    pixels = json.loads((work / "report" / "pixels" / "evaluation.json").read_text())
    cmp = json.loads((work / "report" / "comparison.json").read_text())
    for name, ev in (("prior", ours), ("pixels", pixels)):
        row = cmp["attacks"][name]
        assert row["top1"]["R_E"] == ev["overall"]["top1"]
        clones = ev["judges"]["top"]["clones"]
        assert row["robust_mean"] == pytest.approx(
            np.mean([clones[j]["top1"] for j in cmp["robust"]])
        )
        assert row["frechet"] == ev["judges"]["realism"]["clones"]["frechet_eigenface"]
    assert set(cmp["robust"]) == {"R_E_transformed", "eigenface_nn", "eigenface_mean", "pixel_nn"}
    csv_rows = (work / "report" / "comparison.csv").read_text().splitlines()
    assert csv_rows[0].startswith("attack,R_E,") and len(csv_rows) == 4
    seeds = cmp["attacks"]["seeds"]  # the seeds beside the clones: the same for both attacks
    assert seeds["top1"]["R_E"] == ours["overall"]["seed"]["top1"]
    assert seeds["top1"]["R_E"] == pixels["overall"]["seed"]["top1"]
    assert seeds["top1"]["pixel_nn"] == ours["judges"]["top"]["seeds"]["pixel_nn"]["top1"]
    assert (work / "report" / "prior_vs_pixels.png").stat().st_size > 1000
    page = (work / "report" / "report.html").read_text()
    assert "The prior against the pixel attack" in page and page.count("<img") >= 2
    summary = json.loads((work / "experiment.json").read_text())
    assert summary["baseline"]["top1"] == pixels["overall"]["top1"]
    assert "side by side:" in out and "prior_vs_pixels.png" in out
    # The prior's settings hold the stage: another is refused, and the pixel attack is kept.
    rc, _, err = run_cli(
        capsys, work, "--config.experiment.restarts=2", *GENERATOR, "--config.prior.epochs=3"
    )
    assert rc == 2
    one_line_error(err, "'prior'", "prior.epochs: 2 -> 3", "--redo")


# The engine's Gaussian denoiser (added for the experiment's attack; see attack_levers.md).


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.7])
def test_gaussian_filter_matches_scipy(sigma):
    from scipy import ndimage

    x = np.random.default_rng(0).uniform(size=(12, 10, 2)).astype(np.float32)
    got = np.asarray(jax.jit(inv.gaussian_filter, static_argnums=1)(x, sigma))
    truncate = np.ceil(3 * sigma) / sigma  # the same kernel radius, ceil(3 sigma)
    want = np.stack(
        [
            ndimage.gaussian_filter(x[..., c], sigma, mode="nearest", truncate=truncate)
            for c in (0, 1)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_gaussian_denoise_settings():
    assert inv.InversionConfig(denoise="gaussian", denoise_sigma=2.0).denoise_sigma == 2.0
    with pytest.raises(JaxmiaError, match="denoise_sigma"):
        inv.InversionConfig(denoise="gaussian", denoise_sigma=0.0)


BLACKBOX = cli.COMMANDS["blackbox"]  # before the autouse fixture leaves only the experiment


@pytest.mark.slow
def test_blackbox_clones_the_served_r_t_inverts_the_clone_and_resumes(
    finished, tmp_path, capsys, monkeypatch
):
    work, _ = finished
    monkeypatch.setattr(cli, "COMMANDS", {"blackbox": BLACKBOX})
    argv = [
        "blackbox", "--workdir", str(tmp_path / "bb"), *TINY, "--config.experiment.restarts=2",
        f"--config.blackbox.experiment={work}", "--config.blackbox.budgets=(9,)",
        "--config.blackbox.scenarios=('none', 'countermeasure')",
        "--config.blackbox.clone_epochs=2", "--config.cloning.near_duplicates=3",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    table = json.loads((tmp_path / "bb" / "blackbox.json").read_text())
    grey, none, counter = table["rows"]
    stages = json.loads((work / "stages.json").read_text())
    assert grey["top1"]["R_E"] == stages["report"]["result"]["headline"]["top1"]
    # one query a public face, the whole public pool (one identity's 6 photos) within budget
    assert none["queries"] == none["public_faces"] == 6 and none["altered"] == 0.0
    assert counter["queries"] == 9 and counter["public_faces"] == 3  # m = 3 near-duplicates
    for row in (none, counter):
        assert set(row["top1"]) >= {"R_T", "R_E", "pixel_nn"} and 0 <= row["fidelity"] <= 1
    # the inversion ran on the clone, never on R_T
    cell = tmp_path / "bb" / "cells" / "none_b9"
    summary = json.loads((cell / "inversions" / "summary.json").read_text())
    assert "none_b9/clone" in summary["checkpoint"]
    for name in ("blackbox.md", "blackbox.csv", "blackbox.png"):
        assert (tmp_path / "bb" / name).stat().st_size > 0
    head = (tmp_path / "bb" / "blackbox.md").read_text().splitlines()[0].split(" | ")
    assert head[5:7] == ["face_dlib", "face_dlib_centroid"] and head.index("R_T") > 8
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "done before" in capsys.readouterr().out
    assert json.loads((tmp_path / "bb" / "blackbox.json").read_text())["rows"] == table["rows"]
    assert cli.main([*argv, "--config.blackbox.rate=0.5"]) == 2
    assert "blackbox.rate: 0.3 -> 0.5" in capsys.readouterr().err
    bad = [*argv[:2], str(tmp_path / "bb2"), *argv[3:], f"--config.blackbox.experiment={tmp_path}"]
    assert cli.main(bad) == 2
    assert "stage 'target' is not done" in capsys.readouterr().err
