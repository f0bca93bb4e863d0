"""Tests of jaxmia.report.html: pictures exist and are images, the HTML is self-contained and its
table shows the numbers of evaluation.json."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from stages.test_evaluate_metrics import fake_inversions, tiny_recognizer, write_fake_run

from jaxmia.report import grids
from jaxmia.report import html as html_lib
from jaxmia.stages import evaluate


class TableParser(HTMLParser):
    """Rows of the report's table as {data-key: (text, title)}, and every <img> src."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self.rows.append({})
        elif tag == "td":
            self._cell = (a["data-key"], a.get("title"))
            self.rows[-1][self._cell[0]] = ["", a.get("title")]
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self.rows[-1][self._cell[0]][0] += data


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    inv = fake_inversions(ids=("cy", "ann", "b/d"), n=12)
    run = write_fake_run(tmp / "run", inv)
    rec = tiny_recognizer(names=("ann", "b/d", "cy", "dee"))
    reals = {"cy": inv.clones[0, :2], "ann": inv.clones[1, :1]}  # none for "b/d"
    out = tmp / "out"
    summary = evaluate.judge_run(run, rec, out, real_faces=reals, progress=False).summary
    return out, summary


def test_outputs_exist_and_pictures_are_pngs(evaluated):
    out, summary = evaluated
    assert summary["files"]["grids"] == {
        "cy": "grid_cy.png",
        "ann": "grid_ann.png",
        "b/d": "grid_b_d.png",
    }
    for name in ["cmc.png", "scores_hist.png", *summary["files"]["grids"].values()]:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert not list(out.glob(".*tmp*")), "no temporary file is left behind"


def test_json_csv_and_html_agree(evaluated):
    out, summary = evaluated
    on_disk = json.loads((out / "evaluation.json").read_text())
    assert on_disk["overall"]["top1"] == summary["overall"]["top1"]

    # identities.csv: one row per identity, then the overall row, same numbers as the JSON
    lines = (out / "identities.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert [r["identity"] for r in rows] == ["cy", "ann", "b/d", "(overall)"]
    groups = [*on_disk["identities"], on_disk["overall"]]
    for row, group in zip(rows, groups, strict=True):
        assert float(row["top1"]) == group["top1"]
        assert float(row["seed_top5"]) == group["seed"]["top5"]
        assert float(row["mean_score_E"]) == pytest.approx(group["mean_score_E"], rel=1e-15)
    assert rows[2]["knn_mean"] == ""  # no real faces for b/d

    # clones.csv: one row per clone
    clone_rows = (out / "clones.csv").read_text().splitlines()
    assert len(clone_rows) == 1 + 3 * 12
    assert clone_rows[0].startswith("identity,label_E,clone,score_T,score_E,rank_E,top1,top5")

    # report.html: self-contained, table numbers are the JSON's
    text = (out / "report.html").read_text()
    parser = TableParser()
    parser.feed(text)
    assert len(parser.images) == 2 + 3
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert 'src="http' not in text and "<link" not in text
    table = [r for r in parser.rows if r]
    assert [r["identity"][0] for r in table] == ["cy", "ann", "b/d", "(overall)"]
    for row, group in zip(table, groups, strict=True):
        shown = {
            "top1": group["top1"],
            "top5": group["top5"],
            "seed_top1": group["seed"]["top1"],
            "mean_score_E": group["mean_score_E"],
            "mean_score_T": group["mean_score_T"],
            "knn_mean": group["knn_mean"],
            "best_clone": group.get("best_clone"),
            "best_score_T": group.get("best_score_T"),
        }
        for key, value in shown.items():
            text_, title = row[key]
            if value is None:
                assert text_ == "n/a"
                continue
            assert float(title) == value  # the exact value, on hover
            if text_.endswith("%"):
                assert float(text_[:-1]) / 100 == pytest.approx(value, abs=5e-4)
            else:
                assert float(text_) == pytest.approx(value, rel=5e-4)
    o = on_disk["overall"]
    assert f"Top-1 attack accuracy by R_E: {100 * o['top1']:.1f}%" in text


@pytest.mark.parametrize(
    "value,kind,text",
    [(0.4, "pct", "40.0%"), (1 / 3, "num", "0.3333"), (None, "num", "n/a"),
     (math.nan, "pct", "n/a"), (7, "int", "7")],
)  # fmt: skip
def test_format_cell(value, kind, text):
    assert html_lib.format_cell(value, kind) == text


def test_clone_grid_caps_the_clones_shown(tmp_path, monkeypatch):
    monkeypatch.setattr(grids, "MAX_CLONES", 8)
    n = 30
    clones = np.random.default_rng(0).uniform(size=(n, 8, 8, 3))
    scores = np.linspace(0, 1, n)
    ranks = np.where(scores > 0.5, 1, 2)
    html_lib.clone_grid(tmp_path / "g.png", "x", clones, scores, ranks, clones[0], None, n - 1)
    with Image.open(tmp_path / "g.png") as im:
        w, h = im.size
    # real + seed + 8 clones fill one row of 10; all 30 would take 4 rows
    assert h / w < 0.35
