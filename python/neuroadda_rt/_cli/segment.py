"""``neuroadda-rt segment``: blockwise instance segmentation of predicted probabilities, ids consistent across
blocks; optional blockwise scoring against ground truth."""

from __future__ import annotations

from ._common import print_json
from .predict import add_dask, block_arg


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="segment predicted probabilities block by block into a uint64 OME-Zarr label image",
        description="Watershed per block (with a little context), fragments stitched across block faces where "
                    "their seeds link (docs/method.md, Stitching blocks), uint64 ids consistent over the volume. "
                    "With --gt, scores the result block by block (VI, adapted Rand error; equal to a one-shot "
                    "computation bit for bit).")
    p.add_argument("probs", help="probabilities from `neuroadda-rt predict` (or a boundary map / affinities volume)")
    p.add_argument("--key", default=None, help="dataset inside a container")
    p.add_argument("--out", required=True, help="output .zarr folder")
    p.add_argument("--threshold", type=float, default=0.5, help="boundary / merge threshold (default 0.5)")
    p.add_argument("--block-shape", type=block_arg, default=None, help="block Z,Y,X (default 64,512,512)")
    p.add_argument("--per-slice", action="store_true", help="segment each z slice on its own")
    p.add_argument("--gt", default=None, help="ground-truth label volume to score the segmentation against")
    p.add_argument("--gt-key", default=None, help="dataset inside the ground-truth container")
    add_dask(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..deploy import evaluate_volume, segment_volume

    r = segment_volume(args.probs, args.out, key=args.key, threshold=args.threshold, block_shape=args.block_shape,
                       per_slice=args.per_slice, scheduler=args.scheduler, workers=args.workers,
                       overwrite=args.overwrite, progress=not args.no_progress)
    scores = None
    if args.gt:
        scores = evaluate_volume(r.out, args.gt, gt_key=args.gt_key, scheduler=args.scheduler or "synchronous",
                                 workers=args.workers, progress=not args.no_progress)
    if args.json:
        print_json({**r.to_dict(), **({"scores": scores} if scores else {})})
        return 0
    print(f"{r.out}: {r.segments} segments from {r.fragments} fragments of {r.n_blocks} blocks "
          f"({r.face_merges} face links) in {r.seconds:.1f} s")
    if scores:
        print(f"VI {scores['vi']:.4f} (split {scores['vi_split']:.4f}, merge {scores['vi_merge']:.4f}), "
              f"adapted Rand error {scores['adapted_rand_error']:.4f}")
    return 0
