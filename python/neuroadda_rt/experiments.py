"""The paper's study as one reproducible command: sources, MMD² matrix, leave-one-out fine-tuning.

:func:`run_experiment` (CLI: ``neuroadda-rt experiment CONFIG``) runs, over a set of domains
(a synthetic family, real datasets through their manifests, or both):

1. **sources** -- one source model per domain, trained with the same recipe for every domain
   (or taken from an existing zoo);
2. **MMD² matrix** -- ``M[s, t]``: target ``t``'s tiles embedded by source ``s``'s encoder against
   ``s``'s reference features, with permutation p-values (:func:`~neuroadda_rt.rank_sources` per
   target); saved with its :class:`~neuroadda_rt.atlas.Atlas` and the atlas figure;
3. **runs** -- leave-one-out: for every labelled target, every other domain's source and a network
   trained from scratch, for every ``n`` (tiles annotated), selection strategy and seed: select
   ``n`` tiles of the target with the tiles' source model, fine-tune (or train from scratch on the
   tiles the top-ranked source chose), and evaluate VI and adapted Rand error on held-out tiles;
4. **table** -- one row per run (every setting a column) in ``results.parquet`` and
   ``results.csv``;
5. **figures** -- VI versus n per target, MMD² rank versus fine-tuned VI (Spearman ρ), selection
   strategies at n = 4, and the VI reduction at n = 4 versus scratch.

Every run is one task (Dask: a local cluster by default, ``scheduler="tcp://..."`` to use an
existing one, ``"synchronous"`` for in-process debugging and tests). Each finished run writes its
row atomically to ``runs/<run_id>.json``; a restarted study skips runs whose row exists, and an
interrupted run leaves no row (its training resumes from its checkpoint). The run id encodes the
run's settings and a digest of everything that determines its result (recipe, tile size, pool,
held-out set, source model), so changing the configuration never reuses a stale row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import _atomic
from .errors import FormatError, InputValueError, require

log = logging.getLogger("neuroadda_rt")

__all__ = ["ExperimentConfig", "ExperimentResult", "load_config", "plan_runs", "run_experiment",
           "assemble_table", "make_figures", "FIGURES"]

RESULTS_FORMAT = "neuroadda_rt.experiment/1"

#: Figure files written by :func:`make_figures` (under ``figures/``).
FIGURES = ("atlas.png", "vi_vs_n.png", "mmd_rank_vs_vi.png", "strategies_n4.png", "vi_reduction_n4.png")

STRATEGIES = ("median", "random", "max", "min", "kcenter", "median-diverse")

# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
_DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "seed": 0,
    "tile_size": 256,
    "threads_per_task": 1,
    "domains": {
        "synthetic": None,   # {"n": 3, "family_seed": 0, "shape": [z, h, w], "drift": 0.6,
                             #  "tree": "coalescent", "traits": "morphology"}
        "datasets": [],      # manifest paths (examples/datasets/*.json) or {"manifest": ..., "name": ...}
        "data_root": None,   # where the manifests' relative paths point (default: $NEUROADDA_DATA / ../shared/em_data)
    },
    "sources": {
        "zoo": None,         # reuse an existing zoo: {domain name: package path}, a zoo folder or "default"
        "network": {"widths": [16, 32, 64, 128]},
        "export": False,     # also write each source as a full model package (ONNX) in <source>/package
        "train": {"steps": 2000, "lr": 1e-3, "batch_size": 8, "patch_size": 128},
    },
    "mmd": {"n_tiles": 128, "n_permutations": 200},
    "finetune": {
        "n": [1, 2, 4, 8, 16],
        "strategies": ["median", "random", "max", "kcenter", "median-diverse"],
        "seeds": [0, 1, 2],
        "pool": 512,
        "sources": "all",    # "all": every other domain's source; "best": only the top-ranked one
        "scratch": True,
        "targets": None,     # fine-tune only these target domains (default: every labelled domain)
        "train": {"steps": 300, "lr": 1e-3, "batch_size": 8, "patch_size": 128},
    },
    "evaluate": {"n_test": 16},
    "keep_models": False,
}


def _merge(base: dict, override: Mapping, path: str = "") -> dict:
    out = dict(base)
    for k, v in override.items():
        if k not in base:
            raise InputValueError(f"unknown configuration key {path + k!r}; expected one of "
                                  f"{sorted(path + key for key in base)}")
        if isinstance(base[k], dict) and isinstance(v, Mapping) and k not in ("zoo",):
            out[k] = _merge(base[k], v, path + k + ".")
        else:
            out[k] = v
    return out


@dataclass
class ExperimentConfig:
    """A validated study configuration (see ``examples/experiments/*.yaml``).

    ``raw`` holds the full configuration with defaults filled in; the attributes are the parts
    the runner reads often.
    """

    raw: dict
    source_path: str | None = None

    @property
    def name(self) -> str:
        return str(self.raw["name"])

    @property
    def tile_size(self) -> int:
        return int(self.raw["tile_size"])

    @property
    def ns(self) -> list[int]:
        return [int(n) for n in self.raw["finetune"]["n"]]

    @property
    def strategies(self) -> list[str]:
        return [str(s) for s in self.raw["finetune"]["strategies"]]

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.raw["finetune"]["seeds"]]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.raw, default=str))

    def digest(self, *keys: str) -> str:
        """Short digest of some top-level sections (what a stage's result depends on)."""
        part = {k: self.raw[k] for k in keys} if keys else self.raw
        return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:10]


def load_config(config) -> ExperimentConfig:
    """Read and validate a study configuration.

    Parameters
    ----------
    config : path to a YAML or JSON file, or a dict
        Unknown keys are refused (they are usually typos); missing keys take the defaults of the
        paper-sized study (see ``docs/method.md``).

    Returns
    -------
    ExperimentConfig

    Examples
    --------
    >>> cfg = load_config({"name": "tiny", "tile_size": 64,
    ...                    "domains": {"synthetic": {"n": 3, "family_seed": 0, "shape": [2, 128, 128]}},
    ...                    "finetune": {"n": [2, 4], "strategies": ["median"], "seeds": [0]}})
    >>> cfg.ns, cfg.strategies
    ([2, 4], ['median'])
    """
    source = None
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        if not p.exists():
            raise FileNotFoundError(f"experiment configuration not found: {p}")
        text = p.read_text(encoding="utf-8")
        source = str(p.resolve())
        if p.suffix.lower() in (".yaml", ".yml"):
            yaml = require("yaml", "test")
            try:
                config = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise FormatError(f"{p}: expected valid YAML, got: {exc}") from exc
        else:
            try:
                config = json.loads(text)
            except ValueError as exc:
                raise FormatError(f"{p}: expected valid JSON, got: {exc}") from exc
    if not isinstance(config, Mapping):
        raise InputValueError(f"expected a configuration mapping, got {type(config).__name__}")
    raw = _merge(_DEFAULTS, config)
    cfg = ExperimentConfig(raw, source)
    _validate(cfg)
    return cfg


def _validate(cfg: ExperimentConfig) -> None:
    r = cfg.raw
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.name):
        raise InputValueError(f"expected a name of letters, digits, '_', '-', '.', got {cfg.name!r}")
    if cfg.tile_size < 16:
        raise InputValueError(f"expected tile_size >= 16, got {cfg.tile_size}")
    syn, ds = r["domains"]["synthetic"], r["domains"]["datasets"]
    if not syn and not ds:
        raise InputValueError("expected domains.synthetic and/or domains.datasets, got neither")
    if syn is not None:
        if not isinstance(syn, Mapping):
            raise InputValueError(f"expected domains.synthetic a mapping, got {type(syn).__name__}")
        unknown = set(syn) - {"n", "family_seed", "shape", "drift", "prefix", "tree", "traits"}
        if unknown:
            raise InputValueError(f"unknown keys in domains.synthetic: {sorted(unknown)}")
        from .synthetic import FAMILY_TRAITS, FAMILY_TREES

        for key, allowed in (("tree", FAMILY_TREES), ("traits", FAMILY_TRAITS)):
            if key in syn and syn[key] not in allowed:
                raise InputValueError(f"expected domains.synthetic.{key} in {allowed}, got {syn[key]!r}")
        if int(syn.get("n", 0)) < 2:
            raise InputValueError(f"expected domains.synthetic.n >= 2, got {syn.get('n')}")
    if not isinstance(ds, list):
        raise InputValueError(f"expected domains.datasets a list of manifest paths, got {type(ds).__name__}")
    if not cfg.ns or min(cfg.ns) < 1:
        raise InputValueError(f"expected finetune.n a non-empty list of positive integers, got {cfg.ns}")
    bad = [s for s in cfg.strategies if s not in STRATEGIES]
    if bad or not cfg.strategies:
        raise InputValueError(f"expected finetune.strategies among {STRATEGIES}, got {cfg.strategies}")
    if not cfg.seeds:
        raise InputValueError("expected at least one seed in finetune.seeds")
    ft_targets = r["finetune"]["targets"]
    if ft_targets is not None and (isinstance(ft_targets, str) or not all(isinstance(t, str) for t in ft_targets)):
        raise InputValueError(f"expected finetune.targets to be a list of domain names, got {ft_targets!r}")
    if r["finetune"]["sources"] not in ("all", "best"):
        raise InputValueError(f"expected finetune.sources 'all' or 'best', got {r['finetune']['sources']!r}")
    pool = int(r["finetune"]["pool"])
    if pool < max(cfg.ns):
        raise InputValueError(f"expected finetune.pool >= max(n) = {max(cfg.ns)}, got {pool}")
    if int(r["mmd"]["n_tiles"]) < 2:
        raise InputValueError(f"expected mmd.n_tiles >= 2, got {r['mmd']['n_tiles']}")
    if int(r["evaluate"]["n_test"]) < 1:
        raise InputValueError(f"expected evaluate.n_test >= 1, got {r['evaluate']['n_test']}")


# --------------------------------------------------------------------------------------------
# file names
# --------------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", str(name)).strip("-") or "x"


# --------------------------------------------------------------------------------------------
# domains
# --------------------------------------------------------------------------------------------
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
    from .synthetic import domain_family, make_domain

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
        d = out / "data" / _safe(style.name)
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
    from .datasets import Dataset

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
    d = out / "data" / _safe(name)
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
# model back end: the only place that touches training / packages
# --------------------------------------------------------------------------------------------
def _set_threads(n: int) -> None:
    try:
        import torch

        torch.set_num_threads(max(1, int(n)))
    except ImportError:  # pragma: no cover
        pass


def _stack_tiles(volume: np.ndarray, coords: np.ndarray, size: int) -> np.ndarray:
    from .tiles import extract_tiles

    return np.asarray(extract_tiles(volume, np.asarray(coords, dtype=np.int64), size))


SOURCE_FORMAT = "neuroadda_rt.experiment-source/1"


def _feature_extractor(net, pooling: str = "mean"):
    from .runtime import FeatureExtractor

    return FeatureExtractor(net, backend="torch", device="cpu", pooling=pooling)


def _train_source(dom: Domain, cfg: ExperimentConfig, dest: Path) -> str:
    """Train the source model of ``dom`` into the folder ``dest``.

    The same recipe for every domain: a fresh :class:`~neuroadda_rt.models.UNet` of
    ``sources.network`` (initialised from ``torch.manual_seed(seed)``), trained by
    :func:`~neuroadda_rt.training.train_network` -- the engine of ``finetune`` /
    ``train_from_scratch`` -- with ``sources.train`` on the domain's source volume. The folder holds
    the weights (safetensors), ``source.json`` (config, tuned threshold) and the reference features
    of ``mmd.n_tiles`` random source tiles; with ``sources.export: true`` also a full model package
    in ``package/`` (ONNX, usable as a zoo). Resumable through its training checkpoint.
    """
    torch = require("torch", "torch")
    st = require("safetensors.torch", "runtime")

    from .models import UNet
    from .tiles import sample_tiles
    from .training import TrainRecipe, train_network

    src = cfg.raw["sources"]
    seed = int(cfg.raw["seed"])
    images = dom.load("source_image", mmap=False)
    labels = dom.load("source_labels", mmap=False)
    ims = list(images) if images.ndim == 3 else [images]
    lbs = list(labels) if labels.ndim == 3 else [labels]
    torch.manual_seed(seed)
    net = UNet(**dict(src["network"]))
    ckpt = dest.parent / (dest.name + ".ckpt")
    recipe = TrainRecipe(seed=seed, **_train_kwargs(src["train"]))
    history = train_network(net, ims, lbs, recipe=recipe, checkpoint_dir=ckpt, desc=f"source {dom.name}")
    sample = sample_tiles(images, int(cfg.raw["mmd"]["n_tiles"]), cfg.tile_size, seed=seed)
    ref_tiles = sample.tiles
    ref = np.asarray(_feature_extractor(net).features(ref_tiles), dtype=np.float32)
    # the threshold is tuned on (at most 16 of) the same tiles: whole slices would cost minutes
    k = min(16, len(ref_tiles))
    tune_labels = _stack_tiles(labels, sample.coords[:k], cfg.tile_size)
    meta = {"format": SOURCE_FORMAT, "name": dom.name, "organism": dom.organism, "network": net.config,
            "threshold": _tune_threshold(net, list(ref_tiles[:k]), list(tune_labels)), "pooling": "mean",
            "recipe": recipe.to_dict(),
            "reference": {"n": int(len(ref_tiles)), "tile_size": cfg.tile_size, "seed": seed},
            "final_loss": float(np.mean(history.loss[-10:])) if history.loss else None}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    st.save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp / "network.safetensors"))
    np.save(tmp / "reference_features.npy", ref, allow_pickle=False)
    if src.get("export"):
        from .package import save_model

        save_model(net, tmp / "package", name=dom.name, organism=dom.organism, reference_tiles=ref_tiles,
                   reference_info=meta["reference"], training={"data": f"experiment domain {dom.name}",
                                                               "recipe": recipe.to_dict()})
    (tmp / "source.json").write_text(_atomic.dumps_json(meta), encoding="utf-8")
    _atomic.commit_dir(tmp, dest)  # the folder appears complete or not at all
    shutil.rmtree(ckpt, ignore_errors=True)
    return str(dest)


def load_source(path) -> tuple[Any, dict, np.ndarray]:
    """``(UNet in eval mode, metadata, reference features)`` of a source trained by the runner or
    of a model package (a zoo entry). For a package, ``metadata["package"]`` holds the loaded
    package, which inference should use so that its own intensity rule applies."""
    p = Path(path)
    if (p / "source.json").exists():
        torch = require("torch", "torch")
        st = require("safetensors.torch", "runtime")
        from .models import unet_from_config

        meta = json.loads((p / "source.json").read_text(encoding="utf-8"))
        net = unet_from_config(meta["network"])
        net.load_state_dict(st.load_file(str(p / "network.safetensors")))
        del torch
        return net.eval(), meta, np.load(p / "reference_features.npy", allow_pickle=False)
    from .evaluation import stored_threshold
    from .package import load_model
    from .ranking import _pkg_pooling

    pkg = load_model(p)
    meta = {"name": pkg.name if hasattr(pkg, "name") else p.name, "threshold": stored_threshold(pkg),
            "pooling": _pkg_pooling(pkg), "network": dict(pkg.metadata.get("network", {})), "package": pkg}
    return pkg.unet().eval(), meta, np.asarray(pkg.reference_features, dtype=np.float32)


def _tune_threshold(net, images, labels) -> float | None:
    """Segmentation threshold minimising VI on the model's own training images (never test data)."""
    try:
        from .segmentation import tune_threshold

        return float(tune_threshold(_probabilities(net, images), [np.asarray(l) for l in labels],
                                    net.config.get("head", "boundary")).threshold)
    except Exception as exc:  # a default threshold is still a valid (if weaker) model
        log.warning("threshold tuning failed (%s); the evaluation default applies", exc)
        return None


def _train_kwargs(train: Mapping) -> dict:
    allowed = {"steps", "lr", "batch_size", "patch_size", "augment", "weight_decay"}
    unknown = set(train) - allowed
    if unknown:
        raise InputValueError(f"unknown training settings {sorted(unknown)}; expected some of {sorted(allowed)}")
    return dict(train)


# --------------------------------------------------------------------------------------------
# planning
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
    recipe = _train_kwargs(ft["train"])
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
                                    "selector_digest": _package_digest(packages[selector]),
                                    "init_digest": _package_digest(packages[init]) if init != "scratch" else None}
                        digest = hashlib.sha256(json.dumps(
                            {"target": dom.name, "dir": dom.dir, **settings}, sort_keys=True).encode()).hexdigest()[:8]
                        run_id = _safe(f"{dom.name}__{init}__n{n}__{strategy}__s{seed}__{digest}")
                        s_i = None if init == "scratch" else idx[init]
                        specs.append(RunSpec(
                            run_id=run_id, target=dom.name, init=init, tiles_from=selector, n=int(n),
                            strategy=strategy, seed=int(seed), source_rank=None if init == "scratch" else rank[init],
                            mmd2=None if s_i is None else float(mmd2[s_i, t]),
                            mmd2_p=None if (s_i is None or p_values is None) else _float_or_none(p_values[s_i, t]),
                            best_source=best, target_dir=dom.dir,
                            source_package=None if init == "scratch" else packages[init],
                            selector_package=packages[selector], settings=settings))
    return specs


def _float_or_none(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _package_digest(path: str) -> str:
    """A digest of a package folder's files (names, sizes, mtimes are not enough: hash the weights)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if f.suffix in (".json",) and f.name != "model.json":
            continue
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# one run (executed on a worker)
# --------------------------------------------------------------------------------------------
def execute_run(spec: dict, runs_dir: str) -> dict:
    """Run one fine-tuning (or scratch) run and write its row atomically to ``runs_dir``.

    Returns the row. Skips the work when the row already exists (a finished run).
    """
    row_path = Path(runs_dir) / f"{spec['run_id']}.json"
    if row_path.exists():
        return json.loads(row_path.read_text(encoding="utf-8"))
    torch = require("torch", "torch")
    import copy

    from .models import unet_from_config
    from .selection import select_tiles
    from .training import TrainRecipe, train_network

    s = spec["settings"]
    _set_threads(s.get("threads", 1))
    t_start = time.perf_counter()
    tdir = Path(spec["target_dir"])
    target = np.load(tdir / "target_image.npy", mmap_mode="r")
    target_labels = np.load(tdir / "target_labels.npy", mmap_mode="r")
    test_images, test_labels, _ = _held_out(tdir, s["tile_size"], s["n_test"])

    # tiles chosen by the selector source's uncertainty (source-free)
    selector, sel_meta, _ = load_source(spec["selector_package"])
    sel = select_tiles(target, sel_meta.get("package", selector), spec["n"], strategy=spec["strategy"],
                       pool=s["pool"], tile_size=s["tile_size"], seed=spec["seed"], backend="torch", device="cpu")
    coords = np.asarray(sel.coords, dtype=np.int64)
    images = _stack_tiles(target, coords, s["tile_size"])
    labels = _stack_tiles(target_labels, coords, s["tile_size"])

    # fine-tune a copy of the source, or train its architecture from a fresh seeded initialisation:
    # the same recipe either way (what finetune / train_from_scratch do, without the ONNX export)
    if spec["init"] == "scratch":
        torch.manual_seed(spec["seed"])
        net = unet_from_config(selector.config)
    else:
        net = copy.deepcopy(load_source(spec["source_package"])[0])
    work = Path(runs_dir).parent / "work" / spec["run_id"]
    recipe = TrainRecipe(seed=spec["seed"], **s["train"])
    t0 = time.perf_counter()
    history = train_network(net, list(images), list(labels), recipe=recipe, checkpoint_dir=work,
                            desc=spec["run_id"])
    threshold = _tune_threshold(net, list(images), list(labels))
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ev = _evaluate(net, test_images, test_labels, threshold)
    eval_s = time.perf_counter() - t0
    if s.get("keep_models"):
        st = require("safetensors.torch", "runtime")
        dest = Path(runs_dir).parent / "models" / f"{spec['run_id']}.safetensors"
        with _atomic.atomic_path(dest) as tmp:
            st.save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    row = {
        "run_id": spec["run_id"], "target": spec["target"], "init": spec["init"],
        "init_kind": "scratch" if spec["init"] == "scratch" else "source",
        "tiles_from": spec["tiles_from"], "best_source": spec["best_source"],
        "is_best_source": spec["init"] == spec["best_source"],
        "source_rank": spec["source_rank"], "mmd2": spec["mmd2"], "mmd2_p": spec["mmd2_p"],
        "n": spec["n"], "strategy": spec["strategy"], "seed": spec["seed"],
        **ev,
        "n_test": int(len(test_images)),
        "tile_size": s["tile_size"], "pool": s["pool"],
        **{f"train_{k}": v for k, v in s["train"].items()},
        "tile_coords": json.dumps(coords.tolist()),
        "final_loss": float(np.mean(history.loss[-3:])) if history.loss else None,
        "train_seconds": round(train_s, 3), "eval_seconds": round(eval_s, 3),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _atomic.write_json(row_path, row)
    shutil.rmtree(work, ignore_errors=True)
    return row


def _probabilities(net, images) -> list[np.ndarray]:
    """Boundary / affinity probabilities of whole 2-D images with the PyTorch network."""
    import torch

    from .training import _to_unit_float

    out = []
    with torch.no_grad():
        for im in images:
            p = net.eval()(torch.from_numpy(_to_unit_float(np.asarray(im))[None, None]))[0].numpy()
            out.append(p[0] if p.shape[0] == 1 else p)  # boundary: (H, W); affinities: (C, H, W)
    return out


def _evaluate(net, images, labels, threshold: float | None) -> dict:
    """Mean VI split / merge / total and adapted Rand error over the held-out tiles.

    The same conventions as :func:`~neuroadda_rt.evaluate` (:func:`~neuroadda_rt.segment` with the
    threshold tuned on the training tiles, :func:`~neuroadda_rt.evaluation.score_segmentation`),
    computed on the PyTorch network.
    """
    from . import evaluation
    from .segmentation import segment

    rep = net.config.get("head", "boundary")
    kw = {} if threshold is None else {"threshold": float(threshold)}
    scores = [evaluation.score_segmentation(np.asarray(segment(p, rep, **kw)), np.asarray(gt))
              for p, gt in zip(_probabilities(net, images), labels)]
    out = {m: float(np.mean([sc[m] for sc in scores])) for m in evaluation.METRICS}
    out["threshold"] = float("nan") if threshold is None else float(threshold)
    out["threshold_source"] = "default" if threshold is None else "tuned on the annotated tiles"
    return out


def _held_out(tdir: Path, size: int, n_test: int):
    """The held-out evaluation tiles: a fixed grid over the test volume (the same for every run)."""
    img = np.load(tdir / "test_image.npy", mmap_mode="r")
    lab = np.load(tdir / "test_labels.npy", mmap_mode="r")
    from .tiles import grid_tiles

    coords = np.asarray(grid_tiles(img.shape, size), dtype=np.int64)
    if len(coords) > n_test:
        # evenly spread over the grid, deterministic
        coords = coords[np.linspace(0, len(coords) - 1, n_test).round().astype(int)]
    return _stack_tiles(img, coords, size), _stack_tiles(lab, coords, size), coords


# --------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------
def _run_tasks(fn: Callable, items: Sequence, *, scheduler, workers: int | None, progress: bool,
               desc: str) -> tuple[list, list[tuple[Any, str]]]:
    """Run ``fn(item)`` for every item, one task each. Returns (results, failures)."""
    results: list = []
    failures: list[tuple[Any, str]] = []
    if not items:
        return results, failures

    def guarded(item):
        try:
            return ("ok", fn(item))
        except Exception:  # a failing run must not stop the study: it is reported and retried next time
            return ("error", traceback.format_exc())

    if scheduler in ("synchronous", "sync", "threads", "processes"):
        dask = require("dask", "dask")
        import dask as _dask

        sched = "synchronous" if scheduler == "sync" else scheduler
        tasks = [_dask.delayed(guarded, pure=False)(it) for it in items]
        outs = _dask.compute(*tasks, scheduler=sched, **({"num_workers": workers} if workers and
                                                          sched != "synchronous" else {}))
        del dask
        for it, (status, value) in zip(items, outs):
            (results if status == "ok" else failures).append(value if status == "ok" else (it, value))
        return results, failures

    distributed = require("distributed", "dask")
    # Dask's cluster chatter (workers starting, nannies closing) is not the user's business.
    quiet = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)
             if name == "distributed" or name.startswith("distributed.")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    own_cluster = None
    client = None
    try:
        if scheduler in (None, "local", "distributed"):
            n = workers or max(1, (os.cpu_count() or 2))
            own_cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                   dashboard_address=":0", silence_logs=logging.ERROR)
            client = distributed.Client(own_cluster)
        else:
            client = distributed.Client(str(scheduler))
        futures = client.map(guarded, list(items), pure=False)
        bar = None
        if progress:
            tqdm = require("tqdm", "runtime").tqdm
            bar = tqdm(total=len(futures), desc=desc, unit="run", dynamic_ncols=True)
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in distributed.as_completed(futures):
            status, value = fut.result()
            if status == "ok":
                results.append(value)
            else:
                failures.append((items[index[fut.key]], value))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        if client is not None:
            client.close()
        if own_cluster is not None:
            own_cluster.close()
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    return results, failures


def _train_source_task(args) -> str:
    dom, cfg_raw, dest = args
    _set_threads(cfg_raw.get("threads_per_task", 1))
    return _train_source(Domain(**dom), ExperimentConfig(cfg_raw), Path(dest))


def _run_task(args) -> dict:
    spec, runs_dir = args
    return execute_run(spec, runs_dir)


# --------------------------------------------------------------------------------------------
# MMD² matrix
# --------------------------------------------------------------------------------------------
def _mmd_test(ref: np.ndarray, feats: np.ndarray, n_permutations: int, seed: int) -> tuple[float, float]:
    """MMD² and p-value with the median-heuristic bandwidth; when most feature rows coincide (dead
    ReLU features of a weak network) the median is 0, so the RMS pairwise distance is used instead."""
    from .errors import InputValueError as _IVE
    from .mmd import mmd2_test

    perms = max(1, n_permutations)
    try:
        res = mmd2_test(ref, feats, n_permutations=perms, seed=seed)
    except _IVE:
        z = np.concatenate([ref, feats]).astype(np.float64)
        ms = 2 * (z.var(axis=0).sum())  # mean squared pairwise distance
        if not ms > 0:
            return 0.0, 1.0  # identical samples
        res = mmd2_test(ref, feats, n_permutations=perms, seed=seed, sigma=float(np.sqrt(ms / 2)))
    return float(res.mmd2), (float(res.p_value) if n_permutations > 0 else float("nan"))


def compute_mmd_matrix(cfg: ExperimentConfig, domains: Sequence[Domain], packages: Mapping[str, str],
                       out: Path, *, progress: bool = False):
    """``M[s, t]`` with permutation p-values for every source ``s`` and every domain ``t``.

    Exactly what :func:`~neuroadda_rt.rank_sources` computes per target: ``mmd.n_tiles`` random
    tiles of ``t``'s target volume embedded by ``s``'s encoder (mean-pooled bottleneck, the
    package default), against ``s``'s reference features, by :func:`~neuroadda_rt.mmd2_test` with
    its median-heuristic bandwidth -- run on the PyTorch encoders so that no ONNX export is needed.
    Cached in ``mmd/mmd.json`` under a key of everything it depends on.
    """
    from .tiles import sample_tiles

    names = [d.name for d in domains if d.name in packages]
    targets = [d.name for d in domains]
    mm = cfg.raw["mmd"]
    seed = int(cfg.raw["seed"])
    key = hashlib.sha256(json.dumps({"mmd": mm, "tile": cfg.tile_size, "seed": seed,
                                     "pk": {n: _package_digest(packages[n]) for n in names},
                                     "dirs": [d.dir for d in domains]}, sort_keys=True).encode()).hexdigest()[:12]
    path = out / "mmd" / "mmd.json"
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            m = np.asarray(saved["mmd2"], dtype=np.float64)
            p = np.asarray([[np.nan if v is None else v for v in row] for row in saved["p_values"]])
            return saved["sources"], saved["targets"], m, p
    tiles = {d.name: sample_tiles(d.load("target_image"), int(mm["n_tiles"]), cfg.tile_size, seed=seed).tiles
             for d in domains}
    m = np.full((len(names), len(targets)), np.nan)
    p = np.full_like(m, np.nan)
    for i, sname in enumerate(names):
        net, meta, ref = load_source(packages[sname])
        fx = _feature_extractor(meta.get("package", net), meta.get("pooling", "mean"))
        for j, tname in enumerate(targets):
            feats = np.asarray(fx.features(tiles[tname]), dtype=np.float32)
            m[i, j], p[i, j] = _mmd_test(ref, feats, int(mm["n_permutations"]), seed)
    _atomic.write_json(path, {"key": key, "sources": names, "targets": targets, "mmd2": m.tolist(),
                              "p_values": [[_float_or_none(v) for v in row] for row in p.tolist()]})
    return names, targets, m, p


# --------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------
@dataclass
class ExperimentResult:
    """What :func:`run_experiment` produced (all of it is on disk under ``out``)."""

    out: Path
    table: Any                 # pandas DataFrame, one row per run
    n_runs: int
    n_skipped: int
    failures: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"ExperimentResult(out={str(self.out)!r}, runs={self.n_runs}, skipped={self.n_skipped}, "
                f"failures={len(self.failures)})")


def run_experiment(config, out=None, *, scheduler=None, workers: int | None = None, progress: bool = False,
                   dry_run: bool = False) -> ExperimentResult:
    """Run (or resume) a study and write its table, figures and summary.

    Parameters
    ----------
    config : path, dict or ExperimentConfig
        The study configuration (:func:`load_config`).
    out : path, optional
        Output folder (default ``experiments/<name>``). Re-running with the same folder resumes.
    scheduler : None, "synchronous", "threads", "processes" or a Dask scheduler address
        None: a local ``dask.distributed`` cluster with ``workers`` single-threaded processes;
        an address (``"tcp://host:8786"``): an existing cluster; ``"synchronous"``: in-process.
    workers : int, optional
        Local cluster size (default: the number of CPUs).
    progress : bool
        Progress bars.
    dry_run : bool
        Prepare the data, sources and MMD² matrix, plan the runs, and stop (nothing fine-tuned).

    Returns
    -------
    ExperimentResult

    Examples
    --------
    >>> res = run_experiment("examples/experiments/synthetic_small.yaml", "out/study")  # doctest: +SKIP
    >>> res.table.groupby(["target", "init_kind", "n"]).vi_total.mean()                   # doctest: +SKIP
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    out = Path(out) if out is not None else Path("experiments") / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    _atomic.write_json(out / "config.json", cfg.to_dict())
    t0 = time.perf_counter()

    # 1. data and sources
    domains, newick = prepare_domains(cfg, out)
    _atomic.write_json(out / "domains.json", [dataclasses.asdict(d) for d in domains])
    if newick:
        (out / "family.nwk").write_text(newick + "\n", encoding="utf-8")
    packages = _sources(cfg, domains, out, scheduler=scheduler, workers=workers, progress=progress)

    # 2. MMD² matrix and the atlas
    names, targets, m, p = compute_mmd_matrix(cfg, domains, packages, out, progress=progress)
    square = [targets.index(n) for n in names]
    atlas = None
    if len(names) >= 2:
        from .atlas import Atlas

        atlas = Atlas(names, m[:, square], p[:, square], settings={"mode": "zoo", **cfg.raw["mmd"]})
        atlas.to_json(out / "mmd" / "atlas.json")
    _write_mmd_tables(out, names, targets, m, p)

    # 3. runs
    specs = plan_runs(cfg, domains, packages, m, p, names, targets)
    _atomic.write_json(out / "plan.json", [s.to_dict() for s in specs])
    runs_dir = out / "runs"
    runs_dir.mkdir(exist_ok=True)
    todo = [s for s in specs if not (runs_dir / f"{s.run_id}.json").exists()]
    skipped = len(specs) - len(todo)
    log.info("%d runs planned, %d already finished", len(specs), skipped)
    failures = []
    if not dry_run:
        _, fails = _run_tasks(_run_task, [(s.to_dict(), str(runs_dir)) for s in todo], scheduler=scheduler,
                              workers=workers, progress=progress, desc="runs")
        failures = [{"run_id": item[0]["run_id"], "error": err} for item, err in fails]
        for f in failures:
            _atomic.write_json(out / "failed" / f"{f['run_id']}.json", f)

    # 4. table, 5. figures and summary
    table = assemble_table(out, [s.run_id for s in specs])
    summary = summarize(table)
    summary.update({"name": cfg.name, "n_planned": len(specs), "n_rows": int(len(table)), "n_skipped": skipped,
                    "n_failed": len(failures), "seconds": round(time.perf_counter() - t0, 1)})
    if atlas is not None:
        summary["atlas"] = {"leaves_order": atlas.leaves_order(),
                            "cophenetic_correlation": atlas.cophenetic_correlation}
        summary["phylogeny"] = _phylogeny(atlas, domains, newick, out)
    figures = make_figures(table, out / "figures", atlas=atlas)
    _atomic.write_json(out / "summary.json", summary)
    return ExperimentResult(out, table, len(specs), skipped, failures, figures, summary)


def _check_zoo_family(zoo_dir: Path, cfg: ExperimentConfig) -> None:
    """A zoo built on a synthetic family (its ``family.json``) must be reused with the same family:
    the domain names (syn00, ...) would match for any family seed, the styles would not."""
    syn = cfg.raw["domains"]["synthetic"]
    fam_file = zoo_dir / "family.json"
    if not syn or not fam_file.is_file():
        return
    fam = json.loads(fam_file.read_text(encoding="utf-8"))
    from .zoo_build import family_generator

    generator = family_generator(fam)
    want = (int(fam.get("n", -1)), int(fam.get("seed", -1)), generator["tree"], generator["traits"])
    got = (int(syn["n"]), int(syn.get("family_seed", cfg.raw["seed"])), str(syn.get("tree", "coalescent")),
           str(syn.get("traits", "morphology")))
    if want != got:
        raise InputValueError(f"sources.zoo {zoo_dir} was trained on domain_family(n={want[0]}, seed={want[1]}, "
                              f"tree={want[2]!r}, traits={want[3]!r}), but domains.synthetic asks for n={got[0]}, "
                              f"family_seed={got[1]}, tree={got[2]!r}, traits={got[3]!r}; set them to match")


def _sources(cfg: ExperimentConfig, domains: Sequence[Domain], out: Path, *, scheduler, workers, progress
             ) -> dict[str, str]:
    """Package path per domain: from the configured zoo, or trained (one task per domain)."""
    zoo = cfg.raw["sources"]["zoo"]
    packages: dict[str, str] = {}
    if zoo:
        if isinstance(zoo, Mapping):
            packages = {str(k): str(v) for k, v in zoo.items()}
        else:
            if str(zoo) == "default":
                from .package import default_zoo

                zp = Path(default_zoo().root)
            else:
                zp = Path(str(zoo))
            if not zp.is_dir():
                raise FileNotFoundError(f"sources.zoo: zoo folder not found: {zp}")
            _check_zoo_family(zp, cfg)
            packages = {p.name: str(p) for p in sorted(zp.iterdir()) if (p / "model.json").exists()}
        unknown = sorted(set(packages) - {d.name for d in domains})
        if unknown:
            log.warning("zoo models without a domain in this study are ignored: %s", unknown)
            packages = {k: v for k, v in packages.items() if k not in unknown}
        return packages
    src_dir = out / "sources" / cfg.digest("sources", "seed")
    todo = []
    for d in domains:
        if not Path(d.dir, "source_image.npy").exists():
            continue  # an unlabelled domain has no source model; it is still a target for the atlas
        dest = src_dir / _safe(d.name)
        packages[d.name] = str(dest)
        if not (dest / "source.json").exists():
            todo.append((dataclasses.asdict(d), cfg.raw, str(dest)))
    _, fails = _run_tasks(_train_source_task, todo, scheduler=scheduler, workers=workers, progress=progress,
                          desc="sources")
    if fails:
        raise RuntimeError("training a source model failed:\n" + "\n".join(err for _, err in fails))
    return packages


def _write_mmd_tables(out: Path, names, targets, m, p) -> None:
    pd = require("pandas", "report")
    rows = [{"source": s, "target": t, "mmd2": m[i, j], "p_value": p[i, j]}
            for i, s in enumerate(names) for j, t in enumerate(targets)]
    _atomic.write_bytes(out / "mmd" / "mmd2.csv", pd.DataFrame(rows).to_csv(index=False).encode())


def _phylogeny(atlas, domains, newick, out: Path) -> dict | None:
    """Compare the atlas with the generating tree (synthetic) or the species tree (real data)."""
    from .atlas import compare_to_phylogeny

    try:
        if newick and all(d.kind == "synthetic" for d in domains if d.name in atlas.names):
            from .atlas import _as_tree

            tips = {t.name for t in _as_tree(newick).tips()}
            if set(atlas.names) <= tips and len(atlas.names) >= 3:
                res = compare_to_phylogeny(atlas, newick, n_permutations=999)
            else:
                return None
        else:
            species = {d.name: d.organism for d in domains if d.name in atlas.names}
            if len(atlas.names) < 3 or any(v is None for v in species.values()):
                return None
            res = compare_to_phylogeny(atlas, species, n_permutations=999)
    except Exception as exc:  # the comparison is a bonus: never lose the study over it
        log.warning("phylogeny comparison skipped: %s", exc)
        return {"error": str(exc)}
    d = res.to_dict()
    _atomic.write_json(out / "mmd" / "phylogeny.json", d)
    return {k: d[k] for k in ("cophenetic_correlation", "mantel_r", "mantel_p", "n_permutations")}


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------
def assemble_table(out, run_ids: Iterable[str] | None = None):
    """Read every finished run's row into one DataFrame and write ``results.parquet`` and
    ``results.csv`` atomically. ``run_ids`` restricts the table to one plan's runs."""
    pd = require("pandas", "report")
    out = Path(out)
    runs_dir = out / "runs"
    files = sorted(runs_dir.glob("*.json")) if runs_dir.exists() else []
    if run_ids is not None:
        wanted = set(run_ids)
        files = [f for f in files if f.stem in wanted]
    rows = []
    for f in files:
        try:
            rows.append(json.loads(f.read_text(encoding="utf-8")))
        except ValueError as exc:  # rows are written atomically: an unreadable one is foreign
            log.warning("skipping unreadable row %s (%s)", f, exc)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(["target", "seed", "n", "strategy", "init"]).reset_index(drop=True)
    csv = table.to_csv(index=False).encode()
    _atomic.write_bytes(out / "results.csv", csv)
    with _atomic.atomic_path(out / "results.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    return table


# --------------------------------------------------------------------------------------------
# summary statistics
# --------------------------------------------------------------------------------------------
def _spearman(x, y) -> float:
    """Spearman's ρ; NaN (not a warning) for fewer than 2 points or constant input."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    return float((rx @ ry) / math.sqrt((rx @ rx) * (ry @ ry)))


def _nearest_n(table, n: int = 4) -> int | None:
    ns = sorted(set(int(v) for v in table["n"])) if len(table) else []
    if not ns:
        return None
    return min(ns, key=lambda v: (abs(v - n), v))


def _main_strategy(table) -> str | None:
    if not len(table):
        return None
    s = set(table["strategy"])
    return "median" if "median" in s else sorted(s)[0]


def summarize(table) -> dict:
    """Spearman ρ (MMD² rank vs fine-tuned VI) per target and pooled, VI reduction at n = 4, and
    how often the top-ranked source is the best fine-tuning start."""
    out: dict[str, Any] = {}
    if not len(table):
        return out
    n4 = _nearest_n(table)
    strat = _main_strategy(table)
    out["n_for_comparisons"] = n4
    out["strategy_for_comparisons"] = strat
    sub = table[(table.strategy == strat) & (table.n == n4)]
    src = sub[sub.init_kind == "source"]
    per_target = {}
    pooled_x, pooled_y = [], []
    top1 = []
    for t, g in src.groupby("target"):
        mean_vi = g.groupby("init").agg(vi=("vi_total", "mean"), rank=("source_rank", "first"))
        rho = _spearman(mean_vi["rank"], mean_vi["vi"])
        per_target[t] = {"spearman_rho": rho, "n_sources": int(len(mean_vi))}
        # pooled: ranks within each target, so targets with different VI scales can be pooled
        from scipy.stats import rankdata

        pooled_x += list(mean_vi["rank"].to_numpy(dtype=float))
        pooled_y += list(rankdata(mean_vi["vi"].to_numpy()))
        if len(mean_vi) > 1:  # with one source per target (finetune.sources: best) there is nothing to compare
            top1.append(bool(mean_vi["vi"].idxmin() == mean_vi["rank"].idxmin()))
    out["spearman"] = {"per_target": per_target, "pooled": _spearman(pooled_x, pooled_y)}
    out["top_ranked_is_best_finetune"] = float(np.mean(top1)) if top1 else None
    red = {}
    for t, g in sub.groupby("target"):
        best = g[g.is_best_source]
        scr = g[g.init == "scratch"]
        if len(best) and len(scr):
            m = best.merge(scr, on="seed", suffixes=("", "_scratch"))
            r = 100.0 * (m.vi_total_scratch - m.vi_total) / m.vi_total_scratch
            red[t] = {"mean_percent": float(r.mean()), "sd_percent": float(r.std(ddof=0)), "n_seeds": int(len(r)),
                      "vi_neuroadda": float(m.vi_total.mean()), "vi_scratch": float(m.vi_total_scratch.mean())}
    out["vi_reduction_vs_scratch"] = red
    if red:
        out["vi_reduction_mean_percent"] = float(np.mean([v["mean_percent"] for v in red.values()]))
    return out


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def _fig(n_panels: int, panel_w: float = 3.4, panel_h: float = 2.9):
    require("matplotlib", "report")
    from matplotlib.figure import Figure

    cols = min(max(n_panels, 1), 4)
    rows = max(1, math.ceil(max(n_panels, 1) / cols))
    fig = Figure(figsize=(panel_w * cols, panel_h * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    with _atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _empty(fig, axes, text: str):
    axes[0].set_visible(True)
    axes[0].text(0.5, 0.5, text, ha="center", va="center", transform=axes[0].transAxes)
    axes[0].set_axis_off()


def make_figures(table, fig_dir, *, atlas=None) -> list[Path]:
    """Write the study's figures (:data:`FIGURES`) to ``fig_dir``; panels without data say so."""
    fig_dir = Path(fig_dir)
    paths = []
    if atlas is not None:
        paths.append(fig_dir / "atlas.png")
        atlas.plot(paths[-1], title="Domain atlas: (MMD²[s,t] + MMD²[t,s]) / 2")
    paths.append(_save(_fig_vi_vs_n(table), fig_dir / "vi_vs_n.png"))
    paths.append(_save(_fig_rank_vs_vi(table), fig_dir / "mmd_rank_vs_vi.png"))
    paths.append(_save(_fig_strategies(table), fig_dir / "strategies_n4.png"))
    paths.append(_save(_fig_reduction(table), fig_dir / "vi_reduction_n4.png"))
    return paths


def _fig_vi_vs_n(table):
    targets = sorted(set(table["target"])) if len(table) else []
    fig, axes = _fig(len(targets))
    if not targets:
        _empty(fig, axes, "no finished runs")
        return fig
    strat = _main_strategy(table)
    for ax, t in zip(axes, targets):
        g = table[(table.target == t) & (table.strategy == strat)]
        curves = [("NeuroADDA (top-ranked source)", g[g.is_best_source], "C0"),
                  ("scratch", g[g.init == "scratch"], "C3"),
                  ("random source (mean over sources)", g[(g.init_kind == "source")], "C7")]
        for label, d, color in curves:
            if not len(d):
                continue
            if label.startswith("random"):
                if d.init.nunique() < 2:  # finetune.sources: best -- the "mean" would be the top source again
                    continue
                d = d.groupby(["n", "seed"], as_index=False).vi_total.mean()  # expectation over a random pick
            s = d.groupby("n").vi_total.agg(["mean", "min", "max"]).sort_index()
            x = s.index.to_numpy(dtype=float)
            ax.plot(x, s["mean"], "-o", color=color, label=label, ms=4)
            ax.fill_between(x, s["min"], s["max"], color=color, alpha=0.2, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(g.n)), [str(v) for v in sorted(set(g.n))])
        ax.set_title(f"target {t}")
        ax.set_xlabel("annotated tiles n")
        ax.set_ylabel("VI (held-out tiles)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"VI versus n ({strat} selection; band: min-max over seeds)")
    return fig


def _fig_rank_vs_vi(table):
    targets = sorted(set(table["target"])) if len(table) else []
    src = table[table.init_kind == "source"] if len(table) else table
    if targets and src.groupby("target").init.nunique().max() < 2:
        fig, axes = _fig(1)
        _empty(fig, axes, "one source per target (finetune.sources: best):\n"
                          "MMD² rank versus fine-tuned VI needs finetune.sources: all")
        return fig
    fig, axes = _fig(len(targets) + 1)
    if not targets:
        _empty(fig, axes, "no finished runs")
        return fig
    summ = summarize(table)
    n4, strat = summ["n_for_comparisons"], summ["strategy_for_comparisons"]
    sub = table[(table.n == n4) & (table.strategy == strat) & (table.init_kind == "source")]
    from scipy.stats import rankdata

    pooled_ax = axes[len(targets)]
    for k, (ax, t) in enumerate(zip(axes, targets)):
        g = sub[sub.target == t]
        if not len(g):
            ax.set_title(f"target {t}: no source runs")
            continue
        m = g.groupby("init").agg(vi=("vi_total", "mean"), lo=("vi_total", "min"), hi=("vi_total", "max"),
                                  rank=("source_rank", "first"))
        ax.errorbar(m["rank"], m["vi"], yerr=[m["vi"] - m["lo"], m["hi"] - m["vi"]], fmt="o", capsize=2)
        for name, r in m.iterrows():
            ax.annotate(str(name), (r["rank"], r["vi"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        rho = summ["spearman"]["per_target"].get(t, {}).get("spearman_rho", float("nan"))
        ax.set_xticks(sorted(set(int(v) for v in m["rank"])))
        ax.set_title(f"target {t}: Spearman ρ = {rho:.2f}")
        ax.set_xlabel("MMD² rank of the source (1 = closest)")
        ax.set_ylabel(f"fine-tuned VI (n = {n4})")
        pooled_ax.scatter(m["rank"], rankdata(m["vi"].to_numpy()), color=f"C{k % 10}", label=str(t))
    if len(sub):
        pooled_ax.set_xticks(sorted(set(int(v) for v in sub.source_rank.dropna())))
    pooled_ax.set_title(f"pooled: Spearman ρ = {summ['spearman']['pooled']:.2f}")
    pooled_ax.set_xlabel("MMD² rank of the source")
    pooled_ax.set_ylabel("VI rank within target")
    pooled_ax.legend(fontsize=6)
    fig.suptitle(f"Does MMD² predict transfer? ({strat} selection, n = {n4})")
    return fig


def _fig_strategies(table):
    targets = sorted(set(table["target"])) if len(table) else []
    fig, axes = _fig(1, panel_w=max(4.0, 1.2 * len(targets) + 2), panel_h=3.2)
    ax = axes[0]
    if not targets:
        _empty(fig, axes, "no finished runs")
        return fig
    n4 = _nearest_n(table)
    sub = table[(table.n == n4) & table.is_best_source]
    strategies = [s for s in STRATEGIES if s in set(sub.strategy)] + sorted(set(sub.strategy) - set(STRATEGIES))
    width = 0.8 / max(1, len(strategies))
    for k, s in enumerate(strategies):
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(targets):
            v = sub[(sub.target == t) & (sub.strategy == s)].vi_total
            if len(v):
                xs.append(i + (k - (len(strategies) - 1) / 2) * width)
                ys.append(v.mean())
                lo.append(v.mean() - v.min())
                hi.append(v.max() - v.mean())
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=s, color=f"C{k}")
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
    ax.set_ylabel("VI (held-out tiles)")
    ax.legend(fontsize=7, title="selection")
    ax.set_title(f"Selection strategies, top-ranked source, n = {n4}\n(bars: mean, whiskers: min-max over seeds)")
    return fig


def _fig_reduction(table):
    fig, axes = _fig(1, panel_w=5.0, panel_h=3.2)
    ax = axes[0]
    if not len(table):
        _empty(fig, axes, "no finished runs")
        return fig
    summ = summarize(table)
    red = summ.get("vi_reduction_vs_scratch", {})
    if not red:
        _empty(fig, axes, "no NeuroADDA/scratch pairs")
        return fig
    targets = sorted(red)
    means = [red[t]["mean_percent"] for t in targets]
    sds = [red[t]["sd_percent"] for t in targets]
    ax.bar(range(len(targets)), means, yerr=sds, capsize=3, color=["C2" if m > 0 else "C3" for m in means])
    ax.axhspan(25, 67, color="0.85", zorder=0, label="paper: 25-67%")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
    ax.set_ylabel("VI reduction vs scratch (%)")
    ax.legend(fontsize=7)
    ax.set_title(f"NeuroADDA vs scratch at n = {summ['n_for_comparisons']} "
                 f"(mean {summ.get('vi_reduction_mean_percent', float('nan')):.0f}%)")
    return fig
