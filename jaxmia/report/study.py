"""What the studies (``jaxmia clone``, ``defend``, ``blackbox``) share: tables, plots, done cells.

A study runs a grid of cells, each leaving one JSON row; a rerun reads the finished rows
(``finished_row``) and runs the rest. The rows become a Markdown table (``markdown``), a CSV
(``csv_text``) and figures drawn with matplotlib's object API (``figure``, ``save_png``): no
pyplot, so library code never sets the global backend nor needs a display.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxmia import files

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def finished_row(path: Path) -> dict[str, Any] | None:
    """The row a finished cell wrote to ``path``, or None if the cell is still to run."""
    if not path.exists():
        return None
    return json.loads(path.read_text())


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal; None as an empty cell."""
    return "" if v is None else f"{100 * v:.1f}"


def markdown(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of ``head`` and the (already formatted) ``rows``."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def csv_text(
    head: Sequence[str], rows: Iterable[Sequence[Any]], *, lineterminator: str = "\r\n"
) -> str:
    """A CSV of ``head`` and ``rows`` (None as an empty field)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator=lineterminator)
    w.writerow(head)
    w.writerows(rows)
    return out.getvalue()


def figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float],
    layout: str | None = None,
    **subplots: Any,
) -> tuple[Figure, Any]:
    """A figure and its axes, as ``pyplot.subplots`` makes them but without pyplot's state.

    Args:
      subplots: passed to ``Figure.subplots`` (``sharex``, ``sharey``, ``squeeze``).

    Returns:
      The figure and its axes (one ``Axes``, or an array of them as ``squeeze`` leaves it).
    """
    from matplotlib.figure import Figure  # slow to import: only the studies' plots need it

    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_png(fig: Figure, path: Path, *, dpi: int = 110) -> None:
    """Writes ``fig`` to ``path`` as a PNG, atomically."""
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
