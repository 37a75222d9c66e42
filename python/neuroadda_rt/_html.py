"""The one HTML page shell of the package's reports (the workflow report and the QC report).

Plain string templates (no template engine is a dependency): a self-contained page with one
style sheet, figures embedded as base64 PNG ``<img>`` elements, and escaped tables. Figures are
``matplotlib.figure.Figure`` objects made by :func:`figure` -- no pyplot, so no global figure
state, no GUI backend and nothing to close.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import _atomic
from .errors import require

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left}th{background:#f4f4f4}img.plot{max-width:100%;display:block;margin:.5em 0}
.note{color:#666;font-size:.9em}.big{font-size:1.15em}
.gallery{display:flex;flex-wrap:wrap}figure{margin:4px;font-size:75%;width:132px;word-break:break-all}
"""

escape = html.escape


def figure(**kwargs):
    """A new ``matplotlib.figure.Figure(**kwargs)`` (needs the ``report`` extra)."""
    require("matplotlib", "report")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def figure_png(fig, *, dpi: int = 110) -> bytes:
    """The figure rendered as PNG bytes (tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def png_img(png: bytes, alt: str = "", *, ident: str | None = None, cls: str | None = "plot") -> str:
    """An ``<img>`` element embedding ``png`` as a data URL."""
    attrs = "".join(f' {k}="{escape(v)}"' for k, v in (("id", ident), ("class", cls), ("alt", alt)) if v is not None)
    return f'<img{attrs} src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def figure_img(fig, alt: str, ident: str | None = None, *, dpi: int = 110) -> str:
    """:func:`png_img` of a rendered figure."""
    return png_img(figure_png(fig, dpi=dpi), alt, ident=ident)


def table(rows: Iterable[Sequence[Any]], header: Sequence[Any]) -> str:
    """An HTML table; every header and cell is converted with ``str`` and escaped."""
    th = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, parts: Iterable[str]) -> str:
    """A complete self-contained HTML document: the shared style sheet and ``parts`` as its body."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def write_page(path: str | os.PathLike, title: str, parts: Iterable[str]) -> Path:
    """Write :func:`page` to ``path`` atomically."""
    return _atomic.write_text(path, page(title, parts))
