"""``neuroadda-rt predict``: a model over a whole volume, block by block, into an OME-Zarr image."""

from __future__ import annotations

import argparse

from ..runtime import BACKENDS
from ._common import print_json


def block_arg(text: str) -> tuple[int, ...]:
    """``"8,1024,1024"`` or ``"256"`` -> a tuple of ints (argparse type)."""
    try:
        v = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X integers, got {text!r}") from exc
    if len(v) not in (1, 3) or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected one or three positive integers (Z,Y,X), got {text!r}")
    return v if len(v) == 3 else v * 3


def add_dask(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=None,
                   help="Dask scheduler: a local cluster by default, 'synchronous' or 'threads' in this process, or "
                        "an address tcp://HOST:PORT of a running cluster")
    p.add_argument("--workers", type=int, default=None, help="workers of the local cluster (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="replace an OUT that holds something else")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="predict a whole volume block by block into an OME-Zarr image",
        description="Run a model over a whole volume of any size, block by block with a halo and exact blending "
                    "(the output equals a one-shot sliding-window prediction), resumable per block, on a local "
                    "Dask cluster or an existing one. Output: OME-Zarr (OME-NGFF 0.4, axes czyx, voxel size).")
    p.add_argument("model", help="model package folder or full-model .onnx file")
    p.add_argument("volume", help="input volume: HDF5 (file.h5:dataset), zarr/N5/OME-Zarr, TIFF, folder of slices")
    p.add_argument("--key", default=None, help="dataset inside an HDF5/zarr/N5 container")
    p.add_argument("--out", required=True, help="output .zarr folder")
    p.add_argument("--block-shape", type=block_arg, default=None, help="block core Z,Y,X (default 8,1024,1024 "
                   "for a 2-D model, 64,384,384 for a 3-D one)")
    p.add_argument("--halo", type=block_arg, default=None,
                   help="sliding window Z,Y,X; blocks reach halo-1 voxels into their neighbours (default 256 in 2-D, "
                        "32,128,128 in 3-D)")
    p.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction (default 0.25)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto: ONNX Runtime")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--dtype", default="float16", choices=["float16", "uint8", "float32"], help="output dtype")
    add_dask(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..deploy import predict_volume

    r = predict_volume(args.model, args.volume, args.out, key=args.key, block_shape=args.block_shape, halo=args.halo,
                       overlap=args.overlap, backend=args.backend, device=args.device, precision=args.precision,
                       dtype=args.dtype, scheduler=args.scheduler, workers=args.workers, overwrite=args.overwrite,
                       progress=not args.no_progress)
    ng = _neuroglancer(args, r.out)
    if args.json:
        print_json(r.to_dict() | {"neuroglancer": ng})
        return 0
    print(f"{r.out}: {r.shape} {r.dtype} probabilities; {r.blocks_computed} of {r.n_blocks} blocks computed "
          f"({r.blocks_skipped} done before), {r.windows} windows in {r.seconds:.1f} s "
          f"({r.voxels_per_s / 1e6:.2f} Mvoxel/s, {r.backend} {r.precision} on {r.device})")
    if ng is not None:
        print(ng["text"])
    return 0


def _neuroglancer(args, out) -> dict | None:
    """The neuroglancer view of the input volume and the probabilities (issue 20), served from their common
    folder; an input neuroglancer cannot read (HDF5, TIFF) is named as left out. None if nothing is viewable."""
    from ..neuroglancer import neuroglancer_link, neuroglancer_state, neuroglancer_url

    raw = f"{args.volume}:{args.key}" if args.key else args.volume
    state = neuroglancer_state(raw, out)
    if not state["layers"]:
        return None
    return {"url": neuroglancer_url(state), "root": state["_root"], "notes": state["_notes"],
            "text": neuroglancer_link(raw, out)}
