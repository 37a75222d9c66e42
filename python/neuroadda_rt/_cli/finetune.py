"""``neuroadda-rt finetune``: fine-tune the source model on the annotated tiles (or train from scratch)."""

from __future__ import annotations

from pathlib import Path

from ._common import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a source model on painted labels of the selected tiles",
        description="Read the annotation folder written by `neuroadda-rt select` and the painted labels (checked "
                    "against the tiles' names, coordinates and shapes), fine-tune the source model (or train its "
                    "architecture from scratch with --scratch) and save the new model package.")
    p.add_argument("annotation", help="annotation folder written by `neuroadda-rt select`")
    p.add_argument("--labels", default=None, help="folder of painted label TIFFs (default ANNOTATION/labels)")
    p.add_argument("--model", default=None,
                   help="source model package (default: the model that selected the tiles, from tiles.json)")
    p.add_argument("--scratch", action="store_true", help="train from scratch instead (the baseline)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the training recipe's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="patches per step")
    p.add_argument("--no-augment", action="store_true", help="disable flips/rotations/jitter/elastic")
    p.add_argument("--mix", type=float, default=None,
                   help="weight of the fine-tuned network in the saved weights, the rest the source's (default "
                        "0.5, WiSE-FT; 1 = plain fine-tuning; ignored with --scratch)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="training device (default cpu, as the Python API: deterministic; auto picks CUDA when "
                        "PyTorch sees a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed (training is deterministic on the CPU)")
    p.add_argument("--checkpoint-dir", default=None, help="resumable checkpoint folder (default OUT.checkpoint)")
    p.add_argument("--organism", default=None, help="what the annotated tiles are (recorded in model.json; "
                                                     "default unknown, never the source's)")
    p.add_argument("--tissue", default=None, help="tissue of the annotated tiles (recorded in model.json)")
    p.add_argument("--modality", default=None, help="imaging modality of the annotated tiles, e.g. FIB-SEM")
    p.add_argument("--voxel-size", default=None, metavar="Z,Y,X",
                   help="voxel size of the annotated volume in nm (recorded in model.json)")
    p.add_argument("--out", required=True, help="folder of the new model package")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from .._sources import load_package
    from ..training import finetune, train_from_scratch
    from ..workflow import read_annotation

    images, labels, meta = read_annotation(args.annotation, args.labels)
    model_path = args.model or ((meta.get("selection") or {}).get("settings") or {}).get("model", {}).get("path")
    if not model_path:
        raise ValueError(f"{args.annotation}/tiles.json names no source model; pass --model PACKAGE")
    model = load_package(model_path)
    train = {"seed": args.seed}
    for key in ("steps", "lr", "batch_size"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    if args.no_augment:
        train["augment"] = False
    out = Path(args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".checkpoint")
    data = {k: getattr(args, k) for k in ("organism", "tissue", "modality") if getattr(args, k) is not None}
    if args.voxel_size is not None:
        try:
            data["voxel_size_nm"] = [float(v) for v in args.voxel_size.split(",")]
        except ValueError:
            raise ValueError(f"expected --voxel-size as comma-separated numbers in nm (e.g. 40,4,4), "
                             f"got {args.voxel_size!r}") from None
    if args.mix is not None and not args.scratch:
        train["mix"] = args.mix
    fn = train_from_scratch if args.scratch else finetune
    pkg = fn(model, images, labels, checkpoint_dir=ckpt, progress=not args.no_progress, out=out, overwrite=True,
             device=args.device, data=data, **train)
    path = str(pkg.path)
    result = {"model": path, "source": str(model_path), "mode": "scratch" if args.scratch else "finetune",
              "tiles": len(images), "train": train, "device": args.device}
    if args.json:
        print_json(result)
    else:
        print(f"{'trained from scratch' if args.scratch else 'fine-tuned'} on {len(images)} tiles: {path}")
    return 0
