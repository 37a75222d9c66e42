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
    if args.json:
        print_json({"report": str(path)})
    else:
        print(f"report: {path}")
    return 0
