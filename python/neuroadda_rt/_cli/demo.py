"""``neuroadda-rt demo``: the whole NeuroADDA workflow on a held-out synthetic domain, with a report.

``neuroadda-rt demo --real`` instead ranks the bundled real-EM zoo (:func:`neuroadda_rt.default_zoo`) on a
real public volume that none of its models was trained on (mouse cortex ATUM-SEM from the shared data,
``$NEUROADDA_DATA``) and selects the tiles to annotate: no labels exist there, so it stops at the
annotation hand-off (minutes on 2 cores).

The bundled synthetic zoo (:func:`neuroadda_rt.synthetic_zoo`) holds models trained on a synthetic domain family;
its ``family.json`` names one domain that no zoo model was trained on. The demo renders a fresh volume
of that domain (with exact labels, which act as the annotator), ranks the zoo, selects n = 4 tiles by
median uncertainty, fine-tunes the best source and trains from scratch on the same tiles, evaluates
both (and the source as-is) on held-out tiles of a second, independent volume of the domain, and writes
the HTML report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..selection import STRATEGIES
from ._common import open_zoo, print_json

#: Settings of the full demo and of ``--fast`` (CI / a quick look).
PRESETS = {
    "full": {"shape": (8, 384, 384), "tile_size": 128, "n_tiles": 256, "pool": 512, "n_permutations": 200,
             "n_test": 8, "train": {}},
    "fast": {"shape": (3, 256, 256), "tile_size": 128, "n_tiles": 64, "pool": 64, "n_permutations": 100,
             "n_test": 4, "train": {"steps": 30}},
}


#: The target of ``demo --real``: in no bundled model's training data, another species, tissue and modality.
REAL_TARGET = {"path": "kasthuri_mouse_cortex_uniem/data/DNN_test_images",
               "what": "mouse somatosensory cortex, ATUM serial-section SEM, 6x6x30 nm, CLAHE-filtered",
               "modality": "ATUM-SEM", "voxel_size_nm": [30.0, 6.0, 6.0]}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole workflow on a held-out synthetic domain and write the HTML report",
        description="Hold one synthetic domain out as the target (the one zoo/family.json names), rank the bundled "
                    "zoo, select 4 tiles by median uncertainty, fine-tune the best source and train from scratch on "
                    "the same tiles, evaluate both on held-out tiles and write the report (< 10 min on 2 cores).")
    p.add_argument("--out", default="neuroadda_demo", help="run directory (default ./neuroadda_demo)")
    p.add_argument("--fast", action="store_true", help="smaller volume, pool and training (about a minute)")
    p.add_argument("-n", type=int, default=4, help="tiles to annotate (default 4)")
    p.add_argument("--strategy", default="median",
                   choices=STRATEGIES)
    p.add_argument("--seed", type=int, default=0, help="seed of every step (default 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the zoo's recipe)")
    p.add_argument("--zoo", default="synthetic",
                   help="zoo folder with family.json (default: the bundled synthetic zoo)")
    p.add_argument("--real", action="store_true",
                   help="rank the bundled real-EM zoo and select tiles on a real shared volume instead (needs "
                        "the shared data: --data-root or $NEUROADDA_DATA)")
    p.add_argument("--data-root", default=None, help="--real: the shared EM data folder (default $NEUROADDA_DATA)")
    p.add_argument("--real-target", default=None,
                   help="--real: the target volume (default: <data root>/" + REAL_TARGET["path"] + ", "
                        + REAL_TARGET["what"] + ")")
    p.add_argument("--target", default=None, help="domain to hold out (default: the one family.json names)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $NEUROADDA_CACHE, else the platform cache folder)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def load_family(root: Path) -> dict:
    """Read ``family.json``: the generating tree, the domain styles and the held-out demo domain."""
    path = Path(root) / "family.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the demo needs a zoo built by `neuroadda-rt zoo build`")
    fam = json.loads(path.read_text(encoding="utf-8"))
    return fam


def held_out_name(fam: dict) -> str:
    for key in ("demo_target", "held_out", "holdout", "target", "demo"):
        v = fam.get(key)
        if isinstance(v, str):
            return v
        if isinstance(v, dict) and isinstance(v.get("name"), str):
            return v["name"]
    raise ValueError("family.json names no held-out demo domain (expected a 'held_out' entry)")


def domain_style(fam: dict, name: str):
    """The :class:`~neuroadda_rt.study.synthetic.DomainStyle` of domain ``name`` of the family."""
    from ..study.synthetic import DomainStyle, domain_family

    styles = fam.get("styles") or fam.get("domains")
    if isinstance(styles, dict):
        if name in styles:
            d = styles[name]
            d = d.get("style", d) if isinstance(d, dict) else d
            return DomainStyle.from_dict({"name": name, **{k: v for k, v in d.items() if k != "name"}})
    elif isinstance(styles, list):
        for d in styles:
            if isinstance(d, dict) and (d.get("name") == name):
                d = d.get("style", d)
                return DomainStyle.from_dict({"name": name, **{k: v for k, v in d.items() if k != "name"}})
    n, seed = fam.get("n") or fam.get("n_domains"), fam.get("seed")
    if n is None or seed is None:
        raise ValueError(f"family.json has no style for {name!r} and no (n, seed) to regenerate it")
    from ..study.zoo_build import family_generator

    kwargs = {**{k: fam[k] for k in ("drift", "prefix") if k in fam}, **family_generator(fam)}
    for s in domain_family(int(n), seed=int(seed), **kwargs)[0]:
        if s.name == name:
            return s
    raise ValueError(f"domain {name!r} is not in the family of family.json")


def run_real(args) -> int:
    """``demo --real``: rank the real-EM zoo on a real volume and select the tiles to annotate."""
    from ..datasets import resolve_data_root
    from ..package import default_zoo
    from ..workflow import run_workflow

    t0 = time.perf_counter()
    if args.real_target:
        target, facts = args.real_target, {"modality": None, "voxel_size_nm": None, "what": args.real_target}
    else:
        target, facts = str(resolve_data_root(args.data_root) / REAL_TARGET["path"]), REAL_TARGET
    if not Path(target.split(":")[0]).exists():
        raise FileNotFoundError(f"demo --real: target volume not found: {target}")
    zoo = default_zoo()
    fast = args.fast
    if not args.no_progress:
        print(f"demo --real: target {target} ({facts['what']}); real-EM zoo of {len(zoo)} models")
    res = run_workflow(target, zoo, n=args.n, labels=None, out_dir=args.out, strategy=args.strategy,
                       n_tiles=32 if fast else 96, pool=64 if fast else 256, seed=args.seed,
                       n_permutations=100 if fast else 200, cache_dir=args.cache_dir, progress=not args.no_progress,
                       target_modality=facts.get("modality"), target_voxel_size_nm=facts.get("voxel_size_nm"),
                       extra_settings={"demo": {"real": True, "target": target, "target_description": facts["what"],
                                                "preset": "fast" if fast else "full"}})
    wall = time.perf_counter() - t0
    r = res.ranking
    summary = {"report": str(res.report), "run_dir": str(res.run_dir), "target": target,
               "ranking": [{"name": e.name, "mmd2": e.mmd2, "null_mmd2_95": e.null_mmd2_95, "p_value": e.p_value,
                            "tile_size": e.tile_size} for e in r],
               "best_source": r[0].name, "warnings": r.warnings,
               "selected_tiles": res.selection.coords.tolist(), "annotation_dir": str(res.annotation_dir),
               "wall_s": round(wall, 1)}
    if args.json:
        print_json(summary)
        return 0
    for i, e in enumerate(r, 1):
        noise = "n/a" if e.null_mmd2_95 is None else f"{e.null_mmd2_95:.4f}"
        print(f"{i}. {e.name:<20} MMD² {e.mmd2:.4f} (noise level {noise}), p = {e.p_value:.3f}, "
              f"{e.modality}, {e.voxel_size_nm} nm")
    for w in r.warnings:
        print(f"warning: {w}")
    print(f"tiles to annotate ({res.selection.tile_size} px, from {r[0].name}): "
          + ", ".join(str(tuple(int(v) for v in c)) for c in res.selection.coords))
    print(f"done in {wall:.0f} s; annotation folder: {res.annotation_dir}; report: {res.report}")
    return 0


def run(args) -> int:
    if args.real:
        return run_real(args)
    from .. import _core
    from .._device import cuda_available
    from ..study.synthetic import make_domain
    from ..workflow import run_workflow

    t0 = time.perf_counter()
    preset = dict(PRESETS["fast" if args.fast else "full"])
    zoo = open_zoo(args.zoo)
    root = Path(args.zoo) if args.zoo not in (None, "default", "synthetic") else zoo.root
    fam = load_family(root)
    name = args.target or held_out_name(fam)
    style = domain_style(fam, name)
    # a fresh volume of the held-out domain: its exact labels play the annotator and the test set
    seed = int(fam.get("demo_seed", 1_000)) + args.seed
    image, labels = make_domain(style, preset["shape"], seed=seed)
    # held-out evaluation tiles from a second, independent volume of the same domain
    from ..tiles import extract_tiles, sample_tiles

    test_img, test_lab = make_domain(style, (2, *preset["shape"][1:]), seed=seed + 500)
    test = sample_tiles(test_img, preset["n_test"], preset["tile_size"], seed=args.seed)
    test_tiles = (test.tiles, extract_tiles(test_lab, test.coords, preset["tile_size"]))
    train = dict(preset["train"])
    if args.steps is not None:
        train["steps"] = args.steps
    train["seed"] = args.seed
    if not args.no_progress:
        print(f"demo: target domain {name!r}, volume {tuple(image.shape)}; zoo of {len(list(zoo))} source models")
    res = run_workflow(image, zoo, n=args.n, labels=labels, out_dir=args.out, strategy=args.strategy,
                       n_tiles=preset["n_tiles"], tile_size=preset["tile_size"], pool=preset["pool"], seed=args.seed,
                       n_permutations=preset["n_permutations"], train=train, test=test_tiles,
                       cache_dir=args.cache_dir, progress=not args.no_progress,
                       extra_settings={"demo": {"target_domain": name, "volume_seed": seed,
                                                "test_volume_seed": seed + 500,
                                                "shape": list(preset["shape"]), "preset": "fast" if args.fast
                                                else "full", "style": style.to_dict()}})
    wall = time.perf_counter() - t0
    run_json = json.loads((Path(args.out) / "run.json").read_text())
    summary = {"report": str(res.report), "run_dir": str(res.run_dir), "target_domain": name,
               "best_source": res.ranking[0].name, "ranking": [e.name for e in res.ranking],
               "vi": {k: (v.get("overall", {}) or {}).get("vi_total") for k, v in res.evaluation.items()},
               "vi_reduction": run_json.get("vi_reduction"),
               "vi_reduction_vs_source": run_json.get("vi_reduction_vs_source"), "wall_s": round(wall, 1),
               # the build's CUDA kernels and whether a GPU can run them now are two different facts
               "cuda_compiled": bool(_core.built_with_cuda()), "cuda_available": cuda_available()}
    nearest = fam.get("nearest", {}).get(name) if isinstance(fam.get("nearest"), dict) else None
    if nearest is not None:
        summary["nearest_relative"] = nearest
    if args.json:
        print_json(summary)
        return 0
    print(f"best source for {name}: {summary['best_source']}" +
          (f" (nearest relative in the tree: {nearest})" if nearest else ""))
    from ..report import headline_lines

    lines = headline_lines(run_json)
    if lines:
        print("VI on held-out tiles (lower is better):")
        for line in lines:
            print(f"  {line}")
    print(f"done in {wall:.0f} s (cuda_compiled={summary['cuda_compiled']}, "
          f"cuda_available={summary['cuda_available']}); report: {res.report}")
    return 0
