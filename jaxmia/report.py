"""Pictures and the HTML report of an evaluation.

Pictures: per identity a grid of its clones beside a real face and the seed, the best clone by R_E
framed; the CMC curves of every identity in one plot (as the paper's Fig. 11); a histogram of R_E
scores of clones against seeds. The report is one self-contained HTML file (PNGs embedded as
base64) whose table is built from the same summary dict that is written to ``evaluation.json``.

Uses matplotlib's object API (``Figure``, no pyplot), so it works without a display and does not
touch the global backend.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from jaxmia import files
from jaxmia.evaluation import Evaluation, Inversions, identity_row

MAX_GRID_CLONES = 100  # the paper's clones per identity; more make the cells too small to see
GRID_COLUMNS = 10
BEST_COLOUR = "#d62728"
REAL_COLOUR = "#2ca02c"


def _save(fig: Figure, path: Path) -> None:
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def _short(score: float) -> str:
    """A score in a few characters that still tells 3e-04 from 2e-07."""
    return f"{score:.2f}" if score >= 0.01 or score == 0 else f"{score:.0e}"


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.clip(np.nan_to_num(np.asarray(image, np.float32)), 0, 1)  # [h, w, c]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def shown_clones(n: int, best: int | None) -> list[int]:
    """The clones a grid shows: the first MAX_GRID_CLONES, the best always among them."""
    shown = list(range(min(n, MAX_GRID_CLONES)))
    if best is not None and best not in shown:
        shown[-1] = best
    return shown


def clone_grid(
    path: str | Path,
    name: str,
    clones: np.ndarray,
    scores: np.ndarray,
    ranks: np.ndarray,
    seed: np.ndarray,
    real: np.ndarray | None,
    best: int | None,
    seed_label: str = "seed",
) -> None:
    """One identity's clones, each titled with its R_E score and rank, after a real face and the
    seed; the best clone framed red. At most MAX_GRID_CLONES clones (the best among them).

    The cells are one mosaic image drawn once: a hundred matplotlib axes per identity took
    seconds each.

    Args:
      path: the PNG to write.
      name: the identity.
      clones: # [n, h, w, c]
      scores: R_E's score of the target per clone. # [n]
      ranks: R_E's rank of the target per clone; rank-1 clones get green titles. # [n] int
      seed: the (first) seed image. # [h, w, c]
      real: a real face of the identity, or None. # [h, w, c]
      best: index of the best clone, or None.
      seed_label: the seed's title.
    """
    shown = shown_clones(len(clones), best)
    # (image or None, title, title colour, frame colour or None) per cell
    cells = [
        (real, "real" if real is not None else "no real face", REAL_COLOUR, REAL_COLOUR),
        (seed, seed_label, "black", None),
    ]
    for j in shown:
        label = f"#{j} {_short(scores[j])} r{ranks[j]}"
        if j == best:
            cells.append((clones[j], f"best {label}", BEST_COLOUR, BEST_COLOUR))
        else:
            cells.append((clones[j], label, "#2ca02c" if ranks[j] == 1 else "#555555", None))
    h, w = clones.shape[1:3]
    cols = min(GRID_COLUMNS, len(cells))
    rows = math.ceil(len(cells) / cols)
    gap, top = max(2, w // 10), max(4, int(0.3 * h))  # pixels between cells, above each for text
    cell_h, cell_w = top + h + gap, w + gap
    canvas = np.ones((rows * cell_h, cols * cell_w, 3), np.float32)  # white
    fig = Figure(figsize=(1.3 * cols, 1.3 * rows * cell_h / cell_w))  # the mosaic's aspect
    ax = fig.add_axes((0, 0, 1, 1))
    for i, (image, title, colour, frame) in enumerate(cells):
        y, x = (i // cols) * cell_h + top, (i % cols) * cell_w + gap // 2
        if image is not None:
            canvas[y : y + h, x : x + w] = _rgb(image)
        ax.text(x + w / 2, y - 1, title, ha="center", va="bottom", fontsize=7, color=colour)
        if frame is not None and image is not None:
            ax.add_patch(Rectangle((x - 1, y - 1), w + 1, h + 1, fill=False, ec=frame, lw=2.5))
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    top1 = int(np.sum(np.asarray(ranks) == 1))
    more = f" ({len(shown)} of {len(clones)} shown)" if len(shown) < len(clones) else ""
    fig.suptitle(
        f"{name}: {top1}/{len(clones)} clones recognized top-1 by R_E{more}\n"
        "titles: clone #, R_E score of the target, its rank r by R_E",
        fontsize=9,
        y=1.0,
        va="bottom",
    )
    _save(fig, Path(path))


def cmc_plot(
    path: str | Path,
    curves: dict[str, list[float]],
    overall: list[float],
    seed: list[float],
) -> None:
    """CMC curves of every identity, the pooled clones, the pooled seeds and chance.

    Args:
      path: the PNG to write.
      curves: identity name -> rank-k identification rate, k = 1..K.
      overall: the same pooled over all clones.
      seed: the same pooled over all seeds (the baseline).
    """
    k = len(overall)
    ks = np.arange(1, k + 1)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    markers = "osD^vP*Xh<>p"  # identities with equal curves stay distinguishable
    for i, (name, curve) in enumerate(curves.items()):
        # the curve is only defined at integer ranks: mark them where they can be told apart
        marker = markers[i % len(markers)] if k <= 30 else None
        ax.plot(ks, curve, lw=1.2, alpha=0.8, marker=marker, ms=7 - 4 * i / max(len(curves), 1),
                mfc="none", label=name)  # fmt: skip
    ax.plot(ks, overall, color="black", lw=2.4, label="all clones")
    ax.plot(ks, seed, color="grey", lw=1.8, ls="--", label="seed (baseline)")
    ax.plot(ks, ks / k, color="grey", lw=1.0, ls=":", label="chance")
    if k > 20:
        ax.set_xscale("log")
    else:
        ax.set_xticks(ks)
    ax.set_xlim(1, k)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank k (R_E)")
    ax.set_ylabel("identification rate (rank <= k)")
    ax.set_title("CMC of the clones by the evaluation recognizer R_E")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1, loc="lower right")
    _save(fig, Path(path))


def score_histogram(
    path: str | Path,
    clone_scores: np.ndarray,
    seed_scores: np.ndarray,
    clone_scores_t: np.ndarray | None = None,
) -> None:
    """Histograms of R_E's score of the target identity, clones beside their seeds.

    Left on a linear axis (how many clones R_E believes); right on a log axis, where scores far
    below 0.5 still show whether the clones moved R_E towards the target at all. R_T's scores of
    the clones, where known, are outlined for contrast: what fools R_T need not fool R_E.
    """

    def finite(a):
        a = np.asarray(a, np.float64).ravel()
        return a[np.isfinite(a)]

    series = [
        (finite(seed_scores), "seeds by R_E", "grey"),
        (finite(clone_scores), "clones by R_E", "C0"),
    ]
    t = None if clone_scores_t is None else finite(clone_scores_t)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    for ax, log in zip(fig.subplots(1, 2), (False, True), strict=True):
        floor = 1e-8
        bins = np.logspace(-8, 0, 33) if log else np.linspace(0, 1, 21)
        data = [np.maximum(s, floor) if log else s for s, _, _ in series]
        ax.hist(data, bins=bins, color=[c for *_, c in series],
                label=[f"{lab} (n={s.size})" for s, lab, _ in series])  # fmt: skip
        if t is not None and t.size:
            ax.hist(np.maximum(t, floor) if log else t, bins=bins, histtype="step", color="C3",
                    lw=1.5, label=f"clones by R_T (n={t.size})")  # fmt: skip
        if log:
            ax.set_xscale("log")
            ax.set_title("log scale (scores below 1e-8 in the first bin)", fontsize=9)
        else:
            ax.set_title("linear scale", fontsize=9)
        ax.set_xlabel("softmax score of the target identity")
        ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.suptitle("Softmax score of the target identity: clones vs seeds", fontsize=11)
    _save(fig, Path(path))


def grid_filename(name: str, taken: set[str]) -> str:
    """``grid_<name>.png`` with the name made safe for any file system, unique within taken."""
    base = f"grid_{re.sub(r'[^A-Za-z0-9._-]+', '_', name) or 'identity'}"
    out, i = f"{base}.png", 1
    while out in taken:
        out, i = f"{base}_{i}.png", i + 1
    taken.add(out)
    return out


def write_pictures(out_dir: str | Path, ev: Evaluation, inv: Inversions) -> dict[str, Any]:
    """Writes every picture of an evaluation; returns their file names relative to out_dir."""
    out = Path(out_dir)
    s, c = ev.summary, ev.clones
    grids, taken = {}, set()
    for i, ident in enumerate(s["identities"]):
        name = ident["name"]
        grids[name] = grid_filename(name, taken)
        shared = bool(np.all(inv.seeds[i] == inv.seeds[i, :1]))
        clone_grid(
            out / grids[name], name, inv.clones[i], c["score_E"][i], c["rank_E"][i],
            inv.seeds[i, 0], ev.real_face.get(name), ident["best_clone"],
            "seed" if shared else "seed of #0",
        )  # fmt: skip
    cmc_plot(
        out / "cmc.png",
        {ident["name"]: ident["cmc"] for ident in s["identities"]},
        s["overall"]["cmc"],
        s["overall"]["seed"]["cmc"],
    )
    score_histogram(out / "scores_hist.png", c["score_E"], c["seed_score_E"], c["score_T"])
    return {"grids": grids, "cmc": "cmc.png", "scores_hist": "scores_hist.png"}


# ---------------------------------------------------------------------------------------------
# HTML.

# (key in identities.csv / the summary, header, format); "pct" cells show a fraction as percent.
TABLE_COLUMNS = (
    ("identity", "identity", "text"),
    ("count", "clones", "int"),
    ("top1", "top-1 by R_E", "pct"),
    ("top5", "top-5 by R_E", "pct"),
    ("seed_top1", "seed top-1", "pct"),
    ("seed_top5", "seed top-5", "pct"),
    ("mean_score_T", "mean R_T score", "num"),
    ("mean_score_E", "mean R_E score", "num"),
    ("seed_mean_score_E", "seed R_E score", "num"),
    ("mean_rank", "mean R_E rank", "num"),
    ("best_clone", "best clone", "int"),
    ("best_score_E", "best R_E score", "num"),
    ("best_score_T", "best R_T score", "num"),
    ("knn_mean", "KNN dist. mean", "num"),
    ("knn_min", "KNN dist. min", "num"),
    ("seed_knn_mean", "seed KNN dist.", "num"),
    ("diverged", "diverged", "int"),
)  # fmt: skip


def format_cell(value: Any, kind: str) -> str:
    """The text a table cell shows ("n/a" for a missing value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "num":
        return f"{value:.4g}"
    return str(value)


def _table_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [(s["name"], s) for s in summary["identities"]] + [("(overall)", summary["overall"])]
    return [(name, identity_row(name, s)) for name, s in groups]


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; } td:first-child { text-align: left; }
tr.overall td { font-weight: bold; background: #fafafa; }
img { max-width: 100%; } .note { color: #555; font-size: 13px; }
"""


def write_html(path: str | Path, summary: dict[str, Any]) -> None:
    """The self-contained report: headline, table, CMC plot, histogram and one grid per identity.

    The pictures named in ``summary["files"]`` are read from beside ``path`` and embedded.
    """
    path = Path(path)
    e = html.escape
    o, s = summary["overall"], summary["overall"]["seed"]
    head = "".join(f'<th data-key="{key}">{e(label)}</th>' for key, label, _ in TABLE_COLUMNS)
    body = []
    for name, row in _table_rows(summary):
        cls = ' class="overall"' if name == "(overall)" else ""
        cells = "".join(
            f'<td data-key="{key}"'
            + ("" if kind == "text" else f' title="{e(repr(row[key]))}"')
            + f">{e(format_cell(row[key], kind))}</td>"
            for key, _, kind in TABLE_COLUMNS
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    pics = summary.get("files", {})
    figures = []
    if pics:
        figures.append(f"<h2>CMC</h2>{_img(path.parent / pics['cmc'], 'CMC curves')}")
        figures.append(f"<h2>R_E scores</h2>{_img(path.parent / pics['scores_hist'], 'scores')}")
        figures.append("<h2>Clones per identity</h2>")
        figures.append(
            '<p class="note">First a real face of the identity (green frame, one of R_E\'s '
            "training images), then the seed, then the clones titled with R_E's score of the "
            "target; green titles are top-1 by R_E; the best clone is framed red.</p>"
        )
        for name, file in pics["grids"].items():
            figures.append(f"<h3>{e(name)}</h3>{_img(path.parent / file, name)}")
    ev = summary["evaluator"]
    notes = [
        f"Inversions: {e(str(summary['inversions']))}",
        f"Evaluation recognizer R_E: {e(ev['path'])} ({ev['num_classes']} identities, "
        f"{ev['image_size'][0]}x{ev['image_size'][1]}x{ev['channels']})",
        f"R_T scores: {e(str(summary.get('target_scores') or 'not available'))}",
        f"Real faces (KNN distance, grids): {e(str(summary.get('real_faces_note') or 'none'))}",
    ]
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>jaxmia evaluation</title>
<style>{_STYLE}</style></head><body>
<h1>Model inversion: clones judged by the evaluation recognizer</h1>
<p><b>Top-1 attack accuracy by R_E: {format_cell(o["top1"], "pct")}</b>
(top-5 {format_cell(o["top5"], "pct")}) over {o["count"]} clones of
{summary["num_identities"]} identities; the seed alone: {format_cell(s["top1"], "pct")}
(top-5 {format_cell(s["top5"], "pct")}); chance: {format_cell(summary["chance_top1"], "pct")}
(top-5 {format_cell(summary["chance_top5"], "pct")}).</p>
<p class="note">{"<br>".join(notes)}</p>
<p class="note">A clone counts as top-1 when R_E ranks its target identity first (ties count
against it); the KNN distance is the Euclidean distance in R_E's penultimate features to the
nearest real training image of the identity. Hover a cell for its exact value.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
{chr(10).join(figures)}
</body></html>
"""
    files.write_text(path, doc)
