"""The paper's study as one reproducible command: sources, MMD² matrix, leave-one-out fine-tuning.

:func:`run_experiment` (CLI: ``neuroadda-rt experiment CONFIG``) runs, over a set of domains
(a synthetic family, real datasets through their manifests, or both):

1. **sources** -- one source model per domain, trained with the same recipe for every domain
   and written as an ordinary model package (or taken from an existing zoo);
2. **MMD² matrix** -- ``M[s, t]``: :func:`~neuroadda_rt.rank_sources` of source ``s`` on target
   ``t`` (MMD² and permutation p-value); saved with its :class:`~neuroadda_rt.atlas.Atlas` and
   the atlas figure;
3. **runs** -- leave-one-out: for every labelled target, every other domain's source and a network
   trained from scratch, for every ``n`` (tiles annotated), selection strategy and seed: select
   ``n`` tiles of the target with the tiles' source model (:func:`~neuroadda_rt.select_tiles`),
   fine-tune (or train from scratch on the tiles the top-ranked source chose), and evaluate VI and
   adapted Rand error on held-out tiles (:func:`~neuroadda_rt.evaluate`);
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
import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ... import _atomic
from ..._digest import json_sha256
from ...atlas import Atlas, compare_to_phylogeny
from ..._dask import dask_client
from ...errors import InputValueError, require
from ...evaluation import METRICS, evaluate
from ...models import UNet
from ...package import FORMAT, ModelPackage, load_model, synthetic_zoo
from ...ranking import rank_sources
from ...selection import select_tiles
from ...tiles import extract_tiles, grid_tiles, sample_tiles
from ...training import TrainRecipe, finetune, train_and_package, train_from_scratch
from ..zoo_build import family_generator
from .config import ExperimentConfig, load_config, safe_name, train_settings
from .figures import make_figures
from .plan import Domain, package_digest, float_or_none, plan_runs, prepare_domains
from .tables import RESULTS_FORMAT, assemble_table, summarize, write_mmd_tables

log = logging.getLogger("neuroadda_rt")


# --------------------------------------------------------------------------------------------
# sources: ordinary model packages, one folder of them is a Zoo
# --------------------------------------------------------------------------------------------
#: The sources' format: the study trains and reads ordinary model packages.
SOURCE_FORMAT = FORMAT


def load_source(path) -> ModelPackage:
    """A study source: the model package at ``path`` (verified, :func:`~neuroadda_rt.load_model`)."""
    return load_model(path)


def _set_threads(n: int) -> None:
    torch = require("torch", "torch")
    torch.set_num_threads(max(1, int(n)))


def _train_source(dom: Domain, cfg: ExperimentConfig, dest: Path) -> str:
    """Train the source model of ``dom`` and write it as a model package at ``dest``.

    The same recipe for every domain: a fresh :class:`~neuroadda_rt.models.UNet` of
    ``sources.network`` (initialised from ``torch.manual_seed(seed)``) trained on the domain's
    source volume with ``sources.train`` by :func:`~neuroadda_rt.training.train_and_package`. Its
    reference features come from ``mmd.n_tiles`` random source tiles, its threshold is tuned on
    (at most 16 of) the same tiles: whole slices would cost minutes. Resumable through its
    training checkpoint.
    """
    torch = require("torch", "torch")
    src = cfg.raw["sources"]
    seed = int(cfg.raw["seed"])
    images = dom.load("source_image", mmap=False)
    labels = dom.load("source_labels", mmap=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNet(**dict(src["network"]))
    recipe = TrainRecipe(seed=seed, **train_settings(src["train"]))
    sample = sample_tiles(images, int(cfg.raw["mmd"]["n_tiles"]), cfg.tile_size, seed=seed)
    k = min(16, len(sample.tiles))
    ckpt = dest.parent / (dest.name + ".ckpt")
    train_and_package(
        net, images, labels, recipe=recipe, out=dest, name=dom.name, organism=dom.organism,
        training={"data": f"experiment domain {dom.name}: its source volume, every slice", "mode": "study source"},
        reference_tiles=sample.tiles,
        reference_info={"tile_size": cfg.tile_size, "seed": seed, "source": f"{len(sample.tiles)} random source tiles"},
        threshold_images=sample.tiles[:k], threshold_labels=extract_tiles(labels, sample.coords[:k], cfg.tile_size),
        checkpoint_dir=ckpt, desc=f"source {dom.name}", overwrite=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    return str(dest)


def _train_source_task(args) -> str:
    dom, cfg_raw, dest = args
    _set_threads(cfg_raw.get("threads_per_task", 1))
    return _train_source(Domain(**dom), ExperimentConfig(cfg_raw), Path(dest))


def _check_zoo_family(zoo_dir: Path, cfg: ExperimentConfig) -> None:
    """A zoo built on a synthetic family (its ``family.json``) must be reused with the same family:
    the domain names (syn00, ...) would match for any family seed, the styles would not."""
    syn = cfg.raw["domains"]["synthetic"]
    fam_file = zoo_dir / "family.json"
    if not syn or not fam_file.is_file():
        return
    fam = json.loads(fam_file.read_text(encoding="utf-8"))
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
            if str(zoo) in ("default", "synthetic"):  # the bundled synthetic zoo (its family.json)
                zp = Path(synthetic_zoo().root)
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
        dest = src_dir / safe_name(d.name)
        packages[d.name] = str(dest)
        if not (dest / "model.json").exists():
            todo.append((dataclasses.asdict(d), cfg.raw, str(dest)))
    _, fails = _run_tasks(_train_source_task, todo, scheduler=scheduler, workers=workers, progress=progress,
                          desc="sources")
    if fails:
        raise RuntimeError("training a source model failed:\n" + "\n".join(err for _, err in fails))
    return packages



# --------------------------------------------------------------------------------------------
# MMD² matrix
# --------------------------------------------------------------------------------------------
def compute_mmd_matrix(cfg: ExperimentConfig, domains: Sequence[Domain], packages: Mapping[str, str],
                       out: Path, *, progress: bool = False):
    """``M[s, t]`` with permutation p-values for every source ``s`` and every domain ``t``.

    Each entry is :func:`~neuroadda_rt.rank_sources` itself (``mmd.n_tiles`` random tiles of
    ``t``'s target volume, ``mmd.n_permutations``, the study's seed and tile size): the package's
    own intensity rule, feature level and pooling, standardised features, ONNX Runtime -- what a
    user's ranking computes. Cached in ``mmd/mmd.json`` under a key of everything it depends on.
    """
    names = [d.name for d in domains if d.name in packages]
    targets = [d.name for d in domains]
    mm = cfg.raw["mmd"]
    seed = int(cfg.raw["seed"])
    key = json_sha256({"mmd": mm, "tile": cfg.tile_size, "seed": seed,
                       "pk": {n: package_digest(packages[n]) for n in names},
                       "dirs": [d.dir for d in domains]})[:12]
    path = out / "mmd" / "mmd.json"
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            m = np.asarray(saved["mmd2"], dtype=np.float64)
            p = np.asarray([[np.nan if v is None else v for v in row] for row in saved["p_values"]])
            return saved["sources"], saved["targets"], m, p
    sources = [load_source(packages[n]) for n in names]
    m = np.full((len(names), len(targets)), np.nan)
    p = np.full_like(m, np.nan)
    for j, dom in enumerate(domains):
        volume = dom.load("target_image")
        # one source per call: copies of one package under several domain names stay apart
        for i, pkg in enumerate(sources):
            ranked = rank_sources(volume, [pkg], n_tiles=int(mm["n_tiles"]), tile_size=cfg.tile_size, seed=seed,
                                  n_permutations=int(mm["n_permutations"]), cache_dir=False, progress=progress,
                                  backend="onnxruntime", device="cpu")[0]
            m[i, j], p[i, j] = ranked.mmd2, ranked.p_value
    _atomic.write_json(path, {"key": key, "sources": names, "targets": targets, "mmd2": m.tolist(),
                              "p_values": [[float_or_none(v) for v in row] for row in p.tolist()]})
    return names, targets, m, p


def _phylogeny(atlas: Atlas, domains: Sequence[Domain], newick: str | None, out: Path) -> dict | None:
    """Compare the atlas with the generating tree (synthetic) or the species tree (real data)."""
    try:
        if newick and all(d.kind == "synthetic" for d in domains if d.name in atlas.names):
            # the generator's tree has every synthetic domain as a tip
            if len(atlas.names) < 3:
                return None
            res = compare_to_phylogeny(atlas, newick, n_permutations=999)
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
# one run (executed on a worker)
# --------------------------------------------------------------------------------------------
def execute_run(spec: dict, runs_dir: str) -> dict:
    """Run one fine-tuning (or scratch) run and write its row atomically to ``runs_dir``.

    The product's own calls: :func:`~neuroadda_rt.select_tiles` with the selector source,
    :func:`~neuroadda_rt.finetune` (or :func:`~neuroadda_rt.train_from_scratch` on the selector's
    architecture) on those tiles, :func:`~neuroadda_rt.evaluate` on the held-out tiles with the
    threshold the training tuned. Returns the row; skips the work when the row already exists.
    """
    row_path = Path(runs_dir) / f"{spec['run_id']}.json"
    if row_path.exists():
        return json.loads(row_path.read_text(encoding="utf-8"))
    s = spec["settings"]
    _set_threads(s.get("threads", 1))
    t_start = time.perf_counter()
    tdir = Path(spec["target_dir"])
    target = np.load(tdir / "target_image.npy", mmap_mode="r")
    target_labels = np.load(tdir / "target_labels.npy", mmap_mode="r")
    test_images, test_labels, _ = _held_out(tdir, s["tile_size"], s["n_test"])

    # tiles chosen by the selector source's uncertainty (source-free)
    selector = load_source(spec["selector_package"])
    sel = select_tiles(target, selector, spec["n"], strategy=spec["strategy"], pool=s["pool"],
                       tile_size=s["tile_size"], seed=spec["seed"], backend="onnxruntime", device="cpu")
    coords = np.asarray(sel.coords, dtype=np.int64)
    labels = extract_tiles(target_labels, coords, s["tile_size"])

    # fine-tune the source, or train its architecture from a fresh seeded initialisation: the same recipe
    work = Path(runs_dir).parent / "work" / spec["run_id"]
    t0 = time.perf_counter()
    # plain fine-tuning (mix=1): the study's recipe and run digests predate finetune's WiSE-FT default, and its
    # published results (docs/results.md §1-2) were made this way
    train = partial(finetune, load_source(spec["source_package"]), mix=1.0) if spec["init"] != "scratch" else \
        partial(train_from_scratch, selector)
    model = train(sel.tiles, labels, seed=spec["seed"], checkpoint_dir=work / "checkpoint", out=work / "model",
                  overwrite=True, **s["train"])
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ev = evaluate(model, test_images, test_labels, backend="onnxruntime", device="cpu")
    eval_s = time.perf_counter() - t0
    if s.get("keep_models"):
        model.save(Path(runs_dir).parent / "models" / spec["run_id"], overwrite=True)
    row = {
        "run_id": spec["run_id"], "target": spec["target"], "init": spec["init"],
        "init_kind": "scratch" if spec["init"] == "scratch" else "source",
        "tiles_from": spec["tiles_from"], "best_source": spec["best_source"],
        "is_best_source": spec["init"] == spec["best_source"],
        "source_rank": spec["source_rank"], "mmd2": spec["mmd2"], "mmd2_p": spec["mmd2_p"],
        "n": spec["n"], "strategy": spec["strategy"], "seed": spec["seed"],
        **{m: float(ev.overall[m]) for m in METRICS},
        "threshold": float(ev.threshold), "threshold_source": "tuned on the annotated tiles",
        "n_test": int(len(test_images)),
        "tile_size": s["tile_size"], "pool": s["pool"],
        **{f"train_{k}": v for k, v in s["train"].items()},
        "tile_coords": json.dumps(coords.tolist()),
        "final_loss": float(np.mean(model.history.loss[-3:])) if model.history.loss else None,
        "train_seconds": round(train_s, 3), "eval_seconds": round(eval_s, 3),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _atomic.write_json(row_path, row)
    shutil.rmtree(work, ignore_errors=True)
    return row


def _held_out(tdir: Path, size: int, n_test: int):
    """The held-out evaluation tiles: a fixed grid over the test volume (the same for every run)."""
    img = np.load(tdir / "test_image.npy", mmap_mode="r")
    lab = np.load(tdir / "test_labels.npy", mmap_mode="r")
    coords = np.asarray(grid_tiles(img.shape, size), dtype=np.int64)
    if len(coords) > n_test:
        # evenly spread over the grid, deterministic
        coords = coords[np.linspace(0, len(coords) - 1, n_test).round().astype(int)]
    return extract_tiles(img, coords, size), extract_tiles(lab, coords, size), coords



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
        sched = "synchronous" if scheduler == "sync" else scheduler
        tasks = [dask.delayed(guarded, pure=False)(it) for it in items]
        outs = dask.compute(*tasks, scheduler=sched, **({"num_workers": workers} if workers and
                                                          sched != "synchronous" else {}))
        for it, (status, value) in zip(items, outs):
            (results if status == "ok" else failures).append(value if status == "ok" else (it, value))
        return results, failures

    distributed = require("distributed", "dask")
    with dask_client(scheduler, workers) as client:
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
    return results, failures


def _run_task(args) -> dict:
    spec, runs_dir = args
    return execute_run(spec, runs_dir)


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
        atlas = Atlas(names, m[:, square], p[:, square], settings={"mode": "zoo", **cfg.raw["mmd"]})
        atlas.to_json(out / "mmd" / "atlas.json")
    write_mmd_tables(out, names, targets, m, p)

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
    summary.update({"format": RESULTS_FORMAT, "name": cfg.name, "n_planned": len(specs), "n_rows": int(len(table)), "n_skipped": skipped,
                    "n_failed": len(failures), "seconds": round(time.perf_counter() - t0, 1)})
    if atlas is not None:
        summary["atlas"] = {"leaves_order": atlas.leaves_order(),
                            "cophenetic_correlation": atlas.cophenetic_correlation}
        summary["phylogeny"] = _phylogeny(atlas, domains, newick, out)
    figures = make_figures(table, out / "figures", atlas=atlas)
    _atomic.write_json(out / "summary.json", summary)
    return ExperimentResult(out, table, len(specs), skipped, failures, figures, summary)
