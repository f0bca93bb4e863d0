"""The studies' shared tables, plots and finished cells."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxmia.report import study


def test_finished_row_reads_what_the_cell_wrote(tmp_path):
    assert study.finished_row(tmp_path / "cell.json") is None
    (tmp_path / "cell.json").write_text(json.dumps({"top1": 0.5, "name": "a"}))
    assert study.finished_row(tmp_path / "cell.json") == {"top1": 0.5, "name": "a"}


def test_pct_and_markdown():
    assert [study.pct(v) for v in (None, 0.0, 0.4444, 1)] == ["", "0.0", "44.4", "100.0"]
    text = study.markdown(["a", "b"], [["1", "x"], ["2", ""]])
    assert text == "| a | b |\n|---|---|\n| 1 | x |\n| 2 |  |\n"


@pytest.mark.parametrize("end", ["\r\n", "\n"])
def test_csv_text_reads_back(end):
    text = study.csv_text(["a", "b"], [[1, None], ["x,y", 0.5]], lineterminator=end)
    assert text.endswith(end) and text.count(end) == 3
    assert list(csv.reader(io.StringIO(text))) == [["a", "b"], ["1", ""], ["x,y", "0.5"]]


def test_figure_writes_a_png_of_its_size(tmp_path):
    fig, axes = study.figure(1, 2, figsize=(4, 2), sharey=True)
    assert axes.shape == (2,)
    axes[0].plot([0, 1], [0, 1])
    study.save_png(fig, tmp_path / "p.png", dpi=50)
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.size == (200, 100)
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary file left
    _, ax = study.figure(figsize=(3, 3))
    assert not isinstance(ax, np.ndarray)


def test_the_studies_leave_matplotlibs_global_state_alone(tmp_path):
    # rcParams is a dict: reading the raw entry does not resolve (and so set) the backend
    code = (
        "import matplotlib, sys\n"
        "from jaxmia.stages import blackbox, clone, defend\n"
        "from pathlib import Path\n"
        "before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "r = {'scenario': 's', 'queries': 9, 'top1': {'R_T': 0.5, 'R_E': 0.25},\n"
        "     'robust_mean_top1': 0.2, 'seed_top1': 0.1, 'chance_top1': 0.05, 'cell': 'c',\n"
        "     'defence': 'none', 'R_T_test_accuracy': 0.9}\n"
        "blackbox.write_plot(Path(sys.argv[1]) / 'b.png', [r, r])\n"
        "defend.write_plot(Path(sys.argv[1]) / 'd.png', [r])\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == before, 'backend set'\n"
    )
    got = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert got.returncode == 0, got.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "d.png"]
