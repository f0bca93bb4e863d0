"""The one picture of an identity's clones: a mosaic of titled cells, seed (and real face) first.

``jaxmia invert`` draws it with R_T's confidence in each clone, ``jaxmia evaluate`` with R_E's
score and rank, a real face of the identity and the best clone framed. The cells are one image
drawn once: a hundred matplotlib axes per identity took seconds each. matplotlib's object API
(``Figure``, no pyplot), so it needs no display and leaves the global backend alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from jaxmia import files

MAX_CLONES = 100  # the paper's clones per identity; more make the cells too small to see
COLUMNS = 10
FRAME_COLOUR = "#d62728"
REAL_COLOUR = "#2ca02c"
TEXT_COLOUR = "#555555"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell: an image (None: an empty cell with only its title), its title and colours."""

    image: np.ndarray | None  # [h, w, c] in [0, 1]
    title: str
    colour: str = TEXT_COLOUR
    frame: str | None = None  # colour of a frame around the image


def shown_clones(n: int, best: int | None = None) -> list[int]:
    """The clones a grid shows: the first MAX_CLONES, ``best`` always among them."""
    shown = list(range(min(n, MAX_CLONES)))
    if best is not None and best not in shown:
        shown[-1] = best
    return shown


def filename(name: str, taken: set[str]) -> str:
    """``grid_<name>.png`` with the name made safe for any file system, unique within taken."""
    base = f"grid_{re.sub(r'[^A-Za-z0-9._-]+', '_', name) or 'identity'}"
    out, i = f"{base}.png", 1
    while out in taken:
        out, i = f"{base}_{i}.png", i + 1
    taken.add(out)
    return out


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.clip(np.nan_to_num(np.asarray(image, np.float32)), 0, 1)  # [h, w, c]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def draw(path: str | Path, cells: list[Cell], caption: str) -> None:
    """Writes the mosaic of ``cells`` (row-major, COLUMNS wide) under ``caption`` as a PNG.

    Every cell's image has one shape. # each [h, w, c]
    """
    h, w = next(c.image for c in cells if c.image is not None).shape[:2]
    cols = min(COLUMNS, len(cells))
    rows = math.ceil(len(cells) / cols)
    gap, top = max(2, w // 10), max(4, int(0.3 * h))  # pixels between cells, above each for text
    cell_h, cell_w = top + h + gap, w + gap
    canvas = np.ones((rows * cell_h, cols * cell_w, 3), np.float32)  # white
    fig = Figure(figsize=(1.3 * cols, 1.3 * rows * cell_h / cell_w))  # the mosaic's aspect
    ax = fig.add_axes((0, 0, 1, 1))
    for i, cell in enumerate(cells):
        y, x = (i // cols) * cell_h + top, (i % cols) * cell_w + gap // 2
        if cell.image is not None:
            canvas[y : y + h, x : x + w] = _rgb(cell.image)
            if cell.frame is not None:
                ax.add_patch(
                    Rectangle((x - 1, y - 1), w + 1, h + 1, fill=False, ec=cell.frame, lw=2.5)
                )
        ax.text(
            x + w / 2, y - 1, cell.title, ha="center", va="bottom", fontsize=7, color=cell.colour
        )
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(caption, fontsize=9, y=1.0, va="bottom")
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def short(score: float) -> str:
    """A score in a few characters that still tells 3e-04 from 2e-07."""
    return f"{score:.2f}" if score >= 0.01 or score == 0 else f"{score:.0e}"
