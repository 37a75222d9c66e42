"""``neuroadda-rt qc``: watch an acquisition folder for drift and artefacts, and report.

``neuroadda-rt qc watch DIR --model M --reference REF [--db DB] [--once]`` processes every image
in DIR (and, unless ``--once``, every image written there later) with a
:class:`~neuroadda_rt.QCMonitor`, prints alerts and records everything in an SQLite database
that survives restarts. ``neuroadda-rt qc report --db DB --out report.html`` renders it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("qc", help="acquisition-time QC: watch a folder for drift and artefacts, report")
    sub = p.add_subparsers(dest="qc_command", metavar="QC_COMMAND")
    sub.required = True

    w = sub.add_parser("watch", help="watch a folder the microscope writes into")
    w.add_argument("folder", type=Path, help="folder to watch (not recursive)")
    w.add_argument("--model", required=True, help="model package directory or encoder ONNX file (int8 or fp32)")
    w.add_argument("--reference", required=True, type=Path,
                   help="reference tiles, the first sections of the acquisition in order: a folder of images "
                        "(one section per file), a multi-page TIFF (one section per page), an image, or a .npy of "
                        "tiles (N, H, W) or of encoder features (N, d)")
    w.add_argument("--db", type=Path, default=None,
                   help="SQLite database (default: <folder>.qc.sqlite beside the folder)")
    w.add_argument("--once", action="store_true", help="process the files present now, then exit")
    w.add_argument("--tile-size", type=int, default=None,
                   help="cut images into tiles of this size (default: a model package's reference tile size, "
                        "unless the reference is a .npy of tiles)")
    w.add_argument("--window", type=int, default=256, help="tiles per drift test (default 256)")
    w.add_argument("--alpha", type=float, default=0.01,
                   help="false-alarm rate per window the drift threshold is calibrated for (default 0.01)")
    w.add_argument("--statistic", default="novelty", choices=["novelty", "mmd2", "both"],
                   help="window statistic of the drift alarm (default novelty; see docs/method.md)")
    w.add_argument("--artefact-fpr", type=float, default=0.01, help="false-positive rate of artefact flags")
    w.add_argument("--no-artefact-net", action="store_true",
                   help="leave out the learned fold / stain detectors (intensity descriptors only)")
    w.add_argument("--uncertainty", action="store_true",
                   help="also flag tiles on the model's prediction uncertainty (runs the full network from a "
                        "model package: slower)")
    w.add_argument("--backend", default="auto", help="inference backend (auto, onnxruntime, tensorrt, torch)")
    w.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="encoder precision: int8 quantises the model's encoder on the reference tiles (static QDQ, "
                        "ONNX Runtime on CPU; features within a few per cent). Faster only where the CPU's int8 "
                        "convolutions are (VNNI): on an AVX2 CPU a package's small encoder ran slower in int8. "
                        "Default fp32")
    w.add_argument("--settle", type=float, default=1.0,
                   help="seconds a file must stay unchanged before it is read (default 1)")
    w.add_argument("--give-up", type=float, default=60.0,
                   help="seconds after which an undecodable file is recorded as an error (default 60)")
    w.add_argument("--timeout", type=float, default=None, help="stop watching after this many seconds")
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(func=run_watch)

    r = sub.add_parser("report", help="render a QC database as an HTML page")
    r.add_argument("--db", type=Path, required=True, help="database written by `qc watch`")
    r.add_argument("--out", type=Path, default=Path("qc_report.html"), help="HTML file (default qc_report.html)")
    r.add_argument("--max-gallery", type=int, default=120, help="most flagged tiles shown")
    r.set_defaults(func=run_report)


def run_watch(args) -> int:
    from ..qc import QCMonitor, QCService, split_tiles
    from ..qc.reading import read_sections
    from ..qc.reading import load_array
    from ..runtime import FeatureExtractor, Predictor

    if not args.folder.is_dir():
        raise FileNotFoundError(f"watched folder {args.folder} does not exist")
    from ..qc.monitor import _refuse_full_network

    _refuse_full_network(Path(args.model))  # before the runtime's less specific "no backend can run this model"
    if args.tile_size is None and Path(args.model).is_dir() and args.reference.suffix != ".npy":
        # like rank/select/evaluate: the tile the package's reference features were computed on, fitted to
        # sections smaller than it (a .npy reference holds tiles already cut, and keeps them as they are)
        from .._sources import fit_tile_size, reference_tile_size

        sections, _ = read_sections(args.reference)
        args.tile_size, note = fit_tile_size(sections, reference_tile_size(Path(args.model)))
        print(f"qc: tiles of {args.tile_size} px (the model's reference tile size; --tile-size to change)"
              + (f"; {note}" if note else ""), file=sys.stderr, flush=True)

    @functools.cache  # int8 calibrates on the reference and the monitor is built on it: read the files once
    def read_reference():
        ref_path = args.reference
        if ref_path.suffix == ".npy":
            reference = load_array(ref_path)
            if reference.ndim == 3 and args.tile_size:
                reference = split_tiles(reference, args.tile_size)
            return reference, None
        return read_sections(ref_path, tile_size=args.tile_size)

    if args.precision == "int8":
        # calibrated on the reference (the acquisition's own first sections), scaled to [0, 1] as the
        # monitor feeds every tile to the encoder
        from ..qc.descriptors import as_tiles

        model = FeatureExtractor(args.model, backend=args.backend, precision="int8",
                                 calibration_tiles=as_tiles(read_reference()[0], "reference"))
    else:
        model = FeatureExtractor(args.model, backend=args.backend)
    uncertainty = None
    if args.uncertainty:
        uncertainty = Predictor(args.model, backend=args.backend)

    def factory():
        reference, groups = read_reference()
        return QCMonitor(model, reference, window=args.window, alpha=args.alpha, uncertainty=uncertainty,
                         reference_groups=groups, artefact_fpr=args.artefact_fpr, seed=args.seed,
                         statistic=args.statistic, artefact_net=not args.no_artefact_net)

    svc = QCService(args.folder, factory, model, db=args.db, tile_size=args.tile_size, settle=args.settle,
                    give_up=args.give_up, uncertainty=uncertainty, echo=lambda s: print(s, flush=True))
    print(f"qc: watching {svc.folder} -> {svc.db_path} ({svc.monitor.n_tiles} tiles, "
          f"{svc.monitor.n_windows} windows so far)", flush=True)
    try:
        n = svc.run(once=args.once, timeout=args.timeout)
    finally:
        svc.close()
    print(f"qc: processed {n} files", flush=True)
    return 0


def run_report(args) -> int:
    from ..qc import write_report

    out = write_report(args.db, args.out, max_gallery=args.max_gallery)
    print(out)
    return 0
