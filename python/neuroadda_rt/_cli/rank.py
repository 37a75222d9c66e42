"""``neuroadda-rt rank``: rank the source models of a zoo for a target volume by MMD²."""

from __future__ import annotations

from ._common import add_common, add_target, open_target, open_zoo, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "rank", help="rank source models for a target volume (MMD² of encoder features, permutation p-values)",
        description="Embed the same random target tiles with every source model's encoder and rank the sources "
                    "by MMD² to their stored reference features (most transferable first).")
    add_target(p)
    p.add_argument("--zoo", default="default", help="zoo folder, one model package, or 'default' (bundled zoo)")
    p.add_argument("--n-tiles", type=int, default=256, help="target tiles embedded per source (default 256)")
    p.add_argument("--permutations", type=int, default=200, help="permutations per p-value (default 200)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $NEUROADDA_CACHE, else the platform cache folder)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--out", default=None, help="write the ranking as JSON here (input of `select --model`)")
    p.add_argument("--modality", default=None,
                   help="the target's imaging modality (e.g. ssTEM, FIB-SEM), to warn about sources of another")
    p.add_argument("--voxel-size", default=None,
                   help="the target's voxel size in nm, z,y,x or y,x (default: the file's, when it records one), "
                        "to warn about sources whose pixel size differs by more than 1.5x (and for --match-voxel-size)")
    p.add_argument("--match-voxel-size", action="store_true",
                   help="resample the target tiles to each source's pixel size before embedding (needs the "
                        "target's voxel size: --voxel-size or the file's)")
    p.add_argument("--calibration", default="none", choices=["none", "null_z", "relative"],
                   help="what the ranking sorts by: MMD² (none, default), its z-score against the permutation "
                        "null (null_z), or MMD² relative to the samples' own kernel similarity (relative)")
    p.add_argument("--pooling", default="auto", choices=["auto", "all", "mean", "std"],
                   help="which pooled features enter the MMD²: auto (default: the per-channel means of 'mean+std' "
                        "features, the package's own otherwise), all, or only the means / standard deviations")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ranking import rank_sources

    volume = open_target(args.target, args.key)
    voxel = None
    if args.voxel_size:
        try:
            voxel = [float(v) for v in args.voxel_size.split(",")]
        except ValueError:
            raise ValueError(f"expected --voxel-size as numbers separated by ',', got {args.voxel_size!r}") from None
        if len(voxel) not in (2, 3) or min(voxel) <= 0:
            raise ValueError(f"expected --voxel-size z,y,x or y,x in nm (positive), got {args.voxel_size!r}")
    ranking = rank_sources(volume, open_zoo(args.zoo), n_tiles=args.n_tiles, tile_size=args.tile_size,
                           seed=args.seed, n_permutations=args.permutations,
                           cache_dir=False if args.no_cache else args.cache_dir, progress=not args.no_progress,
                           backend=args.backend, device=args.device, target_modality=args.modality,
                           target_voxel_size_nm=voxel, match_voxel_size=args.match_voxel_size,
                           calibration=args.calibration, pooling=args.pooling)
    ranking.settings["target"]["path"] = args.target
    if args.out:
        ranking.to_json(args.out)
    if args.json:
        print_json(ranking.to_dict() | {"out": args.out})
        return 0
    calibrated = args.calibration != "none"
    print(f"{'rank':>4}  {'source':<28} {'MMD²':>10} {'noise 95%':>10} {'p-value':>8} {'tile':>5}"
          + (f" {args.calibration:>9}" if calibrated else "") + "  note")
    for i, e in enumerate(ranking, 1):
        own = f"{e.null_mmd2_95:>10.5f}" if e.null_mmd2_95 is not None else f"{'-':>10}"
        note = "synthetic" if e.synthetic else (e.modality or "")
        if e.cut_size is not None and e.cut_size != e.tile_size:
            note += f" (resampled from {e.cut_size} px)"
        score = f" {e.score:>9.4g}" if calibrated else ""
        print(f"{i:>4}  {e.name:<28} {e.mmd2:>10.5f} {own} {e.p_value:>8.3f} {e.tile_size or '-':>5}{score}  {note}")
    print(f"best: {ranking[0].name} ({ranking[0].path})")
    print("(noise 95%: the MMD² two samples of one distribution reach 1 time in 20, from the permutation null)")
    for w in ranking.warnings:
        print(f"warning: {w}")
    if args.out:
        print(f"ranking written to {args.out}")
    return 0
