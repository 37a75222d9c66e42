"""The QC report: a database written by :class:`~neuroadda_rt.qc.service.QCService` as one
self-contained HTML page (the package's page shell, :mod:`neuroadda_rt._html`)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np

from .. import _html
from ..errors import FormatError

__all__ = ["write_report"]

_esc = _html.escape


def write_report(db, out, *, max_gallery: int = 120, alpha: float | None = None) -> Path:
    """Render a QC database as one self-contained HTML page (written atomically).

    The page shows the drift statistic (MMD²) and its p-value per window over time, drift
    windows marked; the artefact counts per likely cause; a gallery of flagged tiles (the most
    extreme first); and the files that could not be read.

    Parameters
    ----------
    db : path-like
        Database written by :class:`QCService`.
    out : path-like
        HTML file to write.
    max_gallery : int
        Most flagged tiles shown.
    alpha : float, optional
        Drift level drawn on the p-value plot (default: the monitor's, from the database).

    Returns
    -------
    pathlib.Path
    """
    db, out = Path(db), Path(out)
    if not db.is_file():
        raise FileNotFoundError(f"QC database {db} does not exist")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        try:
            wins = con.execute("SELECT idx, mmd2, p_value, drift, rule, first_id, last_id, t_start, t_end, n_flagged, "
                               "threshold, novelty, novelty_threshold FROM windows ORDER BY idx").fetchall()
            examples = [r[0] for r in con.execute("SELECT thumb FROM examples ORDER BY idx")]
            overviews = con.execute("SELECT file, page, max_severity, png FROM overviews ORDER BY max_severity DESC "
                                    "LIMIT 24").fetchall()
            files = con.execute("SELECT status, COUNT(*), SUM(n_tiles), SUM(n_flagged) FROM files GROUP BY status"
                                ).fetchall()
            errors = con.execute("SELECT path, error, processed_at FROM files WHERE status = 'error' ORDER BY seq"
                                 ).fetchall()
            kinds = con.execute("SELECT kind, COUNT(*) FROM tiles WHERE flagged = 1 GROUP BY kind ORDER BY 2 DESC"
                                ).fetchall()
            gallery = con.execute("SELECT tile_id, kind, artefact_p, severity, thumb FROM tiles WHERE flagged = 1 "
                                  "AND thumb IS NOT NULL ORDER BY severity DESC LIMIT ?",
                                  (int(max_gallery),)).fetchall()
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise FormatError(f"{db}: not a QC database ({exc})") from exc
    finally:
        con.close()
    if alpha is None:
        alpha = float(meta.get("alpha", 0.01))
    parts = [f"<h1>neuroadda_rt acquisition QC</h1><p>Database <code>{_esc(str(db))}</code>, "
             f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>"]
    summary = {s: (c, t or 0, f or 0) for s, c, t, f in files}
    ok = summary.get("ok", (0, 0, 0))
    n_drift = sum(int(w[3]) for w in wins)
    parts.append(f"<p>{ok[0]} files, {ok[1]} tiles, {ok[2]} flagged tiles, {len(errors)} unreadable files; "
                 f"{len(wins)} windows tested, {n_drift} with drift.</p>")
    if meta:
        parts.append("<p>" + ", ".join(f"{_esc(k)}={_esc(v)}" for k, v in sorted(meta.items())) + "</p>")
    parts.append("<h2>Drift</h2>")
    if wins:
        if meta.get("drift_note"):
            parts.append(f"<p><b>Drift not tested:</b> {_esc(meta['drift_note'])}</p>")
        if meta.get("calibration_note"):
            parts.append(f"<p><b>Drift threshold calibrated on shorter runs:</b> "
                         f"{_esc(meta['calibration_note'])}</p>")
        parts.append(_html.figure_img(_drift_figure(wins, alpha), "drift over time"))
        drifted = [[w[0], f"{w[1]:.4g}", f"{w[2]:.3g}", w[4] or "", w[5], w[6], w[9]] for w in wins if w[3]]
        if drifted:
            parts.append("<h3>Drift windows</h3>" + _html.table(
                drifted, ["window", "MMD²", "p", "rule", "first tile", "last tile", "flagged"]))
    else:
        parts.append("<p>No complete window yet.</p>")
    parts.append("<h2>Artefacts by likely cause</h2>")
    if kinds:
        fig = _html.figure(figsize=(6, 0.4 + 0.35 * len(kinds)))
        ax = fig.subplots()
        ax.barh([k or "?" for k, _ in kinds][::-1], [c for _, c in kinds][::-1], color="C1")
        ax.set_xlabel("flagged tiles")
        fig.tight_layout()
        parts.append(_html.figure_img(fig, "artefact counts"))
        parts.append(_html.table([[k or "?", c] for k, c in kinds], ["likely cause", "tiles"]))
        if examples:
            parts.append("<h2>Reference examples (clean tiles the flags are calibrated on)</h2><div class='gallery'>")
            parts.extend(f"<figure>{_html.png_img(t, 'reference', cls=None)}<figcaption>reference</figcaption>"
                         f"</figure>" for t in examples)
            parts.append("</div>")
        if overviews:
            parts.append("<h2>Sections with flagged tiles (outlined in red; most severe first)</h2>"
                         "<div class='gallery'>")
            for f, page, sev, png in overviews:
                parts.append(f"<figure>{_html.png_img(png, f, cls=None)}<figcaption>{_esc(f)} page {page}<br>"
                             f"severity {sev:.2f}</figcaption></figure>")
            parts.append("</div>")
        parts.append(f"<h2>Flagged tiles ({len(gallery)} most severe first)</h2><div class='gallery'>")
        for tid, kind, _p, sev, thumb in gallery:
            parts.append(f"<figure>{_html.png_img(thumb, tid, cls=None)}<figcaption>{_esc(tid)}<br>"
                         f"{_esc(kind)}, severity {sev or 0:.2f}</figcaption></figure>")
        parts.append("</div>")
    else:
        parts.append("<p>No flagged tiles.</p>")
    if errors:
        parts.append("<h2>Unreadable files</h2>" + _html.table([[p, e or ""] for p, e, _ in errors],
                                                              ["file", "error"]))
    return _html.write_page(out, "neuroadda_rt QC", parts)


def _drift_figure(wins: list, alpha: float):
    """The window statistics over time (minutes when the timestamps are real), each with its
    calibrated alarm threshold when it is the one in use, drift windows marked."""
    idx = np.array([w[0] for w in wins])
    dr = np.array([bool(w[3]) for w in wins])
    t = np.array([w[8] for w in wins])
    use_time = len(t) > 1 and np.all(np.diff(t) >= 0) and t[-1] > t[0] and t[0] > 1e8
    x = (t - t[0]) / 60.0 if use_time else idx
    series = [("novelty (mean log distance to the k-th nearest reference tile)", 11, 12),
              ("MMD² (window vs reference)", 1, 10)]
    fig = _html.figure(figsize=(9, 5))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, (label, col, thr_col) in zip(axes, series):
        y = np.array([np.nan if w[col] is None else w[col] for w in wins], dtype=float)
        thr = np.array([np.nan if w[thr_col] is None else w[thr_col] for w in wins], dtype=float)
        ax.plot(x, y, "-o", ms=3, color="C0")
        ax.plot(x[dr], y[dr], "o", color="C3", label="drift")
        if np.isfinite(thr).any():
            ax.plot(x, thr, "--", color="C3", lw=1, label=f"calibrated threshold (alpha = {alpha:g})")
        else:
            ax.set_title("not the alarm statistic (shown for information)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
    axes[1].set_xlabel("minutes since first window" if use_time else "window")
    fig.tight_layout()
    return fig
