"""benchmarks/split_seeds.py: every judge's mean and spread over experiments of several splits."""

import json

import pytest

from benchmarks import split_seeds


def _experiment(path, seed, dlib_prior, dlib_pixels, detected, accuracy):
    attacks = {
        "prior": {"top1": {"face_dlib": dlib_prior, "R_E": 0.2}},
        "pixels": {"top1": {"face_dlib": dlib_pixels, "R_E": 0.4}},
        "seeds": {"top1": {"face_dlib": 0.03, "R_E": 0.05}},
    }
    realism = {"clones": {"face_detection_rate": detected}, "seeds": {"face_detection_rate": 0.5}}
    record = {
        "comparison": {"attacks": attacks},
        "headline": {"face_realism": realism, "chance_top1": 0.03, "clones": 8},
        "baseline": {"face_realism": {"clones": {"face_detection_rate": 0.0}}},
        "config": {"split": {"seed": seed}},
        "recognizers": {"target": {"test_accuracy": accuracy}},
    }
    path.mkdir()
    (path / "experiment.json").write_text(json.dumps(record))
    return path


def test_mean_and_sample_spread_by_hand(tmp_path, monkeypatch):
    monkeypatch.setattr(split_seeds, "OUT", tmp_path / "out")
    runs = [
        _experiment(tmp_path / "a", 2, 0.02, 0.01, 0.3, 0.90),
        _experiment(tmp_path / "b", 3, 0.04, 0.03, 0.4, 0.92),
        _experiment(tmp_path / "c", 4, 0.09, 0.02, 0.5, 0.94),
    ]
    split_seeds.main(["--name", "t", *map(str, runs)])
    summary = json.loads((tmp_path / "out" / "t_split_seeds.json").read_text())["summary"]
    # mean of 0.02, 0.04, 0.09 = 0.05; deviations -0.03, -0.01, 0.04: sum of squares 0.0026 / 2
    assert summary["prior"]["face_dlib"]["mean"] == pytest.approx(0.05)
    assert summary["prior"]["face_dlib"]["sd"] == pytest.approx(0.0013**0.5)
    assert summary["pixels"]["face_dlib"] == pytest.approx({"mean": 0.02, "sd": 0.01})
    assert summary["prior"]["face_detected"] == pytest.approx({"mean": 0.4, "sd": 0.1})
    assert summary["pixels"]["face_detected"] == {"mean": 0.0, "sd": 0.0}
    assert summary["R_T_test_accuracy"] == pytest.approx({"mean": 0.92, "sd": 0.02})
    assert list(summary["prior"])[:2] == ["face_dlib", "R_E"]  # the registry's order
    assert (tmp_path / "out" / "t_split_seeds.png").stat().st_size > 0


def test_runs_of_one_split_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(split_seeds, "OUT", tmp_path / "out")
    a = _experiment(tmp_path / "a", 2, 0.02, 0.01, 0.3, 0.9)
    b = _experiment(tmp_path / "b", 2, 0.04, 0.03, 0.4, 0.9)
    with pytest.raises(SystemExit, match="different split seeds"):
        split_seeds.main(["--name", "t", str(a), str(b)])
