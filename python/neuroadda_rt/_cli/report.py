"""``neuroadda-rt report``: render a run directory as one self-contained HTML file."""

from __future__ import annotations

from ._common import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="write the HTML report of a workflow run directory",
        description="Render RUN_DIR (written by run_workflow or `neuroadda-rt demo`) as one HTML file with embedded "
                    "plots: ranking, uncertainty histogram, tile galleries, training curves, VI, settings.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--out", default=None, help="HTML file (default RUN_DIR/report.html)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import write_report

    path = write_report(args.run_dir, args.out)
    ng = _neuroglancer(args.run_dir)
    if args.json:
        print_json({"report": str(path), "neuroglancer": ng})
    else:
        print(f"report: {path}")
        if ng is not None:
            print(ng["text"])
    return 0


def _neuroglancer(run_dir) -> dict | None:
    """The neuroglancer view of the run, served from RUN_DIR: its target (when it lies inside) and any
    probabilities / segmentation volumes written into it (``predict``/``segment`` outputs, ``*.zarr``)."""
    import json
    from pathlib import Path

    from ..neuroglancer import neuroglancer_link, neuroglancer_state, neuroglancer_url

    run_dir = Path(run_dir)
    raw = None
    try:
        target = (json.loads((run_dir / "run.json").read_text()).get("settings") or {}).get("target") or {}
        raw = target.get("path") if isinstance(target, dict) else None
    except (OSError, ValueError):
        pass
    if raw and not Path(str(raw).split(":")[0]).exists() and not Path(str(raw)).exists():
        raw = None
    vols = sorted(p for p in run_dir.glob("*.zarr") if p.is_dir())
    probs = next((p for p in vols if "prob" in p.name), None)
    seg = next((p for p in vols if "seg" in p.name), None)
    if raw is None and probs is None and seg is None:
        return None
    kw = dict(raw=raw, probabilities=probs, segmentation=seg, root=run_dir)
    state = neuroglancer_state(**kw)
    return {"state": {k: v for k, v in state.items() if not k.startswith("_")}, "url": neuroglancer_url(state),
            "notes": state["_notes"], "root": state["_root"], "text": neuroglancer_link(**kw)}
