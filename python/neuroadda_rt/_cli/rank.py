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
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ranking import rank_sources

    volume = open_target(args.target, args.key)
    ranking = rank_sources(volume, open_zoo(args.zoo), n_tiles=args.n_tiles, tile_size=args.tile_size,
                           seed=args.seed, n_permutations=args.permutations,
                           cache_dir=False if args.no_cache else args.cache_dir, progress=not args.no_progress,
                           backend=args.backend, device=args.device)
    ranking.settings["target"]["path"] = args.target
    if args.out:
        ranking.to_json(args.out)
    if args.json:
        print_json(ranking.to_dict() | {"out": args.out})
        return 0
    print(f"{'rank':>4}  {'source':<28} {'MMD²':>10} {'p-value':>8}")
    for i, e in enumerate(ranking, 1):
        print(f"{i:>4}  {e.name:<28} {e.mmd2:>10.5f} {e.p_value:>8.3f}")
    print(f"best: {ranking[0].name} ({ranking[0].path})")
    if args.out:
        print(f"ranking written to {args.out}")
    return 0
