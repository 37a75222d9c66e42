"""``neuroadda-rt export``: a model package's network as ONNX, static int8 ONNX, or a TensorRT engine."""

from __future__ import annotations

from pathlib import Path

from ._common import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a model package to ONNX, int8 ONNX (CPU) or a TensorRT engine (NVIDIA GPU)",
        description="Export the encoder or the full network of a model package. int8 is static QDQ quantisation "
                    "calibrated on tiles of a volume; TensorRT builds (and caches) an engine for an optimisation "
                    "profile of square tiles.")
    p.add_argument("model", help="model package folder")
    p.add_argument("--format", required=True, choices=["onnx", "int8", "tensorrt", "bioimageio"],
                   help="what to write; bioimageio: a bioimage.io model package (.zip, or a folder) of the full "
                        "network for deepImageJ/ilastik/napari/bioimageio.core (--part is not used)")
    p.add_argument("--sample", default=None,
                   help="bioimageio: volume whose central tile becomes the test input (default: a generated EM-like tile)")
    p.add_argument("--part", default=None, choices=["encoder", "full"],
                   help="required: 'encoder' (the feature encoder that rank, select and qc run) or 'full' (the "
                        "segmentation network that predict and evaluate run)")
    p.add_argument("--out", required=True, help="output file (.onnx, or .engine for TensorRT)")
    p.add_argument("--calibration", default=None, help="int8: volume whose random tiles calibrate activations")
    p.add_argument("--n-calibration", type=int, default=32, help="int8: calibration tiles (default 32)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="calibration tile / TensorRT profile edge (default: the model's reference tile size, 256 "
                        "when it records none)")
    p.add_argument("--max-batch", type=int, default=16, help="TensorRT: largest batch of the profile (default 16)")
    p.add_argument("--fp16", action="store_true", help="TensorRT: allow fp16 kernels")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration tiles")
    p.add_argument("--overwrite", action="store_true", help="bioimageio: replace an existing --out")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from .._sources import load_package

    if args.format == "bioimageio":
        return _run_bioimageio(args)
    if args.part is None:
        # No default: an unnamed part once wrote the full network to `encoder.int8.onnx`, which `qc watch` then
        # could not run, with an error that did not say why.
        raise ValueError("expected --part encoder (the feature encoder that rank, select and qc run) or --part full "
                         "(the segmentation network that predict and evaluate run), got no --part")
    pkg = load_package(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_path = Path(pkg.path) / ("encoder.onnx" if args.part == "encoder" else "model.onnx")
    if args.format == "onnx":
        from ..export import export_onnx

        export_onnx(pkg.unet(), out, part=args.part)
    elif args.format == "int8":
        if not args.calibration:
            raise ValueError("int8 export needs --calibration VOLUME (tiles to calibrate activation ranges)")
        from ..export import quantize_int8
        from ..tiles import sample_tiles
        from ._common import open_target, tile_size_for

        vol = open_target(args.calibration, None)
        tiles = sample_tiles(vol, args.n_calibration, tile_size_for(args.tile_size, pkg, vol), seed=args.seed).tiles
        # the full network's first conv stays fp32, as predict_volume quantises it (docs/method.md)
        quantize_int8(onnx_path, tiles, out, normalization=pkg.normalization or "dtype",
                      fp32_first_conv=args.part == "full")
    if args.format in ("onnx", "int8"):
        import json

        from ..export import set_onnx_metadata

        # the file alone then embeds tiles as the package does (qc watch --model FILE, FeatureExtractor(FILE))
        meta = {"neuroadda_rt.normalization": json.dumps(pkg.normalization or {"rule": "dtype"}, sort_keys=True)}
        if args.part == "encoder":
            meta["neuroadda_rt.pooling"] = pkg.pooling
        set_onnx_metadata(out, meta)
    else:
        from ..export import build_tensorrt_engine
        from ._common import tile_size_for

        s = tile_size_for(args.tile_size, pkg)
        engine = build_tensorrt_engine(onnx_path, min_shape=(1, 1, s, s), opt_shape=(max(1, args.max_batch // 2), 1, s, s),
                                       max_shape=(args.max_batch, 1, s, s), fp16=args.fp16)
        from .. import _atomic

        _atomic.write_bytes(out, engine)
    result = {"model": str(args.model), "format": args.format, "part": args.part, "out": str(out),
              "bytes": out.stat().st_size}
    if args.json:
        print_json(result)
    else:
        what = "feature encoder (for rank, select, qc)" if args.part == "encoder" else \
            "full segmentation network (for predict, evaluate)"
        print(f"wrote the {what} as {args.format} to {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def _run_bioimageio(args) -> int:
    from ..bioimageio import export_bioimageio

    # the edge of the test tile: --tile-size when given, else export_bioimageio's default (256 in 2-D, 64 in 3-D;
    # --tile-size's own default of 256 would make a 256**3 test tensor for a 3-D network)
    tile = args.tile_size if args.tile_size not in (None, 256) else None
    out = export_bioimageio(args.model, args.out, sample=args.sample, tile_size=tile, overwrite=args.overwrite)
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.iterdir())
    result = {"model": str(args.model), "format": "bioimageio", "part": "full", "out": str(out), "bytes": size}
    if args.json:
        print_json(result)
    else:
        print(f"wrote a bioimage.io model (rdf.yaml, ONNX + TorchScript + PyTorch weights, test tensors) to {out} "
              f"({size / 1e6:.2f} MB)")
    return 0
