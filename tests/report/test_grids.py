"""Tests of jaxmia.report.grids: safe unique file names, which clones a grid shows, the mosaic."""

import numpy as np
import pytest
from PIL import Image

from jaxmia.report import grids


def test_grid_filenames_are_safe_and_unique():
    taken = set()
    names = ["a b", "a/b", "ok.1", "", "é"]
    got = [grids.filename(n, taken) for n in names]
    assert got == [
        "grid_a_b.png",
        "grid_a_b_1.png",
        "grid_ok.1.png",
        "grid_identity.png",
        "grid__.png",
    ]


@pytest.mark.parametrize(
    "n,best,expected",
    [(3, 1, [0, 1, 2]), (3, None, [0, 1, 2]), (12, 4, list(range(8))),
     (12, 10, [0, 1, 2, 3, 4, 5, 6, 10])],
)  # fmt: skip
def test_shown_clones_always_include_the_best(monkeypatch, n, best, expected):
    monkeypatch.setattr(grids, "MAX_CLONES", 8)
    assert grids.shown_clones(n, best) == expected


@pytest.mark.parametrize("cells,rows", [(3, 1), (10, 1), (11, 2), (25, 3)])
def test_mosaic_lays_cells_out_ten_wide(tmp_path, cells, rows):
    """The picture's aspect follows the rows: one row of 10 is wide, 3 rows are taller."""
    rng = np.random.default_rng(0)
    imgs = [grids.Cell(rng.uniform(size=(8, 8, 1)), f"#{i}") for i in range(cells - 1)]
    grids.draw(tmp_path / "g.png", [grids.Cell(None, "empty"), *imgs], "caption")
    with Image.open(tmp_path / "g.png") as im:
        w, h = im.size
        assert im.format == "PNG"
    cols = min(cells, grids.COLUMNS)
    # cells are about as tall as wide (text above each), so h / w tracks rows / cols
    assert 0.5 * rows / cols < h / w < 2.5 * rows / cols
