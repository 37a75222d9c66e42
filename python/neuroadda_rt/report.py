"""One self-contained HTML report of a workflow run (plots embedded as base64 PNG).

:func:`write_report` reads what :func:`~neuroadda_rt.run_workflow` (or ``neuroadda-rt demo``)
wrote into a run directory -- ``run.json``, ``ranking.json``, ``selection.json``, ``gallery.npz`` --
and renders: the source ranking as a bar chart with p-values, the pool's uncertainty histogram with
the chosen tiles marked, a gallery of the chosen tiles and of the most uncertain tiles (mostly
artefacts), the training curves, VI of the fine-tuned model versus scratch (and the source as-is),
and every setting used. Missing parts (e.g. a run still awaiting labels) are stated, not failed on.
Needs matplotlib (the ``report`` extra); uses the Agg backend and never opens a window.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import _html
from ._device import cuda_available
from ._info import build_info
from . import __version__
from .errors import FormatError
from .ranking import ranking_warnings

__all__ = ["write_report", "headline_lines"]

_esc = _html.escape
_table = _html.table



def headline_lines(run: dict) -> list[str]:
    """The run's result in a few plain lines: fine-tuned, scratch and the source as-is, with both ratios.

    The source as-is (n = 0) is always shown beside the fine-tuned model: a headline of "x% versus scratch"
    alone hid runs where the untouched source scored better than the fine-tuned one.

    Parameters
    ----------
    run : dict
        A parsed ``run.json`` (its ``evaluation`` and ``settings``).

    Returns
    -------
    list of str
        Empty when the run has no evaluation.
    """
    ev = run.get("evaluation") or {}
    vi = {k: ((ev.get(k) or {}).get("overall") or {}).get("vi_total") for k in ("finetuned", "scratch", "source")}
    if vi["finetuned"] is None:
        return []
    n = (run.get("settings") or {}).get("n")
    at = f" (n = {n})" if n is not None else ""

    def change(ref, what):
        if not ref:
            return f"n/a vs {what}"
        r = 100 * (1 - vi["finetuned"] / ref)
        return f"{abs(r):.1f}% {'lower' if r >= 0 else 'higher'} than {what}"

    lines = [f"fine-tuned{at}: VI {vi['finetuned']:.3f}"
             + (f", {change(vi['scratch'], 'scratch')}" if vi["scratch"] is not None else "")
             + (f", {change(vi['source'], 'the source as-is')}" if vi["source"] is not None else "")]
    if vi["scratch"] is not None:
        lines.append(f"scratch{at}: VI {vi['scratch']:.3f}")
    if vi["source"] is not None:
        lines.append(f"source as-is (n = 0): VI {vi['source']:.3f}")
        if vi["source"] < vi["finetuned"]:
            lines.append("the source as-is scored better than the fine-tuned model: fine-tuning did not help here")
    return lines

def _load_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FormatError(f"{path}: unreadable JSON ({exc})") from exc


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def _ranking_figure(ranking: dict):
    rows = ranking["ranking"]
    names = [r["name"] for r in rows]
    vals = [r["mmd2"] for r in rows]
    ps = [r.get("p_value") for r in rows]
    fig = _html.figure(figsize=(7, 0.45 * len(rows) + 1.2))
    ax = fig.subplots()
    colors = ["#d95f02" if i == 0 else "#7570b3" for i in range(len(rows))]
    y = np.arange(len(rows))[::-1]
    ax.barh(y, vals, color=colors)
    ax.set_yticks(y, names)
    span = max(max(vals) - min(0.0, min(vals)), 1e-12)
    for yi, v, p in zip(y, vals, ps):
        label = "p = n/a" if p is None or not np.isfinite(p) else f"p = {p:.3g}"
        ax.text(max(v, 0) + 0.01 * span, yi, label, va="center", fontsize=8)
    ax.set_xlim(min(0.0, min(vals)), max(vals) + 0.25 * span)
    ax.set_xlabel("MMD² to the target (lower = more transferable)")
    ax.set_title("Source ranking")
    return fig


def _histogram_figure(selection: dict):
    pool = np.asarray(selection["pool_scores"], dtype=np.float64)
    chosen = np.asarray(selection["scores"], dtype=np.float64)
    fig = _html.figure(figsize=(7, 3.2))
    ax = fig.subplots()
    finite = pool[np.isfinite(pool)]
    ax.hist(finite, bins=min(60, max(10, len(finite) // 8)), color="#999999", label=f"pool ({len(finite)} tiles)")
    if len(finite):
        ax.axvline(float(np.median(finite)), color="black", ls="--", lw=1, label="pool median")
    for i, s in enumerate(chosen):
        if np.isfinite(s):
            ax.axvline(s, color="#d95f02", lw=1.5, label="chosen tiles" if i == 0 else None)
    ax.set_xlabel(f"tile uncertainty ({selection.get('measure', 'entropy')})")
    ax.set_ylabel("tiles")
    ax.set_title(f"Pool uncertainty under the source model, strategy '{selection.get('strategy')}'")
    ax.legend(fontsize=8)
    return fig


def _gallery_figure(tiles: np.ndarray, captions: list[str], title: str):
    n = max(1, len(tiles))
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig = _html.figure(figsize=(2.6 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, t, c in zip(axes.ravel(), tiles, captions):
        ax.imshow(t, cmap="gray", vmin=0, vmax=255)
        ax.set_title(c, fontsize=7)
    fig.suptitle(title)
    return fig


def _training_figure(training: dict):
    curves = {}
    for key, hist in (training or {}).items():
        loss = _loss_of(hist)
        if loss:
            curves[key] = np.asarray(loss, dtype=np.float64)
    if not curves:
        return None
    fig = _html.figure(figsize=(7, 3.2))
    ax = fig.subplots()
    colors = {"finetuned": "#d95f02", "scratch": "#1b9e77"}
    for key, loss in curves.items():
        w = max(1, len(loss) // 25)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(1, len(loss) + 1), loss, color=colors.get(key), alpha=0.25, lw=0.8)
        ax.plot(np.arange(w, len(loss) + 1), smooth, color=colors.get(key), lw=1.8, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (BCE)")
    ax.set_yscale("log")
    ax.set_title("Training curves (same tiles, same recipe)")
    ax.legend(fontsize=8)
    return fig


def _loss_of(hist) -> list | None:
    if isinstance(hist, dict):
        for k in ("loss", "losses", "history"):
            v = hist.get(k)
            if isinstance(v, list) and v and isinstance(v[0], (int, float)):
                return v
            if isinstance(v, dict):
                r = _loss_of(v)
                if r:
                    return r
    if isinstance(hist, list) and hist and isinstance(hist[0], (int, float)):
        return hist
    return None


def _overall(ev: dict) -> dict:
    return ev.get("overall", ev) if isinstance(ev, dict) else {}


def _vi_figure(evaluation: dict):
    keys = [k for k in ("source", "scratch", "finetuned") if k in evaluation]
    if not keys:
        return None
    split = [float(_overall(evaluation[k]).get("vi_split", np.nan)) for k in keys]
    merge = [float(_overall(evaluation[k]).get("vi_merge", np.nan)) for k in keys]
    are = [float(_overall(evaluation[k]).get("adapted_rand_error", np.nan)) for k in keys]
    labels = {"source": "source as-is", "scratch": "scratch", "finetuned": "fine-tuned"}
    fig = _html.figure(figsize=(8, 3.2))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    x = np.arange(len(keys))
    ax.bar(x, split, color="#7570b3", label="VI split")
    ax.bar(x, merge, bottom=split, color="#e7298a", label="VI merge")
    for xi, s, m in zip(x, split, merge):
        ax.text(xi, s + m, f"{s + m:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [labels[k] for k in keys])
    ax.set_ylabel("variation of information")
    ax.set_title("VI on held-out tiles (lower is better)")
    ax.legend(fontsize=8)
    ax2.bar(x, are, color="#66a61e")
    ax2.set_xticks(x, [labels[k] for k in keys], rotation=20)
    ax2.set_title("adapted Rand error")
    return fig


# --------------------------------------------------------------------------------------------
# html
# --------------------------------------------------------------------------------------------
def _flatten(d, prefix="") -> list[tuple[str, str]]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _flatten(v, f"{prefix}{k}." if not isinstance(v, dict) else f"{prefix}{k}.")
        return out
    if isinstance(d, list) and len(d) > 12:
        d = f"[{len(d)} items]"
    return [(prefix.rstrip("."), json.dumps(d) if not isinstance(d, str) else d)]


def _fmt_sigma(s) -> str:
    if s is None:
        return ""
    if isinstance(s, (list, tuple)):
        return ", ".join(f"{float(v):.3g}" for v in s)
    return f"{float(s):.3g}"


def write_report(run_dir, out: str | os.PathLike | None = None) -> Path:
    """Render a run directory as one self-contained HTML file.

    Parameters
    ----------
    run_dir : path
        A directory written by :func:`~neuroadda_rt.run_workflow` (needs ``ranking.json``).
    out : path, optional
        Output file (default ``run_dir/report.html``); written atomically.

    Returns
    -------
    Path
        The HTML file. It embeds every plot as a base64 PNG and needs no other file.

    Examples
    --------
    >>> from neuroadda_rt.report import write_report
    >>> write_report("demo_run")            # doctest: +SKIP
    PosixPath('demo_run/report.html')
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    ranking = _load_json(run_dir / "ranking.json")
    if ranking is None:
        raise FileNotFoundError(f"{run_dir / 'ranking.json'} not found: expected a run directory written by "
                                f"run_workflow or `neuroadda-rt demo`")
    run = _load_json(run_dir / "run.json") or {}
    selection = _load_json(run_dir / "selection.json")
    parts: list[str] = []
    status = run.get("status", "unknown")
    best = ranking["ranking"][0] if ranking.get("ranking") else {}
    parts.append("<h1>neuroadda_rt report</h1>")
    target = (run.get("settings") or {}).get("target") or ranking.get("settings", {}).get("target") or {}
    demo = (run.get("settings") or {}).get("demo") or {}
    label = (f"synthetic domain {demo['target_domain']} (held out of the zoo)" if demo.get("target_domain")
             else target.get("path") or target.get("name") or target.get("source", ""))
    summary = [f"Target: <b>{_esc(str(label))}</b> {_esc(str(target.get('shape', '')))}",
               f"Best source: <b>{_esc(str(best.get('name')))}</b> (MMD² {best.get('mmd2', float('nan')):.4g})",
               f"Status: <b>{_esc(status)}</b>"]
    lines = headline_lines(run)
    if lines:
        summary.append("VI on held-out tiles (lower is better):<br>" + "<br>".join(
            f"&nbsp;&nbsp;<b>{_esc(line)}</b>" if i == 0 else f"&nbsp;&nbsp;{_esc(line)}"
            for i, line in enumerate(lines)))
    if run.get("total_s") is not None:
        summary.append(f"Run time: {run['total_s']:.1f} s")
    parts.append('<p class="big">' + "<br>".join(summary) + "</p>")

    # ranking
    parts.append("<h2>1. Source ranking</h2>")
    parts.append(_html.figure_img(_ranking_figure(ranking), "source ranking bar chart", "fig-ranking"))
    parts.append(_table([[r.get("rank", i + 1), r["name"], f"{r['mmd2']:.5g}",
                          "n/a" if r.get("p_value") is None else f"{r['p_value']:.3g}",
                          "n/a" if r.get("null_mmd2_95") is None else f"{r['null_mmd2_95']:.3g}",
                          _fmt_sigma(r.get("sigma")), r.get("n_reference"),
                          r.get("n_target")] for i, r in enumerate(ranking["ranking"])],
                        ["rank", "source", "MMD²", "p-value", "noise 95%", "kernel σ", "n ref", "n target"]))
    parts.append('<p class="note">MMD² between each source\'s stored reference features and the target tiles '
                 "embedded by that source's encoder; p-values from a permutation test (small: the target "
                 "differs from the source's training data). Noise 95%: the 95th percentile of the permutation null, "
                 "the MMD² two samples of one distribution reach 1 time in 20; sources whose MMD² differ by "
                 "less are not told apart.</p>")
    warns = ranking_warnings(ranking)
    if warns:  # synthetic sources, other modality or pixel size, every p-value at the permutation floor
        parts.append('<div class="warnings"><b>Read the ranking with these in mind:</b><ul>'
                     + "".join(f"<li>{_esc(w)}</li>" for w in warns) + "</ul></div>")

    # selection
    parts.append("<h2>2. Tiles to annotate</h2>")
    if selection is not None:
        parts.append(_html.figure_img(_histogram_figure(selection), "uncertainty histogram of the pool",
                                      "fig-uncertainty"))
        coords = selection.get("coords", [])
        parts.append(_table([[i, tuple(c), f"{s:.4g}"] for i, (c, s) in enumerate(zip(coords, selection["scores"]))],
                            ["tile", "corner (z, y, x)", "uncertainty"]))
    gallery = run_dir / "gallery.npz"
    if gallery.exists():
        with np.load(gallery, allow_pickle=False) as g:
            chosen, unc = g["chosen"], g["uncertain"]
            unc_scores = g["uncertain_scores"]
            unc_coords = g["uncertain_coords"]
        if selection is not None and len(chosen):
            caps = [f"{tuple(int(v) for v in c)}  u={s:.3f}" for c, s in zip(selection["coords"], selection["scores"])]
            parts.append(_html.figure_img(_gallery_figure(chosen, caps, "Chosen tiles (median uncertainty)"),
                              "gallery of chosen tiles", "fig-chosen"))
        if len(unc):
            caps = [f"{tuple(int(v) for v in c)}  u={s:.3f}" for c, s in zip(unc_coords, unc_scores)]
            parts.append(_html.figure_img(_gallery_figure(unc, caps, "Most uncertain pool tiles (often artefacts)"),
                              "gallery of the most uncertain tiles", "fig-uncertain"))
    ann = run.get("annotation_dir")
    if ann:
        parts.append(f'<p class="note">Annotation hand-off: <code>{_esc(str(run_dir / ann))}</code> '
                     "(open in Fiji or napari, paint labels into <code>labels/</code>).</p>")

    # training + evaluation
    parts.append("<h2>3. Fine-tuning versus training from scratch</h2>")
    fig = _training_figure(run.get("training") or {})
    if fig:
        parts.append(_html.figure_img(fig, "training curves", "fig-training"))
    elif status != "complete":
        parts.append('<p class="note">Not trained yet: the run is waiting for labels of the chosen tiles.</p>')
    else:
        parts.append('<p class="note">No training history was recorded.</p>')
    evaluation = run.get("evaluation") or {}
    fig = _vi_figure(evaluation)
    if fig:
        parts.append(_html.figure_img(fig, "VI fine-tuned versus scratch", "fig-vi"))
        rows = []
        for k in ("source", "scratch", "finetuned"):
            if k in evaluation:
                o = _overall(evaluation[k])
                rows.append([k, *(f"{float(o.get(m, np.nan)):.4f}" for m in
                                  ("vi_split", "vi_merge", "vi_total", "adapted_rand_error")),
                             evaluation[k].get("threshold", "")])
        parts.append(_table(rows, ["model", "VI split", "VI merge", "VI total", "adapted Rand error", "threshold"]))
        test = run.get("test") or {}
        if demo.get("test_volume_seed") is not None:
            where = "tiles of a second, independent volume of the target domain"
        elif test.get("source") == "given":
            where = "held-out tiles given by the user"
        else:
            where = "target tiles that do not overlap the annotated ones"
        parts.append(f'<p class="note">Evaluation on {test.get("n", "?")} {where}; segmentation thresholds tuned '
                     "on each model's own training tiles, never on the evaluation tiles.</p>")
    elif status == "complete":
        parts.append('<p class="note">No held-out labels were given: no evaluation.</p>')

    # settings
    parts.append("<h2>4. Settings</h2>")
    settings_rows = []
    for title, d in (("run", run.get("settings")), ("ranking", ranking.get("settings")),
                     ("selection", (selection or {}).get("settings")), ("timings_s", run.get("timings_s"))):
        if d:
            settings_rows += [[title, k, v] for k, v in _flatten(d)]
    parts.append(_table(settings_rows, ["step", "setting", "value"]))
    info = build_info()
    # "cuda" in build_info is whether the kernels were compiled, not whether a GPU is usable: say both
    parts.append(f'<p class="note">neuroadda_rt {__version__}; simd={info.get("simd_active")}, '
                 f'cuda_compiled={bool(info.get("cuda"))}, cuda_available={cuda_available()}</p>')
    return _html.write_page(Path(out) if out is not None else run_dir / "report.html", "neuroadda_rt report", parts)
