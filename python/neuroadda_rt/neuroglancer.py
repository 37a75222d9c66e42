"""A neuroglancer view of a raw volume, its probabilities and its segmentation, for files served locally.

:func:`neuroglancer_state` builds the viewer state (JSON) and :func:`neuroglancer_url` the URL whose fragment
carries it; nothing is fetched and no network is needed to produce either. Neuroglancer reads zarr (v2 and v3,
OME-Zarr multiscales included), N5 and precomputed volumes over HTTP; HDF5, TIFF, ``.npy`` and slice folders it
cannot read, so they are listed in the state's notes with the conversion that makes them viewable
(:func:`neuroadda_rt.io.write_volume` to ``.zarr``).

Serving: neuroglancer, a web page, fetches the chunks from ``base_url``, which must send CORS headers.
``python -m neuroadda_rt.neuroglancer ROOT --port 8000`` (:func:`serve`) serves ``ROOT`` on 127.0.0.1 with
them (Python's own ``http.server`` does not send them).
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from .errors import FormatError, InputValueError
from .io.volumes import ome_multiscales

__all__ = ["neuroglancer_state", "neuroglancer_url", "neuroglancer_link", "serve", "DEFAULT_VIEWER",
           "DEFAULT_BASE_URL"]

#: The public neuroglancer client the URL opens (any neuroglancer build takes the same fragment).
DEFAULT_VIEWER = "https://neuroglancer-demo.appspot.com/"
#: Where :func:`serve` serves by default.
DEFAULT_BASE_URL = "http://127.0.0.1:8000"

_BOUNDARY_SHADER = """#uicontrol invlerp normalized(range=[0, 1])
#uicontrol vec3 color color(default="magenta")
void main() { float v = normalized(); emitRGBA(vec4(color * v, v)); }"""


def _split(path) -> tuple[Path, str | None]:
    s = str(path)
    if Path(s).exists() or ":" not in s:
        return Path(s), None
    base, _, key = s.rpartition(":")
    return Path(base), key or None


def _kind(path: Path) -> str | None:
    """The neuroglancer data-source scheme for a local volume, or None when neuroglancer cannot read it."""
    if path.is_dir():
        if (path / "info").is_file():
            return "precomputed"
        if path.suffix.lower() == ".n5" or (path / "attributes.json").is_file():
            return "n5"
        if (path / "zarr.json").is_file():
            return "zarr3"
        if path.suffix.lower() == ".zarr" or (path / ".zarray").is_file() or (path / ".zgroup").is_file():
            return "zarr"
    return None


def _ome_axes(path: Path, key: str | None) -> list[dict] | None:
    """The OME-NGFF axes of a zarr group (v2 ``.zattrs`` or v3 ``zarr.json`` attributes), if it is one."""
    ms = ome_multiscales(path) if key is None else None
    return ms[0].get("axes") if ms else None


def _layer(path, role: str, root: Path, base_url: str, voxel_size_nm) -> tuple[dict | None, str | None]:
    """A neuroglancer layer for one file (or None and why not)."""
    from .io import open_volume

    p, key = _split(path)
    kind = _kind(p)
    if kind is None:
        return None, (f"{role}: {path} is not a format neuroglancer reads (zarr, N5, precomputed); write it as zarr "
                      f"with neuroadda_rt.io.write_volume('{p.with_suffix('.zarr').name}', volume, voxel_size_nm=...)")
    try:
        rel = p.resolve().relative_to(root.resolve())
    except ValueError:
        return None, f"{role}: {p} is outside the served folder {root}"
    url = base_url.rstrip("/") + "/" + urllib.parse.quote(rel.as_posix()) + (f"/{key}" if key else "")
    source: Any = f"{kind}://{url}"
    axes = _ome_axes(p, key) if kind in ("zarr", "zarr3") else None
    if axes is None and kind != "precomputed":
        # a plain array: neuroglancer would call its axes d0, d1, ... with unit scale; name them and give the voxel
        # size (z, y, x; a leading channel axis becomes a channel dimension)
        vol = open_volume(str(path))
        vs = voxel_size_nm or vol.voxel_size_nm
        spatial = ["z", "y", "x"][3 - min(vol.ndim, 3):] if vol.ndim <= 3 else ["c'", "z", "y", "x"]
        if vol.ndim > 4:
            return None, f"{role}: {path} has {vol.ndim} axes; expected 2 to 4"
        scales = list(vs)[-3:] if vs else [1.0] * 3
        out_dims = {}
        for i, name in enumerate(spatial):
            if name == "c'":
                out_dims[name] = [1, ""]
            else:
                out_dims[name] = [float(scales[-(len(spatial) - i)]) * 1e-9, "m"]
        source = {"url": source, "transform": {"outputDimensions": out_dims}}
        vol.close()
    layer: dict[str, Any] = {"type": "segmentation" if role == "segmentation" else "image", "source": source,
                             "name": role}
    if role == "probabilities":
        layer.update({"shader": _BOUNDARY_SHADER, "opacity": 0.6, "blend": "additive"})
    if role == "segmentation":
        layer.update({"selectedAlpha": 0.35, "notSelectedAlpha": 0.15})
    return layer, None


def neuroglancer_state(raw=None, probabilities=None, segmentation=None, *, root=None,
                       base_url: str = DEFAULT_BASE_URL, voxel_size_nm=None) -> dict[str, Any]:
    """The neuroglancer viewer state showing a raw volume, probabilities and a segmentation.

    Parameters
    ----------
    raw, probabilities, segmentation : path, optional
        Local volumes (``vol.zarr``, ``vol.zarr:key``, ``vol.n5:key``, a precomputed folder, an OME-Zarr
        group). At least one is needed. Formats neuroglancer cannot read are left out, with a note.
    root : path, optional
        The folder served at ``base_url`` (default: the deepest folder holding all given files).
    base_url : str
        Where ``root`` is served (default ``http://127.0.0.1:8000``, what :func:`serve` uses).
    voxel_size_nm : sequence of float, optional
        ``(z, y, x)`` nm for plain arrays that do not state it (OME-Zarr carries its own).

    Returns
    -------
    dict
        A neuroglancer state (``layers``, ``layout``, ``selectedLayer``) plus ``"_notes"`` (what was left
        out and why) and ``"_root"`` (the served folder); :func:`neuroglancer_url` drops the ``_`` keys.

    Examples
    --------
    >>> s = neuroglancer_state("run/probabilities.zarr", root="run")     # doctest: +SKIP
    >>> s["layers"][0]["source"]                                         # doctest: +SKIP
    'zarr://http://127.0.0.1:8000/probabilities.zarr'
    """
    given = {k: v for k, v in (("raw", raw), ("probabilities", probabilities), ("segmentation", segmentation))
             if v is not None}
    if not given:
        raise InputValueError("expected at least one of raw, probabilities, segmentation, got none")
    if not base_url.startswith(("http://", "https://")):
        raise InputValueError(f"expected an http(s) base_url, got {base_url!r}")
    files = {k: _split(v)[0] for k, v in given.items()}
    for k, p in files.items():
        if not p.exists():
            raise FormatError(f"{k}: {p}: no such file or folder")
    if root is None:
        root = Path(os.path.commonpath([str(p.resolve().parent) for p in files.values()]))
        if root.parent == root:  # no common folder but "/": never serve the whole file system
            root = next(iter(files.values())).resolve().parent
    root = Path(root)
    layers, notes = [], []
    for role, path in given.items():
        layer, note = _layer(path, role, root, base_url, voxel_size_nm)
        if layer is not None:
            layers.append(layer)
        if note:
            notes.append(note)
    state: dict[str, Any] = {"layers": layers, "layout": "4panel" if any(_is3d(v) for v in given.values()) else "xy"}
    if layers:
        state["selectedLayer"] = {"layer": layers[-1]["name"], "visible": True}
    state["_notes"] = notes
    state["_root"] = str(root)
    return state


def _is3d(path) -> bool:
    from .io import open_volume

    try:
        v = open_volume(str(path))
        nd = v.ndim
        v.close()
        return nd >= 3
    except Exception:  # noqa: BLE001 - only the layout depends on it
        return True


def neuroglancer_url(state: dict, *, viewer: str = DEFAULT_VIEWER) -> str:
    """``viewer#!{state}``: the URL that opens the state (the fragment never leaves the browser)."""
    clean = {k: v for k, v in state.items() if not k.startswith("_")}
    return viewer.rstrip("/") + "/#!" + urllib.parse.quote(json.dumps(clean, separators=(",", ":")), safe="")


def neuroglancer_link(raw=None, probabilities=None, segmentation=None, *, root=None,
                      base_url: str = DEFAULT_BASE_URL, viewer: str = DEFAULT_VIEWER) -> str:
    """Lines to print after a command that wrote volumes: how to serve them, the URL, and what was left out.

    The one function ``report`` and ``predict`` call.
    """
    state = neuroglancer_state(raw, probabilities, segmentation, root=root, base_url=base_url)
    if not state["layers"]:
        return "neuroglancer: nothing to show (" + "; ".join(state["_notes"]) + ")"
    port = urllib.parse.urlparse(base_url).port or 80
    lines = [f"neuroglancer: serve the files with  python -m neuroadda_rt.neuroglancer {state['_root']} --port {port}",
             f"  then open  {neuroglancer_url(state, viewer=viewer)}"]
    lines += [f"  (left out: {n})" for n in state["_notes"]]
    return "\n".join(lines)


def serve(root, *, port: int = 8000, host: str = "127.0.0.1"):
    """Serve ``root`` over HTTP with the CORS headers neuroglancer needs (a ``ThreadingHTTPServer``).

    Returns the server; call ``serve_forever()`` on it (``python -m neuroadda_rt.neuroglancer`` does), or
    ``shutdown()`` from another thread. Binds to 127.0.0.1 unless told otherwise.
    """
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = Path(root)
    if not root.is_dir():
        raise FormatError(f"{root}: expected a folder to serve")

    class _Handler(SimpleHTTPRequestHandler):
        def end_headers(self):
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", "Range")
            super().end_headers()

        def log_message(self, *args):  # quiet: a viewer fetches many chunks
            pass

    return ThreadingHTTPServer((host, int(port)), functools.partial(_Handler, directory=str(root)))


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m neuroadda_rt.neuroglancer",
                                 description="Serve a folder with CORS headers for neuroglancer (127.0.0.1 only).")
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    server = serve(args.root, port=args.port)
    print(f"serving {args.root} at http://127.0.0.1:{args.port} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
