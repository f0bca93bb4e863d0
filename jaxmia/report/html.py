"""What people read of an evaluation: pictures, CSV tables and the HTML report.

Pictures: per identity a grid of its clones beside a real face and the seed, the best clone by R_E
framed (``jaxmia.report.grids``); the CMC curves of every identity in one plot (as the paper's Fig.
11); a histogram of R_E scores of clones against seeds. The report is one self-contained HTML file
(PNGs embedded as base64) whose table is built from the same summary dict that is written to
``evaluation.json``. Everything here takes plain summaries and arrays (``jaxmia.stages.evaluate``
computes them), so this module depends on no other stage.

Uses matplotlib's object API (``Figure``, no pyplot), so it works without a display and does not
touch the global backend.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxmia import files
from jaxmia.report import grids


def _save(fig: Figure, path: Path) -> None:
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


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
    order: np.ndarray | None = None,
    order_label: str = "",
) -> None:
    """One identity's clones, each titled with its R_E score and rank, after a real face and the
    seed; the best clone framed red. At most ``grids.MAX_CLONES`` clones (the best among them).

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
      order: the clones' indices in the order to show them (default: clone order). # [n]
      order_label: what that order is, for the caption.
    """
    order = np.arange(len(clones)) if order is None else np.asarray(order)
    at_best = None if best is None else int(np.flatnonzero(order == best)[0])
    shown = [int(order[p]) for p in grids.shown_clones(len(clones), at_best)]
    cells = [
        grids.Cell(
            real,
            "real" if real is not None else "no real face",
            grids.REAL_COLOUR,
            grids.REAL_COLOUR,
        ),
        grids.Cell(seed, seed_label, "black"),
    ]
    for j in shown:
        label = f"#{j} {grids.short(scores[j])} r{ranks[j]}"
        if j == best:
            cells.append(
                grids.Cell(clones[j], f"best {label}", grids.FRAME_COLOUR, grids.FRAME_COLOUR)
            )
        else:
            colour = grids.REAL_COLOUR if ranks[j] == 1 else grids.TEXT_COLOUR
            cells.append(grids.Cell(clones[j], label, colour))
    top1 = int(np.sum(np.asarray(ranks) == 1))
    more = f" ({len(shown)} of {len(clones)} shown)" if len(shown) < len(clones) else ""
    ordered = f"; in order of {order_label}" if order_label else ""
    grids.draw(
        path,
        cells,
        f"{name}: {top1}/{len(clones)} clones recognized top-1 by R_E{more}\n"
        f"titles: clone #, R_E score of the target, its rank r by R_E{ordered}",
    )


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


def judges_plot(path: str | Path, judged: dict[str, Any]) -> None:
    """Top-1 of every judge on each group (clones, seeds, held-out real photos, PGD controls).

    Args:
      path: the PNG to write.
      judged: the evaluation summary's ``judges`` (``jaxmia.judges.panel.summarise``).
    """
    names = list(judged["judges"])
    groups = [g for g in judged["groups"] if judged["top"].get(g)]
    colours = {"clones": "#d62728", "seeds": "#7f7f7f", "real": "#2ca02c", "pgd": "#9467bd"}
    fig = Figure(figsize=(max(6.4, 1.1 * len(names)), 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(names))
    for k, g in enumerate(groups):
        top = [judged["top"][g].get(j, {}).get("top1") for j in names]
        ax.bar(x + (k - (len(groups) - 1) / 2) * width,
               [np.nan if v is None else 100 * v for v in top], width,
               color=colours.get(g), label=judged["groups"][g])  # fmt: skip
    ax.axhline(100 * judged["chance_top1"], color="black", lw=1, ls=":", label="chance")
    ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=30, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Who recognises what: every judge on clones and controls", fontsize=11)
    _save(fig, Path(path))


def write_pictures(
    out_dir: str | Path,
    summary: dict[str, Any],
    per_clone: dict[str, np.ndarray],
    clones: np.ndarray,
    seeds: np.ndarray,
    real_face: dict[str, np.ndarray],
    order_key: str | None = None,
) -> dict[str, Any]:
    """Writes every picture of an evaluation; returns their file names relative to out_dir.

    Args:
      out_dir: where they go.
      summary: the evaluation summary (its identities, CMC curves, best clones).
      per_clone: "score_E", "rank_E", "seed_score_E", "score_T" arrays. # each [ids, clones]
      clones: # [ids, clones, h, w, c]
      seeds: each clone's seed. # [ids, clones, h, w, c]
      real_face: identity name -> one real image of it. # [h, w, c]
      order_key: the per_clone ranks ("rank_E", "rank_pixel_nn", ...) to order each grid by,
        best first (ties by R_E's score); None: clone order.
    """
    out = Path(out_dir)
    c = per_clone
    names, taken = {}, set()
    label = "" if order_key is None else f"{summary.get('grid_order', order_key)}'s rank"
    for i, ident in enumerate(summary["identities"]):
        name = ident["name"]
        names[name] = grids.filename(name, taken)
        shared = bool(np.all(seeds[i] == seeds[i, :1]))
        order = None
        if order_key is not None:
            score = np.nan_to_num(np.asarray(c["score_E"][i], np.float64), nan=-np.inf)
            order = np.lexsort((-score, np.asarray(c[order_key][i])))
        clone_grid(
            out / names[name], name, clones[i], c["score_E"][i], c["rank_E"][i],
            seeds[i, 0], real_face.get(name), ident["best_clone"],
            "seed" if shared else "seed of #0", order, label,
        )  # fmt: skip
    cmc_plot(
        out / "cmc.png",
        {ident["name"]: ident["cmc"] for ident in summary["identities"]},
        summary["overall"]["cmc"],
        summary["overall"]["seed"]["cmc"],
    )
    score_histogram(out / "scores_hist.png", c["score_E"], c["seed_score_E"], c["score_T"])
    return {"grids": names, "cmc": "cmc.png", "scores_hist": "scores_hist.png"}


def write_all(
    out_dir: str | Path,
    summary: dict[str, Any],
    per_clone: dict[str, np.ndarray],
    clones: np.ndarray,
    seeds: np.ndarray,
    real_face: dict[str, np.ndarray],
    steps: np.ndarray | None = None,
    order_key: str | None = None,
    with_html: bool = True,
) -> dict[str, Any]:
    """Writes (atomically) ``evaluation.json``, ``clones.csv``, ``identities.csv``, the pictures
    and ``report.html`` into out_dir; returns the summary as written (with its ``files``).

    Args: as ``write_pictures``, and ``steps``, the inversion's steps per clone if recorded;
    ``with_html``: write ``report.html`` (False where the caller writes it with more in it).
    """
    out = Path(out_dir)
    pictures = write_pictures(out, summary, per_clone, clones, seeds, real_face, order_key)
    if "judges" in summary:
        judges_plot(out / "judges.png", summary["judges"])
        pictures["judges"] = "judges.png"
    summary = {**summary, "files": pictures}
    files.write_json(out / "evaluation.json", summary)
    files.write_text(out / "clones.csv", clones_csv(summary, per_clone, steps))
    files.write_text(out / "identities.csv", identities_csv(summary))
    if with_html:
        write_html(out / "report.html", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# CSV.

CLONE_COLUMNS = (
    "identity", "label_E", "clone", "score_T", "score_E", "rank_E", "top1", "top5",
    "knn_distance", "diverged", "steps",
    "seed_score_T", "seed_score_E", "seed_rank_E", "seed_knn_distance",
)  # fmt: skip

IDENTITY_COLUMNS = (
    "identity", "count", "top1", "top5", "seed_top1", "seed_top5", "mean_rank", "seed_mean_rank",
    "mean_score_T", "mean_score_E", "seed_mean_score_T", "seed_mean_score_E", "best_clone",
    "best_score_E", "best_score_T", "best_rank_E", "knn_mean", "knn_min", "seed_knn_mean",
    "diverged",
)  # fmt: skip


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float | np.floating):
        return "" if np.isnan(v) else repr(float(v))
    if isinstance(v, np.bool_ | bool):
        return int(v)
    return v.item() if isinstance(v, np.generic) else v


def _csv(header: tuple[str, ...], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_csv_cell(v) for v in row] for row in rows])
    return buf.getvalue()


def clones_csv(
    summary: dict[str, Any], per_clone: dict[str, np.ndarray], steps: np.ndarray | None
) -> str:
    """One row per clone: its scores and its seed's (empty cell = not available).

    Args:
      summary: the evaluation summary (identity names and R_E labels).
      per_clone: the evaluation's arrays (see CLONE_COLUMNS). # each [ids, clones]
      steps: the inversion's steps per clone, if recorded. # [ids, clones]
    """
    c = per_clone
    extra = judge_columns(c)
    rows = []
    for i, ident in enumerate(summary["identities"]):
        for j in range(c["rank_E"].shape[1]):
            rank = int(c["rank_E"][i, j])
            rows.append([
                ident["name"], ident["label_E"], j, c["score_T"][i, j], c["score_E"][i, j], rank,
                int(rank <= 1), int(rank <= 5), c["knn_distance"][i, j], c["diverged"][i, j],
                "" if steps is None else steps[i, j],
                c["seed_score_T"][i, j], c["seed_score_E"][i, j], c["seed_rank_E"][i, j],
                c["seed_knn_distance"][i, j], *(c[key][i, j] for key in extra),
            ])  # fmt: skip
    return _csv(CLONE_COLUMNS + extra, rows)


def judge_columns(per_clone: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The per-clone columns the judges beside R_E add (``jaxmia.judges.panel``), if they ran: their
    ranks (the face judges' first), then the face judges' measures, then the eigenface ones."""
    ranks = tuple(k for k in per_clone if k.startswith("rank_") and k != "rank_E")
    face = tuple(k for k in per_clone if k.startswith("face_"))
    return ranks + face + tuple(k for k in ("knn_ratio", "residual_energy") if k in per_clone)


def identity_row(name: str, s: dict[str, Any]) -> dict[str, Any]:
    """A row of identities.csv (and of the report's table), keyed by IDENTITY_COLUMNS."""
    row = {"identity": name}
    for key in IDENTITY_COLUMNS[1:]:
        if key.startswith("seed_"):
            row[key] = s["seed"][key.removeprefix("seed_")]
        else:
            row[key] = s.get(key)  # the overall group has no best clone
    return row


def identities_csv(summary: dict[str, Any]) -> str:
    """One row per identity, then an ``(overall)`` row pooling every clone."""
    rows = [list(identity_row(name, s).values()) for name, s in _groups(summary)]
    return _csv(IDENTITY_COLUMNS, rows)


def _groups(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s["name"], s) for s in summary["identities"]] + [("(overall)", summary["overall"])]


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
    return [(name, identity_row(name, s)) for name, s in _groups(summary)]


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


def judges_html(judged: dict[str, Any], folder: Path, pics: dict[str, Any]) -> str:
    """The report's section on the judges beside R_E: inflation, the table, realism, plot."""
    e = html.escape
    groups = [g for g in judged["groups"] if judged["top"].get(g)]
    head = "".join(f"<th>{e(judged['groups'][g])}</th>" for g in groups)
    rows = []
    for j, title in judged["judges"].items():
        cells = []
        for g in groups:
            cell = judged["top"][g].get(j)
            cells.append(
                "<td>n/a</td>" if cell is None or cell["top1"] is None else
                f"<td>{format_cell(cell['top1'], 'pct')} ({format_cell(cell['top5'], 'pct')})</td>"
            )  # fmt: skip
        mark = " *" if j in judged["robust"] else ""
        rows.append(f"<tr><td>{e(title)}{mark}</td>{''.join(cells)}</tr>")
    counts = "".join(f"<td>{next(iter(judged['top'][g].values()))['count']}</td>" for g in groups)
    rows.append(f"<tr><td>images</td>{counts}</tr>")
    real_head = "".join(f"<th>{e(judged['groups'][g])}</th>" for g in judged["realism"])
    distances = dict.fromkeys(
        k for r in judged["realism"].values() for k in r if k.startswith("face_knn_distance_")
    )
    face_rows = [
        (k, f"{k.removeprefix('face_knn_distance_')}: distance to the target's nearest photo, "
            "mean (the field's FaceNet distance)", "num")
        for k in distances
    ]  # fmt: skip
    if any("face_detection_rate" in r for r in judged["realism"].values()):
        face_rows.insert(0, ("face_detection_rate", "a face found by dlib's detector", "pct"))
    measures = (
        *face_rows,
        ("frechet_eigenface", "Fréchet distance to R_E's photos (eigenface space)", "num"),
        ("knn_ratio_median", "KNN ratio, median (target / anyone else)", "num"),
        ("knn_ratio_below_1", "closer to the target than to anyone else", "pct"),
        ("residual_energy_mean", "energy outside the eigenfaces' span", "pct"),
    )
    real_rows = "".join(
        f"<tr><td>{e(title)}</td>"
        + "".join(f"<td>{format_cell(r.get(key), kind)}</td>" for r in judged["realism"].values())
        + "</tr>"
        for key, title, kind in measures
    )
    inf = judged.get("inflation")
    lead = ""
    if inf:
        lead = (
            f"<p><b>Adversarial inflation: {100 * inf['adversarial_inflation']:.1f} points</b> "
            f"(R_E's top-1 on the clones minus that of the most generous robust judge, "
            f"{e(judged['judges'][inf['most_generous_robust_judge']])}).</p>"
        )
    plot = _img(folder / pics["judges"], "judges") if "judges" in pics else ""
    notes = "<br>".join(e(n) for n in judged.get("notes", []))
    face = ""
    if any(j.startswith("face_") for j in judged["judges"]):
        face = (
            "<p>The face judges, first, are pretrained face recognizers trained on millions of "
            "other people, judging dlib-aligned face chips of each image (a fixed box where "
            "dlib's detector finds no face): the standard a person, or the field, would apply.</p>"
        )
    return f"""<h2>Judges beside R_E</h2>
{lead}
{face}
<p class="note">Top-1 (top-5) of the target among R_E's {round(1 / judged["chance_top1"])}
identities (chance {format_cell(judged["chance_top1"], "pct")}). * robust judges: not fooled by
small gradient patterns. Held-out real photos were fitted on by no recognizer or judge (every
judge should score them high); the seeds should score near chance; the PGD controls are seeds
moved within an L-inf ball of {judged["pgd"]["epsilon"]:.4g} towards the target against R_T
({judged["pgd"]["steps"]} steps): R_T accepts them, a robust judge should not. Judges took
{judged["seconds"]:.1f} s.<br>{notes}</p>
<table><thead><tr><th>judge</th>{head}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
<h3>Realism and closeness</h3>
<table><thead><tr><th>measure</th>{real_head}</tr></thead><tbody>{real_rows}</tbody></table>
{plot}
"""


def comparison_html(comparison: dict[str, Any], folder: Path) -> str:
    """The prior's attack beside the pixel attack: every judge's top-1, the means, the picture."""
    e = html.escape
    judges = comparison["judges"]
    head = "".join(f"<th>{e(j)}</th>" for j in judges)
    rows = []
    for name, r in comparison["attacks"].items():
        cells = "".join(f"<td>{format_cell(r['top1'][j], 'pct')}</td>" for j in judges)
        frechet = "-" if r["frechet"] is None else f"{r['frechet']:.1f}"
        rows.append(
            f"<tr><td>{e(name)}</td>{cells}<td>{format_cell(r['robust_mean'], 'pct')}</td>"
            f"<td>{format_cell(r['mean_beside_R_E'], 'pct')}</td><td>{frechet}</td></tr>"
        )
    return (
        "<h2>The prior against the pixel attack</h2>"
        '<p class="note">The same identities, seeds and attack, the clones free pixels '
        "(baseline, its full report in pixels/report.html) or a prior's: top-1 of the clones, and "
        "of the seeds both attacks start from, by each judge; robust mean: "
        f"{e(', '.join(comparison['robust']))}; Fréchet: distance to "
        "R_E's real photos in eigenface space (lower: more like real faces).</p>"
        f"<table><thead><tr><th>attack</th>{head}<th>robust mean</th><th>mean beside R_E</th>"
        f"<th>Fréchet</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        + _img(folder / "prior_vs_pixels.png", "the prior's clones beside the pixel attack's")
    )


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
    if "comparison" in summary:
        figures.append(comparison_html(summary["comparison"], path.parent))
    if "judges" in summary:
        figures.append(judges_html(summary["judges"], path.parent, pics))
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


def comparison_grid(
    path: str | Path,
    names: list[str],
    real: list[np.ndarray | None],
    seeds: np.ndarray,
    sides: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    judges: int,
    per_side: int = 4,
    seed_note: str = "",
) -> None:
    """Two attacks' clones of the same identities side by side, one identity a row: a real face,
    the seed, then ``per_side`` clones of each attack (the same clone numbers: the same seeds).

    Args:
      path: the PNG to write.
      names: the identities shown.
      real: a real face of each, or None. # each [h, w, c]
      seeds: each identity's first seed. # [ids, h, w, c]
      sides: attack name -> (clones [ids, n, h, w, c], R_E's rank of the target [ids, n], how
        many of the ``judges`` beside R_E rank it first [ids, n]).
      judges: the number of judges beside R_E.
      per_side: clones of each attack per row.
      seed_note: where the attacks start from other seeds, which one the seed column shows.
    """
    cells = []
    for i, name in enumerate(names):
        cells.append(grids.Cell(real[i], f"{name} real" if real[i] is not None else "no real",
                                grids.REAL_COLOUR, grids.REAL_COLOUR))  # fmt: skip
        cells.append(grids.Cell(seeds[i], "seed", "black"))
        for side, (clones, ranks, votes) in sides.items():
            for j in range(min(per_side, clones.shape[1])):
                colour = grids.REAL_COLOUR if 2 * votes[i, j] > judges else grids.TEXT_COLOUR
                title = f"{side} #{j} r{ranks[i, j]} {votes[i, j]}/{judges}"
                cells.append(grids.Cell(clones[i, j], title, colour))
    order = " | ".join(sides)
    head = f"the same identities: {order}; {seed_note}" if seed_note else (
        f"the same identities and seeds: {order}"
    )  # fmt: skip
    grids.draw(
        path,
        cells,
        f"{head}\ntitles: attack, clone #, R_E's rank r of the target, how many of the {judges} "
        "judges beside R_E rank it first (green: most of them)",
    )
