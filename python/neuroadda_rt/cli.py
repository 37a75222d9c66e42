"""The ``neuroadda-rt`` command line.

Each subcommand lives in its own module under :mod:`neuroadda_rt._cli` and provides
``register(subparsers)`` (adds its parser and sets ``func``). Errors raised on purpose
(:class:`~neuroadda_rt.errors.NeuroaddaError`, missing files) print one line and exit with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from . import __version__, _cli
from ._cli._common import print_json  # noqa: F401  (public: neuroadda_rt.cli.print_json)
from .errors import NeuroaddaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuroadda-rt",
        description="Choose a pretrained EM segmentation model, the tiles to annotate, and monitor acquisition "
                    "(NeuroADDA, arXiv 2503.06196).",
    )
    parser.add_argument("--version", action="version", version=f"neuroadda_rt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the tool decides (backends, caches)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_cli.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{_cli.__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="neuroadda-rt: %(message)s")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except (NeuroaddaError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError, TypeError) as exc:
        if args.debug:
            raise
        print(f"neuroadda-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neuroadda-rt {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
