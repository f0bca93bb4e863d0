"""End-to-end tests of ``jaxmia evaluate`` on a fake tiny inversion run with tiny checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pytest
from stages.test_evaluate_metrics import fake_inversions, permuted, tiny_recognizer, write_fake_run

from jaxmia import checkpoint, cli
from jaxmia.files import write_json


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmd")
    r_e = tiny_recognizer(names=("ann", "bob", "cy", "dee"))
    r_t = permuted(r_e, ("dee", "cy", "bob", "ann"))  # same scores by name, other label order
    for path, rec in ((tmp / "r_e", r_e), (tmp / "r_t", r_t)):
        checkpoint.save_recognizer(path, rec.params, rec.config, rec.names, {"role": path.name})
    inv = fake_inversions(ids=("cy", "ann"), n=4)
    run = write_fake_run(tmp / "run", inv)
    write_json(run / "summary.json", {"checkpoint": str(tmp / "r_t")})
    return tmp, run


def evaluate(capsys, *args):
    rc = cli.main(["evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_evaluate_end_to_end(setup, capsys):
    tmp, run = setup
    out = tmp / "out"
    rc, stdout, err = evaluate(
        capsys, "--inversions", run, "--evaluator", tmp / "r_e", "--workdir", out, "--faces", "none"
    )
    assert rc == 0, err
    for name in ("evaluation.json", "clones.csv", "identities.csv", "cmc.png", "scores_hist.png",
                 "grid_cy.png", "grid_ann.png", "report.html"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["target_scores"] == str(tmp / "r_t")  # recomputed with the run's R_T
    assert [i["label_E"] for i in summary["identities"]] == [2, 0]
    rows = list(csv.DictReader((out / "clones.csv").read_text().splitlines()))
    assert len(rows) == 8
    score_t = np.array([float(r["score_T"]) for r in rows])
    score_e = np.array([float(r["score_E"]) for r in rows])
    np.testing.assert_allclose(score_t, score_e, rtol=1e-5)  # R_T is R_E with permuted labels
    assert f"top-1 by R_E {100 * summary['overall']['top1']:.1f}%" in stdout


def test_evaluate_with_recorded_confidence(setup, capsys):
    tmp, run = setup
    out = tmp / "out_none"
    rc, _, err = evaluate(
        capsys, "--inversions", run, "--evaluator", tmp / "r_e", "--workdir", out,
        "--faces", "none", "--target", "none",
    )  # fmt: skip
    assert rc == 0, err
    rows = list(csv.DictReader((out / "clones.csv").read_text().splitlines()))
    with np.load(run / "inversions.npz") as z:
        recorded, seed_recorded = z["confidence"].ravel(), z["seed_confidence"].ravel()
    np.testing.assert_allclose([float(r["score_T"]) for r in rows], recorded)
    np.testing.assert_allclose([float(r["seed_score_T"]) for r in rows], seed_recorded)


@pytest.mark.slow
def test_evaluate_a_real_invert_run(setup, capsys, monkeypatch, tmp_path):
    """The format jaxmia invert writes is the one jaxmia evaluate reads; R_T is found from
    another working directory though the run was given a relative checkpoint path."""
    tmp, _ = setup
    run, out = tmp / "inverted", tmp / "out_inverted"
    monkeypatch.chdir(tmp)
    rc = cli.main([
        "invert", "--checkpoint", "r_t", "--identities", "cy,ann", "--clones", "3",
        "--steps", "2", "--workdir", str(run), "--config.inversion.seed=grey",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    rc, _, err = evaluate(
        capsys, "--inversions", run, "--evaluator", tmp / "r_e", "--workdir", out, "--faces", "none"
    )
    assert rc == 0, err
    summary = json.loads((out / "evaluation.json").read_text())
    assert [i["name"] for i in summary["identities"]] == ["cy", "ann"]
    assert summary["target_scores"] == str(tmp / "r_t")
    rows = list(csv.DictReader((out / "clones.csv").read_text().splitlines()))
    with np.load(run / "inversions.npz") as z:
        recorded = z["confidence"].ravel()
    # R_T recomputed on the stored clones agrees with what the inversion recorded
    np.testing.assert_allclose([float(r["score_T"]) for r in rows], recorded, rtol=1e-4)


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_dir", "inversions folder .*absent: not found"),
        ("missing_npz", "inversions.npz: not found"),
        ("unknown_identity", "identity 'zed': not known to the evaluator"),
        ("missing_evaluator", "checkpoint .*nowhere: not found"),
        ("wrong_size", "8x8x1 but the evaluator"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(setup, capsys, tmp_path, case, match):
    tmp, run = setup
    evaluator = tmp / "r_e"
    if case == "missing_dir":
        run = tmp_path / "absent"
    elif case == "missing_npz":
        run = tmp_path
    elif case == "unknown_identity":
        run = write_fake_run(tmp_path / "run", fake_inversions(ids=("ann", "zed")))
    elif case == "missing_evaluator":
        evaluator = tmp_path / "nowhere"
    elif case == "wrong_size":
        run = write_fake_run(tmp_path / "run", fake_inversions(shape=(8, 8, 1)))
    rc, _, err = evaluate(
        capsys, "--inversions", run, "--evaluator", evaluator, "--workdir", tmp_path / "out"
    )
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxmia evaluate: error:")
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "out" / "evaluation.json").exists()


def fake_faces(calls):
    """A load_faces stand-in: 3 identities x 4 photos, photo j of identity i all (i + j) / 10."""
    from jaxmia.data import faces as faces_lib

    def load_faces(
        source, *, image_size, channels, cache_dir=None, synthetic=None, progress=True, crop=1.0
    ):
        calls.append(dict(source=source, image_size=image_size, channels=channels, crop=crop))
        names = ("ann", "cy", "eve")
        labels = np.repeat(np.arange(3), 4).astype(np.int32)
        values = (labels + np.tile(np.arange(4), 3)) / 10
        images = np.broadcast_to(values[:, None, None, None], (12, *image_size, channels))
        files = tuple(f"{names[i]}/{j}.png" for i in range(3) for j in range(4))
        return faces_lib.FaceSet(images.astype(np.float32), labels, names, source, False, files)

    return load_faces


@pytest.mark.parametrize(
    "train_files,expect_cy,note",
    [
        (["cy/1.png", "cy/3.png", "ann/0.png"], [0.2, 0.4], "R_E's training images in src"),
        ([], [0.1, 0.2, 0.3, 0.4], "all images of each identity in src"),
        (["x/1.png"], [0.1, 0.2, 0.3, 0.4], "all images of each identity in src"),  # other files
    ],
)
def test_real_faces_are_the_evaluators_training_images(monkeypatch, train_files, expect_cy, note):
    from jaxmia.data import faces as faces_lib
    from jaxmia.stages import evaluate as evaluate_lib

    calls = []
    monkeypatch.setattr(faces_lib, "load_faces", fake_faces(calls))
    rec = tiny_recognizer()
    rec = dataclasses.replace(rec, meta={"data": {"source": "src"}, "train_files": train_files})
    faces, got_note = evaluate_lib.real_faces_for(rec, ("cy", "dee"), None, progress=False)
    # at R_E's input shape and crop
    assert calls == [dict(source="src", image_size=(16, 16), channels=1, crop=1.0)]
    np.testing.assert_allclose(faces["cy"][:, 0, 0, 0], expect_cy)
    assert "dee" not in faces  # R_E knows dee but the face set does not
    assert got_note.startswith(note) and got_note.endswith("none for dee")
    # --faces overrides the recorded source; --faces none skips real faces
    evaluate_lib.real_faces_for(rec, ("cy",), "folder:x", progress=False)
    assert calls[-1]["source"] == "folder:x"
    # the crop the checkpoint records applies to its own source, not to another one
    cropped = dataclasses.replace(rec, meta={**rec.meta, "data": {"source": "src", "crop": 0.5}})
    evaluate_lib.real_faces_for(cropped, ("cy",), None, progress=False)
    assert calls[-1]["crop"] == 0.5
    evaluate_lib.real_faces_for(cropped, ("cy",), "folder:x", progress=False)
    assert calls[-1]["crop"] == 1.0
    assert evaluate_lib.real_faces_for(rec, ("cy",), "none")[0] is None


@pytest.mark.slow
def test_evaluate_rejudges_an_old_run_with_the_face_judges_first(setup, capsys, monkeypatch):
    """An inversion run judged again: the face judges (on their fetched weights) come first in
    the summary, the printed lines and the clones' CSV."""
    from jaxmia.data import faces as faces_lib
    from jaxmia.judges import panel
    from jaxmia.pretrained import fetch

    for model in ("dlib_resnet", "dlib_landmarks5", "faceres"):
        try:
            fetch.model_files(model)
        except fetch.FetchError as e:
            if e.offline:
                pytest.skip(f"no registry reachable: run jaxmia models fetch {model}")
            raise
    tmp, run = setup
    names = ("ann", "bob", "cy", "dee")
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(16, 16, 16, 1)).astype(np.float32)
    files = tuple(f"{n}/{j}.png" for n in names for j in range(4))

    def load_faces(source, **kwargs):
        labels = np.repeat(np.arange(4), 4).astype(np.int32)
        return faces_lib.FaceSet(images, labels, names, source, False, files)

    monkeypatch.setattr(faces_lib, "load_faces", load_faces)
    r_e = checkpoint.load_recognizer(tmp / "r_e")
    # R_E trained on photos 0 and 1 of each: the gallery; 2 and 3 of cy and ann are held out
    trained = [f for f in files if f.endswith(("/0.png", "/1.png"))]
    checkpoint.save_recognizer(
        tmp / "r_e_face", r_e.params, r_e.config, r_e.names, {"train_files": trained}
    )
    out = tmp / "out_face"
    rc, stdout, err = evaluate(
        capsys, "--inversions", run, "--evaluator", tmp / "r_e_face", "--workdir", out,
        "--faces", "src",
    )  # fmt: skip
    assert rc == 0, err
    judged = json.loads((out / "evaluation.json").read_text())["judges"]
    face = list(panel.FACE_JUDGES)
    assert list(judged["judges"])[:4] == face and judged["top"]["real"]["face_dlib"]["count"] == 4
    assert judged["top"]["clones"]["face_dlib"]["count"] == 8
    assert any("face judges (dlib, faceres): fitted on 8" in n for n in judged["notes"])
    header = (out / "clones.csv").read_text().splitlines()[0].split(",")
    ranks = [h for h in header if h.startswith("rank_") and h != "rank_E"]
    assert ranks[:4] == [f"rank_{j}" for j in face] and "face_detected" in header
    assert "  clones: face_dlib " in stdout
