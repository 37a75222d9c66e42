"""The study's plan: its domains' data on disk and the leave-one-out runs over them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ... import _atomic
from ..._digest import folder_sha256, json_sha256
from ...datasets import Dataset
from ...errors import InputValueError
from ..synthetic import domain_family, make_domain
from .config import ExperimentConfig, safe_name, train_settings


@dataclass
class Domain:
    """One domain's data on disk (``.npy`` under ``data/<name>/``) and what is known about it."""

    name: str
    kind: str                      # "synthetic" or "dataset"
    dir: str
    labelled: bool = True
    organism: str | None = None
    info: dict = field(default_factory=dict)

    def path(self, part: str) -> Path:
        return Path(self.dir) / f"{part}.npy"

    def load(self, part: str, mmap: bool = True) -> np.ndarray:
        return np.load(self.path(part), mmap_mode="r" if mmap else None, allow_pickle=False)


def _prepare_synthetic(cfg: ExperimentConfig, out: Path) -> tuple[list[Domain], str]:
    syn = cfg.raw["domains"]["synthetic"]
    n = int(syn["n"])
    fam_seed = int(syn.get("family_seed", cfg.raw["seed"]))
    shape = tuple(int(s) for s in syn.get("shape", (8, 2 * cfg.tile_size, 2 * cfg.tile_size)))
    kw = {}
    if "drift" in syn:
        kw["drift"] = float(syn["drift"])
    if "prefix" in syn:
        kw["prefix"] = str(syn["prefix"])
    for key in ("tree", "traits"):
        if key in syn:
            kw[key] = str(syn[key])
    styles, newick = domain_family(n, seed=fam_seed, **kw)
    domains = []
    for i, style in enumerate(styles):
        d = out / "data" / safe_name(style.name)
        dom = Domain(style.name, "synthetic", str(d), True, None,
                     {"style": style.to_dict(), "shape": list(shape), "family_seed": fam_seed})
        # Three independent renders of the style: the source's training volume, the target pool
        # (tiles to rank, select and annotate) and the held-out test volume.
        for j, part in enumerate(("source", "target", "test")):
            if dom.path(f"{part}_image").exists() and dom.path(f"{part}_labels").exists():
                continue
            seed = 1000 * (fam_seed + 1) + 10 * i + j
            with np.errstate(over="ignore", under="ignore"):
                img, lab = make_domain(style, shape, seed=seed)
            _atomic.save_npy(dom.path(f"{part}_labels"), lab)
            _atomic.save_npy(dom.path(f"{part}_image"), img)
        domains.append(dom)
    return domains, newick


def _prepare_dataset(spec, cfg: ExperimentConfig, out: Path) -> Domain:
    data_root = cfg.raw["domains"].get("data_root")
    name = None
    if isinstance(spec, Mapping):
        name = spec.get("name")
        spec = spec.get("manifest")
    p = Path(str(spec))
    if not p.is_absolute() and cfg.source_path and not p.exists():
        p = Path(cfg.source_path).parent / p
    ds = Dataset.from_json(p, data_root=data_root)
    name = str(name or ds.name)
    d = out / "data" / safe_name(name)
    labelled = all(sp in ds.splits and ds.has_labels(sp) for sp in ("train", "test"))
    dom = Domain(name, "dataset", str(d), labelled, ds.organism, {"manifest": str(p)})
    if not dom.path("target_image").exists():
        # an unlabelled set (e.g. Kasthuri) may have no "train" split: its first split is the target
        pool_split = "train" if "train" in ds.splits else ds.splits[0]
        train = np.asarray(ds.image(pool_split)[...])
        if labelled:
            _atomic.save_npy(dom.path("target_labels"), np.asarray(ds.labels("train")))
            test_img = np.asarray(ds.image("test")[...])
            _atomic.save_npy(dom.path("test_labels"), np.asarray(ds.labels("test")))
            _atomic.save_npy(dom.path("test_image"), test_img)
            # The source of a real domain is trained on its own training split (the same slices
            # that serve as its annotation pool when it is the target: that source is then left out).
            _atomic.save_npy(dom.path("source_labels"), np.asarray(ds.labels("train")))
            _atomic.save_npy(dom.path("source_image"), train)
        _atomic.save_npy(dom.path("target_image"), train)
    return dom


def prepare_domains(cfg: ExperimentConfig, out: Path) -> tuple[list[Domain], str | None]:
    """Materialise every domain's volumes under ``out/data`` (skipped when already there)."""
    domains: list[Domain] = []
    newick = None
    if cfg.raw["domains"]["synthetic"]:
        syn, newick = _prepare_synthetic(cfg, out)
        domains += syn
    for spec in cfg.raw["domains"]["datasets"]:
        domains.append(_prepare_dataset(spec, cfg, out))
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise InputValueError(f"expected unique domain names, got {names}")
    if len(domains) < 2:
        raise InputValueError(f"expected at least 2 domains, got {names}")
    return domains, newick


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """Everything one run needs (JSON-able: it travels to Dask workers)."""

    run_id: str
    target: str
    init: str            # a source domain name, or "scratch"
    tiles_from: str      # the source model whose uncertainty chose the tiles
    n: int
    strategy: str
    seed: int
    source_rank: int | None
    mmd2: float | None
    mmd2_p: float | None
    best_source: str
    target_dir: str
    source_package: str | None
    selector_package: str
    settings: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_runs(cfg: ExperimentConfig, domains: Sequence[Domain], packages: Mapping[str, str],
              mmd2: np.ndarray, p_values: np.ndarray | None, names: Sequence[str],
              targets: Sequence[str] | None = None) -> list[RunSpec]:
    """Enumerate the leave-one-out runs (targets x inits x n x strategies x seeds).

    ``mmd2[i, j]`` is source ``names[i]`` against target ``targets[j]`` (default: the same names,
    a square matrix). A domain without a source of its own (e.g. a zoo's held-out domain) is a
    target only.
    """
    idx = {n: i for i, n in enumerate(names)}
    col = {n: j for j, n in enumerate(targets if targets is not None else names)}
    ft = cfg.raw["finetune"]
    recipe = train_settings(ft["train"])
    specs = []
    only = ft.get("targets")
    if only is not None:
        unknown = sorted(set(only) - {d.name for d in domains})
        if unknown:
            raise InputValueError(f"finetune.targets names unknown domains {unknown}; "
                                  f"domains are {sorted(d.name for d in domains)}")
    for dom in domains:
        if not dom.labelled or (only is not None and dom.name not in only):
            continue
        if dom.name not in col:
            raise InputValueError(f"no MMD² column for target domain {dom.name!r} (columns: {sorted(col)})")
        t = col[dom.name]
        others = [s for s in names if s != dom.name and s in packages]
        if not others:
            continue
        order = sorted(others, key=lambda s: (mmd2[idx[s], t], s))
        rank = {s: r + 1 for r, s in enumerate(order)}
        best = order[0]
        inits = list(order) if ft["sources"] == "all" else [best]
        if ft["scratch"]:
            inits.append("scratch")
        for seed in cfg.seeds:
            for n in cfg.ns:
                for strategy in cfg.strategies:
                    for init in inits:
                        selector = best if init == "scratch" else init
                        settings = {"tile_size": cfg.tile_size, "pool": int(ft["pool"]), "train": recipe,
                                    "n_test": int(cfg.raw["evaluate"]["n_test"]),
                                    "threads": int(cfg.raw["threads_per_task"]),
                                    "keep_models": bool(cfg.raw["keep_models"]),
                                    "selector_digest": package_digest(packages[selector]),
                                    "init_digest": package_digest(packages[init]) if init != "scratch" else None}
                        digest = json_sha256({"target": dom.name, "dir": dom.dir, **settings})[:8]
                        run_id = safe_name(f"{dom.name}__{init}__n{n}__{strategy}__s{seed}__{digest}")
                        s_i = None if init == "scratch" else idx[init]
                        specs.append(RunSpec(
                            run_id=run_id, target=dom.name, init=init, tiles_from=selector, n=int(n),
                            strategy=strategy, seed=int(seed), source_rank=None if init == "scratch" else rank[init],
                            mmd2=None if s_i is None else float(mmd2[s_i, t]),
                            mmd2_p=None if (s_i is None or p_values is None) else float_or_none(p_values[s_i, t]),
                            best_source=best, target_dir=dom.dir,
                            source_package=None if init == "scratch" else packages[init],
                            selector_package=packages[selector], settings=settings))
    return specs


def float_or_none(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def package_digest(path: str) -> str:
    """What a run's result depends on in a source package: all of its files."""
    return folder_sha256(path)[:12]
