"""The ``neuroadda-rt`` command line.

Each subcommand lives in its own module under :mod:`neuroadda_rt._cli` and provides
``register(subparsers)`` (adds its parser and sets ``func``). The errors of :data:`REPORTED_ERRORS`
(typed :class:`~neuroadda_rt.errors.NeuroaddaError`, file-system errors, bad values, truncated
files, corrupt models) print one line on stderr and exit with status 2, so that stdout keeps only
the command's output (valid JSON with ``--json``); ``--debug`` shows the traceback instead. Any
other exception is a bug and keeps its traceback.
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


#: The exceptions ``main`` reports as one line on stderr with exit status 2 (an explicit list, no bare
#: ``except Exception``: anything else is a bug and keeps its traceback). Why each is here:
REPORTED_ERRORS: tuple[type[BaseException], ...] = (
    NeuroaddaError,  # every error raised on purpose (typed input, format, integrity, backend errors)
    OSError,  # file system: FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError
    #           (``select --out`` pointing at a file), FileExistsError (``zoo build`` onto a file), disk full
    ValueError,  # bad values from NumPy, h5py, tifffile, ... (also zarr's decode errors of some versions)
    TypeError,  # bad argument types reaching a library
    EOFError,  # a truncated or 0-byte file (pickle, cache entry, .npy)
    RuntimeError,  # zarr / numcodecs decode failures, torch; includes RecursionError (a deeply nested JSON)
    RecursionError,
    AttributeError,  # a reader handed an object it does not know, e.g. an .npz archive given as a volume
)
#: Names of onnxruntime's own exception classes (not subclasses of RuntimeError), reported like the above:
#: an invalid or truncated .onnx file (InvalidProtobuf) and other model load or run failures.
ONNXRUNTIME_ERRORS = ("InvalidProtobuf", "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError",
                      "RuntimeException", "InvalidGraph", "NotImplemented", "ModelLoaded", "EPFail")


def _reported_errors() -> tuple[type[BaseException], ...]:
    """:data:`REPORTED_ERRORS` plus onnxruntime's exception classes when onnxruntime is loaded (an
    onnxruntime error can only come from a loaded onnxruntime, so the CLI never imports it itself)."""
    ort = sys.modules.get("onnxruntime.capi.onnxruntime_pybind11_state")
    extra = tuple(c for c in (getattr(ort, n, None) for n in ONNXRUNTIME_ERRORS)
                  if isinstance(c, type) and issubclass(c, BaseException)) if ort is not None else ()
    return REPORTED_ERRORS + extra


def _one_line(exc: BaseException) -> str:
    """The error as one line: its message (its type for errors that are not ours or an OSError /
    ValueError / TypeError, whose messages may not say what failed), newlines folded."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (NeuroaddaError, OSError, ValueError, TypeError)):
        msg = f"{type(exc).__name__}: {msg}"
    return msg


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
        # a usage error, like argparse's own: the usage, then one error line
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: expected a COMMAND (try `{parser.prog} demo`, or --help for the list)",
              file=sys.stderr)
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"neuroadda-rt {args.command}: interrupted", file=sys.stderr)
        return 130
    except _reported_errors() as exc:  # evaluated when an exception arrives: onnxruntime's if loaded
        if args.debug:
            raise
        print(f"neuroadda-rt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
