"""``neuroadda-rt zoo build|list|show|verify``: the model zoo (bundled or a folder of packages)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..runtime.source import read_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "zoo", help="build, list, show or verify a zoo of model packages (default: the bundled zoo)",
        description="Work with a zoo: a folder of model packages. Without --zoo, list/show/verify use the zoo "
                    "bundled with neuroadda_rt (source models trained on real labelled EM); --zoo synthetic "
                    "names the demo's synthetic zoo.")
    sub = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])

    b = sub.add_parser(
        "build", help="train one source model per labelled data set (--from-datasets) or synthetic domain",
        description="With --from-datasets A.json B.json ...: train one UNet per labelled Dataset manifest "
                    "(examples/datasets/*.json) and write a model package with the manifest's metadata and a "
                    "model card (data, licence, citation, recipe, validation curve, held-out VI and adapted "
                    "Rand error) into OUT; training stops when the held-out validation VI stops improving. "
                    "Without it: train a UNet on each domain of a synthetic domain family "
                    "(neuroadda_rt.study.synthetic.domain_family), hold one domain out for the demo, and write "
                    "the packages plus family.json (with no options, the demo's synthetic zoo). Both "
                    "checkpoint per model, resume after an interruption and skip finished models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from ..study.zoo_build import DEFAULT_ZOO as d

    b.add_argument("out", help="zoo folder to write")
    b.add_argument("--from-datasets", nargs="+", default=None, metavar="MANIFEST",
                   help="labelled Dataset manifests (JSON): one package each, trained on real data")
    b.add_argument("--data-root", default=None,
                   help="root of the manifests' relative paths (default $NEUROADDA_DATA)")
    b.add_argument("--max-steps", type=int, default=None,
                   help="--from-datasets: most training steps per package (default 4000; early stopping "
                        "usually ends sooner)")
    b.add_argument("--eval-every", type=int, default=None,
                   help="--from-datasets: steps between held-out validation evaluations (default 100)")
    b.add_argument("--patience", type=int, default=None,
                   help="--from-datasets: evaluations without improvement before stopping (default 4)")
    b.add_argument("--reference-tiles", type=int, default=None,
                   help="reference tiles per package (default 256)")
    b.add_argument("--n-domains", type=int, default=d.n_domains, help="domains in the family")
    b.add_argument("--seed", type=int, default=None,
                   help=f"synthetic: the family seed (default {d.seed}); --from-datasets: the training seed (default 0)")
    b.add_argument("--held-out", default=None, help="domain kept out of the zoo (default: the clearest one)")
    b.add_argument("--widths", default=",".join(map(str, d.widths)), help="UNet widths, comma-separated")
    b.add_argument("--steps", type=int, default=d.steps, help="synthetic: training steps per source")
    b.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    b.add_argument("--batch-size", type=int, default=None,
                   help=f"patches per step (default {d.batch_size}; --from-datasets 4)")
    b.add_argument("--patch-size", type=int, default=d.patch_size, help="training patch edge")
    b.add_argument("--volumes", type=int, default=d.volumes, help="synthetic volumes per domain")
    b.add_argument("--volume-shape", default="x".join(map(str, d.volume_shape)), help="z x h x w of each volume")
    b.add_argument("--tile-size", type=int, default=d.tile_size, help="reference / threshold tile edge")
    b.add_argument("--no-intensity-augment", action="store_true",
                   help="train the sources without intensity jitter (geometry is always augmented)")
    b.add_argument("--tree", default=d.tree, choices=["coalescent", "yule"],
                   help="the family's tree model (yule: the generator before 2026-11-25)")
    b.add_argument("--traits", default=d.traits, choices=["morphology", "all"],
                   help="parameters that drift along the tree")
    b.add_argument("--feature-level", type=int, default=d.feature_level,
                   help="encoder level of the ranking features (0 = first; default %(default)s)")
    b.add_argument("--pooling", default=d.pooling, choices=["mean", "max", "mean+std"],
                   help="pooling of that level's map for the ranking features (default %(default)s)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="training device")
    b.add_argument("--workers", type=int, default=1, help="domains trained in parallel processes")
    b.add_argument("--threads", type=int, default=None, help="PyTorch threads per worker")
    b.add_argument("--train-only", action="store_true", help="stop after training (keep the checkpoints)")
    b.add_argument("--checkpoints", default=None, help="checkpoint folder (default OUT/.checkpoints)")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=run_build)

    rf = sub.add_parser("refresh-features", help="rewrite a built zoo's ranking features (no retraining)",
                        description="Re-export each package's encoder at --feature-level and recompute its "
                                    "reference features with --pooling from the tiles the build drew; weights "
                                    "are unchanged. Each package is replaced atomically.")
    rf.add_argument("zoo", help="zoo folder written by 'zoo build' (with family.json)")
    rf.add_argument("--feature-level", type=int, default=d.feature_level, help="encoder level (default %(default)s)")
    rf.add_argument("--pooling", default=d.pooling, choices=["mean", "max", "mean+std"],
                    help="pooling of the level's map (default %(default)s)")
    rf.add_argument("--no-progress", action="store_true", help="hide progress bars")
    rf.add_argument("--json", action="store_true", help="machine-readable output")
    rf.set_defaults(func=run_refresh)

    ls = sub.add_parser("list", help="one line per model package",
                        description="List the model packages of a zoo (metadata only, no checksums).")
    ls.add_argument("--zoo", default="default", help="zoo folder, 'default' (bundled real-EM) or 'synthetic'")
    ls.add_argument("--organism", default=None, help="keep models of this organism")
    ls.add_argument("--modality", default=None, help="keep models of this imaging modality")
    ls.add_argument("--representation", default=None, choices=["boundary", "affinities"])
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=run_list)

    sh = sub.add_parser("show", help="the full metadata of one model (or the zoo's family.json)",
                        description="Print a model package's model.json (verified), or with NAME 'family' the "
                                    "zoo's family.json.")
    sh.add_argument("name", help="model name or package folder name ('family' for family.json)")
    sh.add_argument("--zoo", default="default", help="zoo folder, 'default' (bundled real-EM) or 'synthetic'")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    sh.set_defaults(func=run_show)

    v = sub.add_parser("verify", help="check every file's sha256 in every package",
                       description="Verify every package of the zoo (checksums of every file); exit status 1 "
                                   "when any package fails, naming the file.")
    v.add_argument("--zoo", default="default", help="zoo folder, 'default' (bundled real-EM) or 'synthetic'")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=run_verify)


def _zoo(spec: str):
    """The zoo of ``--zoo``: "default" (the bundled real-EM zoo), "synthetic", or a folder holding packages."""
    from ..errors import FormatError
    from ..package import Zoo, default_zoo, synthetic_zoo
    from ._common import empty_zoo_message

    if spec in (None, "default"):
        return default_zoo(allow_empty=True)
    if spec == "synthetic":
        return synthetic_zoo(allow_empty=True)
    p = Path(spec)
    if not p.is_dir():
        raise FileNotFoundError(f"zoo folder not found: {spec}")
    zoo = Zoo(p)
    if len(zoo) == 0:
        raise FormatError(empty_zoo_message(p))
    return zoo


def _ints(text: str, what: str, sep: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.lower().split(sep) if v.strip())
    except ValueError:
        raise ValueError(f"expected {what} as integers separated by '{sep}', got {text!r}") from None
    if not vals:
        raise ValueError(f"expected {what}, got {text!r}")
    return vals


def run_refresh(args) -> int:
    from ._common import print_json
    from ..study.zoo_build import refresh_reference_features

    fam = refresh_reference_features(args.zoo, feature_level=args.feature_level, pooling=args.pooling,
                                     progress=not args.no_progress)
    if args.json:
        print_json({"zoo": str(args.zoo), "recipe": fam["recipe"], "models": fam["models"]})
    else:
        print(f"{len(fam['models'])} packages in {args.zoo}: ranking features now level "
              f"{fam['recipe']['feature_level']}, pooling {fam['recipe']['pooling']}")
    return 0


def run_build(args) -> int:
    from ._common import print_json
    from ..study.zoo_build import build_zoo, zoo_size_bytes

    widths = _ints(args.widths, "--widths", ",")
    if args.from_datasets:
        return _run_build_datasets(args, widths)
    from ..study.zoo_build import DEFAULT_ZOO as d

    shape = _ints(args.volume_shape, "--volume-shape", "x")
    res = build_zoo(args.out, n_domains=args.n_domains, seed=d.seed if args.seed is None else args.seed, held_out=args.held_out, widths=widths,
                    steps=args.steps, lr=args.lr, batch_size=args.batch_size or d_batch(), patch_size=args.patch_size,
                    volumes=args.volumes, volume_shape=shape, tile_size=args.tile_size, device=args.device,
                    reference_tiles=args.reference_tiles or d_reference_tiles(),
                    workers=args.workers, threads=args.threads, progress=not args.no_progress,
                    train_only=args.train_only, checkpoint_root=args.checkpoints,
                    intensity_augment=not args.no_intensity_augment, tree=args.tree, traits=args.traits,
                    feature_level=args.feature_level, pooling=args.pooling)
    if args.train_only:
        if args.json:
            print_json(res)
        else:
            print(f"trained {', '.join(res['trained'])}; checkpoints in {res['checkpoints']} "
                  f"(run the same command without --train-only to package them)")
        return 0
    size = zoo_size_bytes(args.out)
    summary = {"zoo": str(Path(args.out)), "models": res["zoo_domains"], "held_out": res["held_out"],
               "nearest_relative_of_held_out": res["nearest"][res["held_out"]], "size_bytes": size,
               "family": str(Path(args.out) / "family.json")}
    if args.json:
        print_json(summary)
        return 0
    print(f"zoo of {len(res['zoo_domains'])} models in {args.out} ({size / 1e6:.1f} MB); held out for the demo: "
          f"{res['held_out']} (nearest relative in the zoo: {summary['nearest_relative_of_held_out']})")
    return 0


def d_batch() -> int:
    from ..study.zoo_build import DEFAULT_ZOO

    return DEFAULT_ZOO.batch_size


def d_reference_tiles() -> int:
    from ..study.zoo_build import DEFAULT_ZOO

    return DEFAULT_ZOO.reference_tiles


def _run_build_datasets(args, widths) -> int:
    """``zoo build OUT --from-datasets ...``: one package per labelled manifest (zoo_builder)."""
    import sys

    from ._common import print_json
    from ..zoo_builder import DEFAULT_DATASET_RECIPE, DatasetZooRecipe, build_zoo_from_datasets
    from ..study.zoo_build import zoo_size_bytes

    base = DEFAULT_DATASET_RECIPE.to_dict()
    given = {"widths": tuple(widths), "lr": args.lr, "batch_size": args.batch_size, "patch_size": args.patch_size,
             "tile_size": args.tile_size, "max_steps": args.max_steps, "eval_every": args.eval_every,
             "patience": args.patience, "reference_tiles": args.reference_tiles, "seed": args.seed,
             "intensity": not args.no_intensity_augment, "feature_level": args.feature_level, "pooling": args.pooling}
    # the synthetic defaults of the shared flags equal the data-set recipe's; the rest fall back to it
    recipe = DatasetZooRecipe.from_dict({**base, **{k: v for k, v in given.items() if v is not None}})

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    res = build_zoo_from_datasets(args.out, args.from_datasets, data_root=args.data_root, recipe=recipe,
                                  device=args.device, progress=not args.no_progress and not args.json,
                                  checkpoint_root=args.checkpoints, threads=args.threads, log_fn=say)
    res["size_bytes"] = zoo_size_bytes(args.out)
    if args.json:
        print_json(res)
        return 0
    for name, r in res["models"].items():
        print(f"{name}: held-out VI {r['held_out_vi']:.3f}, adapted Rand error {r['held_out_adapted_rand']:.3f} "
              f"(best step {r['best_step']}{', already built' if r['skipped'] else ''})")
    print(f"zoo of {len(res['models'])} models in {args.out} ({res['size_bytes'] / 1e6:.1f} MB)")
    return 0


def run_list(args) -> int:
    from ._common import print_json

    zoo = _zoo(args.zoo).filter(organism=args.organism, modality=args.modality, representation=args.representation)
    rows = zoo.summaries()
    for r, p in zip(rows, zoo.paths):
        m = read_json(p / "model.json")
        r["segmentation_threshold"] = (m.get("metrics") or {}).get("segmentation_threshold")
        r["widths"] = (m.get("network") or {}).get("widths")
    if args.json:
        print_json({"zoo": str(zoo.root), "models": rows})
        return 0
    if not rows:
        print(f"no model packages in {zoo.root}")
        return 0
    def voxel(v):
        return "x".join(f"{x:g}" for x in v) if v else "-"

    def vi(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    w = max(len("name"), *(len(str(r["name"])) for r in rows))
    wo = max(len("organism"), *(len(str(r["organism"])) for r in rows))
    wm = max(len("modality"), *(len(str(r["modality"])) for r in rows))
    print(f"{'name':<{w}}  {'organism':<{wo}}  {'modality':<{wm}}  {'voxel nm (z,y,x)':<16}  {'tile':>4}  "
          f"{'held-out VI':>11}  widths")
    for r in rows:
        print(f"{r['name']:<{w}}  {str(r['organism']):<{wo}}  {str(r['modality']):<{wm}}  "
              f"{voxel(r['voxel_size_nm']):<16}  {r['tile_size'] or '-':>4}  {vi(r['held_out_vi']):>11}  "
              f"{'-'.join(map(str, r['widths'] or []))}")
    kind = "synthetic" if all(r["synthetic"] for r in rows) else "real EM" if not any(r["synthetic"] for r in rows) \
        else "mixed synthetic and real"
    print(f"({len(rows)} models, {kind}, in {zoo.root}; held-out VI: see `zoo show NAME`)")
    return 0


def run_show(args) -> int:
    from ._common import print_json
    from ..package import load_model

    zoo = _zoo(args.zoo)
    if args.name == "family":
        f = Path(zoo.root) / "family.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found (the zoo was not built by `neuroadda-rt zoo build`)")
        fam = json.loads(f.read_text(encoding="utf-8"))
        if args.json:
            print_json(fam)
        else:
            print(f"family of {fam.get('n')} synthetic domains, seed {fam.get('seed')}")
            print(f"tree: {fam.get('newick')}")
            print(f"held out (demo target): {fam.get('held_out')} -> nearest relative in the zoo: "
                  f"{(fam.get('nearest') or {}).get(fam.get('held_out'))}")
            print(f"zoo domains: {', '.join(fam.get('zoo_domains') or [])}")
        return 0
    path = next((p for p in zoo.paths if p.name == args.name), None)
    if path is None:
        for p in zoo.paths:
            if read_json(p / "model.json").get("name") == args.name:
                path = p
                break
    if path is None:
        raise ValueError(f"no model named {args.name!r} in {zoo.root} (have {', '.join(zoo.names) or 'none'})")
    pkg = load_model(path)
    meta = dict(pkg.metadata)
    if args.json:
        print_json({"path": str(pkg.path), **meta})
        return 0
    tr = (meta.get("metrics") or {}).get("training") or {}
    print(f"{pkg.name}  ({pkg.path})")
    for k in ("organism", "tissue", "modality", "voxel_size_nm", "representation"):
        print(f"  {k:<22} {meta.get(k)}")
    print(f"  {'network':<22} {meta['network']}")
    print(f"  {'normalization':<22} {meta['normalization']}")
    print(f"  {'training data':<22} {(meta.get('training') or {}).get('data')}")
    if tr:
        print(f"  {'training':<22} {tr.get('steps')} steps, final loss {tr.get('final_loss'):.4f}, "
              f"recipe {tr.get('recipe')}")
    print(f"  {'segmentation threshold':<22} {(meta.get('metrics') or {}).get('segmentation_threshold')}")
    card = meta.get("training") or {}
    held = (meta.get("metrics") or {}).get("held_out") or {}
    if held:
        print(f"  {'held-out scores':<22} VI {held.get('vi_total'):.4f} (split {held.get('vi_split'):.4f}, merge "
              f"{held.get('vi_merge'):.4f}), adapted Rand error {held.get('adapted_rand_error'):.4f} on slices "
              f"{held.get('slices')} of split {held.get('split')!r}")
    for key in ("license", "citation", "augmentation", "command"):
        if card.get(key):
            print(f"  {key:<22} {card[key]}")
    if (card.get("early_stopping") or {}).get("stop_reason"):
        es = card["early_stopping"]
        print(f"  {'early stopping':<22} best step {es.get('best_step')}; {es.get('stop_reason')}")
    rf = meta["reference_features"]
    print(f"  {'reference features':<22} {rf.get('n_tiles')} tiles x {rf.get('n_features')} ({rf.get('pooling')}), "
          f"tile {rf.get('tile_size')}")
    print(f"  {'sha256':<22} {pkg.sha256}")
    return 0


def run_verify(args) -> int:
    from ._common import print_json

    zoo = _zoo(args.zoo)
    res = zoo.verify()
    ok = all(v is None for v in res.values())
    if args.json:
        print_json({"zoo": str(zoo.root), "ok": ok, "models": res})
        return 0 if ok else 1
    for name, err in res.items():
        print(f"{name}: {'ok' if err is None else 'FAILED: ' + err}")
    print(f"{sum(v is None for v in res.values())}/{len(res)} packages verified in {zoo.root}")
    return 0 if ok else 1
