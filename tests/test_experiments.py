"""The experiment runner on a CI-sized synthetic study: table shape, resume, failures, figures, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
pytest.importorskip("matplotlib")
pytest.importorskip("dask")

from neuroadda_rt.study import experiments as ex  # noqa: E402
from neuroadda_rt.study.experiments import execute, figures, tables  # noqa: E402
from neuroadda_rt.errors import InputValueError  # noqa: E402

SMALL = {
    "name": "ci-small",
    "seed": 0,
    "tile_size": 64,
    "domains": {"synthetic": {"n": 3, "family_seed": 0, "shape": [2, 128, 128]}},
    "sources": {"network": {"widths": [4, 8, 16]},
                "train": {"steps": 8, "lr": 0.003, "batch_size": 2, "patch_size": 64}},
    "mmd": {"n_tiles": 12, "n_permutations": 20},
    "finetune": {"n": [2, 4], "strategies": ["median"], "seeds": [0], "pool": 16,
                 "train": {"steps": 4, "lr": 0.001, "batch_size": 2, "patch_size": 64}},
    "evaluate": {"n_test": 2},
}
N_ROWS = 3 * (2 + 1) * 2 * 1 * 1   # targets x (other sources + scratch) x n x strategies x seeds

SETTING_COLUMNS = {"run_id", "target", "init", "init_kind", "tiles_from", "best_source", "is_best_source",
                   "source_rank", "mmd2", "mmd2_p", "n", "strategy", "seed", "tile_size", "pool", "n_test",
                   "train_steps", "train_lr", "train_batch_size", "train_patch_size", "tile_coords"}
METRIC_COLUMNS = {"vi_total", "vi_split", "vi_merge", "adapted_rand_error", "threshold"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path_factory.mktemp("study")
    res = ex.run_experiment(SMALL, out, scheduler="synchronous")
    return out, res


def test_table_has_one_row_per_run_and_every_setting(study):
    out, res = study
    assert not res.failures
    t = res.table
    assert len(t) == N_ROWS == res.n_runs
    assert SETTING_COLUMNS | METRIC_COLUMNS <= set(t.columns)
    assert t.run_id.is_unique
    # leave-one-out: a target is never fine-tuned from its own source
    assert not (t.init == t.target).any()
    counts = t.groupby("target").init.nunique()
    assert (counts == 3).all()  # two other sources + scratch
    # the scratch run uses the top-ranked source's tiles; each source run its own
    scratch = t[t.init == "scratch"]
    assert (scratch.tiles_from == scratch.best_source).all()
    src = t[t.init_kind == "source"]
    assert (src.tiles_from == src.init).all()
    assert set(src.source_rank) == {1, 2}
    assert (src[src.source_rank == 1].init == src[src.source_rank == 1].best_source).all()
    # the number of annotated tiles is what the row says
    assert all(len(json.loads(c)) == n for c, n in zip(t.tile_coords, t.n))
    assert np.isfinite(t.vi_total).all() and (t.vi_total >= 0).all()
    assert ((t.adapted_rand_error >= 0) & (t.adapted_rand_error <= 1)).all()
    # Parquet and CSV hold the same table
    pq = pd.read_parquet(out / "results.parquet")
    csv = pd.read_csv(out / "results.csv")
    assert len(pq) == len(csv) == N_ROWS
    assert list(pq.columns) == list(t.columns)
    np.testing.assert_allclose(pq.vi_total.to_numpy(), csv.vi_total.to_numpy(), rtol=1e-12)


def test_mmd_matrix_and_atlas_written(study):
    out, res = study
    m = pd.read_csv(out / "mmd" / "mmd2.csv")
    assert len(m) == 9 and set(m.columns) == {"source", "target", "mmd2", "p_value"}
    assert m.p_value.between(0, 1).all()
    atlas = json.loads((out / "mmd" / "atlas.json").read_text())
    assert len(atlas["names"]) == 3
    # the rows' MMD² are the matrix entries of (source, target)
    t = res.table[res.table.init_kind == "source"]
    for _, r in t.iterrows():
        want = m[(m.source == r.init) & (m.target == r.target)].mmd2.iloc[0]
        assert r.mmd2 == pytest.approx(want)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_rows"] == N_ROWS and summary["n_for_comparisons"] == 4
    assert "phylogeny" in summary


def test_every_figure_is_written(study):
    out, res = study
    for name in ex.FIGURES:
        p = out / "figures" / name
        assert p.exists(), name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 5000
    assert not list((out / "figures").glob("*.tmp"))


def test_resume_skips_finished_runs_and_reruns_failed_ones(study, monkeypatch):
    out, res = study
    before = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert len(before) == N_ROWS
    # 1. a restart does no work
    again = ex.run_experiment(SMALL, out, scheduler="synchronous")
    assert again.n_skipped == N_ROWS and not again.failures
    assert {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")} == before
    # 2. runs interrupted mid-way (evaluation raises) leave no row and are retried on the next start
    victims = sorted(before)[:2]
    for v in victims:
        (out / "runs" / v).unlink()
    import neuroadda_rt.evaluation as evaluation

    def broken(*a, **k):
        raise RuntimeError("simulated crash during evaluation")

    monkeypatch.setattr(evaluation, "score_segmentation", broken)
    crashed = ex.run_experiment(SMALL, out, scheduler="synchronous")
    assert len(crashed.failures) == 2 and crashed.n_skipped == N_ROWS - 2
    assert len(crashed.table) == N_ROWS - 2
    assert not any((out / "runs" / v).exists() for v in victims)
    assert not list((out / "runs").glob("*.tmp"))
    monkeypatch.undo()
    healed = ex.run_experiment(SMALL, out, scheduler="synchronous")
    assert not healed.failures and healed.n_skipped == N_ROWS - 2
    assert len(healed.table) == N_ROWS
    # deterministic on the CPU: the recomputed rows equal the originals (apart from timings)
    for v in victims:
        old, new = json.loads(before[v]), json.loads((out / "runs" / v).read_text())
        for k in ("vi_total", "vi_split", "vi_merge", "adapted_rand_error", "tile_coords"):
            assert old[k] == new[k], k


def test_cli_resumes_the_study(study, tmp_path, capsys):
    from neuroadda_rt.cli import main

    out, _ = study
    cfg = tmp_path / "study.json"
    cfg.write_text(json.dumps(SMALL))
    assert main(["experiment", str(cfg), "--out", str(out), "--scheduler", "synchronous", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == N_ROWS and report["skipped"] == N_ROWS and report["failures"] == []
    assert main(["experiment", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_yaml_config_and_validation(tmp_path):
    yaml = pytest.importorskip("yaml")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(SMALL))
    cfg = ex.load_config(p)
    assert cfg.ns == [2, 4] and cfg.strategies == ["median"] and cfg.tile_size == 64
    assert cfg.raw["finetune"]["scratch"] is True  # defaults filled in
    with pytest.raises(InputValueError, match="unknown configuration key 'finetune.nn'"):
        ex.load_config({**SMALL, "finetune": {"nn": [1]}})
    with pytest.raises(InputValueError, match="strategies"):
        ex.load_config({**SMALL, "finetune": {"strategies": ["oracle"]}})
    with pytest.raises(InputValueError, match="pool"):
        ex.load_config({**SMALL, "finetune": {"n": [32], "pool": 16}})
    with pytest.raises(InputValueError, match="domains"):
        ex.load_config({"name": "x"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(Exception, match="YAML"):
        ex.load_config(bad)


def test_example_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples" / "experiments"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        ex.load_config(f)


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=7), rng.normal(size=7)
        y[2] = y[4]  # ties
        assert tables._spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(tables._spearman([1, 1, 1], [1, 2, 3]))
    assert np.isnan(tables._spearman([1], [2]))


def test_summary_on_a_hand_made_table():
    rows = []
    # target A: sources ranked s1 < s2 < s3; VI follows the rank; scratch VI 2.0 -> 50% reduction
    for seed in (0, 1):
        for rank, (src, vi) in enumerate([("s1", 1.0), ("s2", 1.5), ("s3", 1.8)], start=1):
            rows.append(dict(target="A", init=src, init_kind="source", is_best_source=rank == 1, source_rank=rank,
                             n=4, strategy="median", seed=seed, vi_total=vi + 0.01 * seed))
        rows.append(dict(target="A", init="scratch", init_kind="scratch", is_best_source=False, source_rank=None,
                         n=4, strategy="median", seed=seed, vi_total=2.0 + 0.02 * seed))
    s = ex.summarize(pd.DataFrame(rows))
    assert s["spearman"]["per_target"]["A"]["spearman_rho"] == pytest.approx(1.0)
    assert s["top_ranked_is_best_finetune"] == 1.0
    # one source per target (finetune.sources: best): no comparison, so no claim
    only_best = pd.DataFrame([r for r in rows if r["source_rank"] in (1, None)])
    assert ex.summarize(only_best)["top_ranked_is_best_finetune"] is None
    # ... and no "random source" curve that would only redraw the top-ranked source
    labels = {ln.get_label() for ax in figures._fig_vi_vs_n(only_best).axes for ln in ax.get_lines()}
    assert labels == {"NeuroADDA (top-ranked source)", "scratch"}
    labels = {ln.get_label() for ax in figures._fig_vi_vs_n(pd.DataFrame(rows)).axes for ln in ax.get_lines()}
    assert "random source (mean over sources)" in labels
    texts = [t.get_text() for ax in figures._fig_rank_vs_vi(only_best).axes for t in ax.texts]
    assert any("needs finetune.sources: all" in t for t in texts)
    red = s["vi_reduction_vs_scratch"]["A"]
    want = np.mean([100 * (2.0 - 1.0) / 2.0, 100 * (2.02 - 1.01) / 2.02])
    assert red["mean_percent"] == pytest.approx(want)
    paths = ex.make_figures(pd.DataFrame(rows), __import__("tempfile").mkdtemp())
    assert len(paths) == len(ex.FIGURES) - 1  # no atlas given


def test_local_dask_cluster_runs_one_task_per_item_and_reports_failures():
    pytest.importorskip("distributed")
    results, failures = execute._run_tasks(int, ["1", "2", "x"], scheduler=None, workers=1, progress=False, desc="t")
    assert sorted(results) == [1, 2]
    assert len(failures) == 1 and failures[0][0] == "x" and "ValueError" in failures[0][1]


def test_reusing_a_zoo_of_model_packages(tmp_path):
    """sources.zoo maps domains to existing packages (here three copies of the tiny test model):
    no source is trained, the MMD² matrix uses each package with its own intensity rule."""
    from pathlib import Path

    tiny = Path(__file__).resolve().parent / "assets" / "tiny_model"
    if not (tiny / "model.json").exists():
        pytest.skip("tests/assets/tiny_model is missing (tools/make_test_assets.py writes it)")
    cfg = {**SMALL, "sources": {"zoo": {f"syn0{i}": str(tiny) for i in range(3)}},
           "finetune": {**SMALL["finetune"], "n": [2], "sources": "best", "scratch": False}}
    res = ex.run_experiment(cfg, tmp_path, scheduler="synchronous")
    assert not res.failures and not (tmp_path / "sources").exists()
    m = pd.read_csv(tmp_path / "mmd" / "mmd2.csv")
    # the same network for every source: each target column is constant over the sources
    for _, g in m.groupby("target"):
        assert np.ptp(g.mmd2.to_numpy()) < 1e-9
    assert len(res.table) == 3 and (res.table.init_kind == "source").all()  # the best source per target


def test_a_domain_without_a_source_is_a_target_and_finetune_targets_restricts_runs(tmp_path):
    """Reusing a zoo that lacks a domain's source (a zoo's held-out domain): that domain is still a
    target, ranked against every source; ``finetune.targets`` keeps only the named targets' runs."""
    from pathlib import Path

    tiny = Path(__file__).resolve().parent / "assets" / "tiny_model"
    if not (tiny / "model.json").exists():
        pytest.skip("tests/assets/tiny_model is missing (tools/make_test_assets.py writes it)")
    cfg = {**SMALL, "sources": {"zoo": {"syn00": str(tiny), "syn01": str(tiny)}},
           "finetune": {**SMALL["finetune"], "n": [2], "sources": "all", "scratch": True, "targets": ["syn02"]}}
    res = ex.run_experiment(cfg, tmp_path, scheduler="synchronous")
    assert not res.failures
    m = pd.read_csv(tmp_path / "mmd" / "mmd2.csv")
    assert set(m.target) == {"syn00", "syn01", "syn02"} and set(m.source) == {"syn00", "syn01"}
    # syn02 only: both sources and scratch, n = 2, one strategy, one seed
    assert set(res.table.target) == {"syn02"}
    assert sorted(res.table.init) == ["scratch", "syn00", "syn01"]
    with pytest.raises(InputValueError, match="unknown domains"):
        ex.run_experiment({**cfg, "finetune": {**cfg["finetune"], "targets": ["nope"]}}, tmp_path / "b",
                          scheduler="synchronous")
    with pytest.raises(InputValueError, match="list of domain names"):
        ex.load_config({**cfg, "finetune": {**cfg["finetune"], "targets": "syn02"}})


def test_reusing_a_zoo_of_another_synthetic_family_is_refused(tmp_path):
    """The bundled synthetic zoo ("default", also "synthetic") was trained on family.json's family; a study over another family
    would match its domain names (syn00, ...) but not its styles, so it is refused before any run."""
    from neuroadda_rt import synthetic_zoo

    fam = json.loads((synthetic_zoo().root / "family.json").read_text())
    cfg = {**SMALL, "sources": {"zoo": "default"}}  # SMALL: 3 domains of family seed 0
    with pytest.raises(InputValueError, match=rf"n={fam['n']}, seed={fam['seed']}.*n=3, family_seed=0"):
        ex.run_experiment(cfg, tmp_path, scheduler="synchronous")
    assert not (tmp_path / "runs").exists()


def test_zoo_family_generator_must_match(tmp_path):
    """Same (n, seed) but another generator (tree model / drifting traits) is another family. A
    family.json without them was written by the Yule, all-traits generator."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "family.json").write_text(json.dumps({"n": 3, "seed": 0}))
    cfg = ex.load_config({**SMALL, "sources": {"zoo": str(zoo)}})
    with pytest.raises(InputValueError, match="tree='yule', traits='all'.*tree='coalescent'"):
        execute._check_zoo_family(zoo, cfg)
    legacy = {**SMALL["domains"]["synthetic"], "tree": "yule", "traits": "all"}
    execute._check_zoo_family(zoo, ex.load_config({**SMALL, "domains": {"synthetic": legacy}}))  # accepted
    with pytest.raises(InputValueError, match="unknown keys"):
        ex.load_config({**SMALL, "domains": {"synthetic": {**legacy, "trees": "yule"}}})
    with pytest.raises(InputValueError, match=r"domains.synthetic.tree in \('coalescent', 'yule'\), got 'upgma'"):
        ex.load_config({**SMALL, "domains": {"synthetic": {**legacy, "tree": "upgma"}}})


@pytest.mark.realdata
@pytest.mark.slow
def test_real_manifests_labelled_and_unlabelled(em_data, tmp_path):
    """Two labelled public sets and one unlabelled one: the unlabelled set gets no source and no
    runs, but it is a column of the MMD² matrix (a target to place among the known domains)."""
    from pathlib import Path

    manifests = Path(__file__).resolve().parents[1] / "examples" / "datasets"
    cfg = {"name": "real-ci", "tile_size": 64,
           "domains": {"datasets": [str(manifests / "isbi2012.json"), str(manifests / "gala_fibsem.json"),
                                    str(manifests / "kasthuri_cortex.json")], "data_root": str(em_data)},
           "sources": {"network": {"widths": [4, 8]}, "train": {"steps": 2, "batch_size": 2, "patch_size": 64}},
           "mmd": {"n_tiles": 8, "n_permutations": 10},
           "finetune": {"n": [1], "strategies": ["median"], "seeds": [0], "pool": 4,
                        "train": {"steps": 2, "batch_size": 2, "patch_size": 64}},
           "evaluate": {"n_test": 1}}
    res = ex.run_experiment(cfg, tmp_path, scheduler="synchronous")
    assert not res.failures
    m = pd.read_csv(tmp_path / "mmd" / "mmd2.csv")
    assert set(m.source) == {"isbi2012", "gala_fibsem"}
    assert set(m.target) == {"isbi2012", "gala_fibsem", "kasthuri_cortex"}
    assert set(res.table.target) == {"isbi2012", "gala_fibsem"} and len(res.table) == 4
    assert set(res.table.init) == {"isbi2012", "gala_fibsem", "scratch"}


def test_cli_data_root_reaches_the_manifests(tmp_path, monkeypatch):
    # Issue 19/15: `experiment --data-root DIR` is documented but was not accepted.
    from neuroadda_rt.cli import main
    from neuroadda_rt.io import write_volume

    monkeypatch.delenv("NEUROADDA_DATA", raising=False)
    data = tmp_path / "data"
    write_volume(data / "v.h5:raw", np.zeros((4, 16, 16), np.uint8))
    (tmp_path / "m.json").write_text(json.dumps({"name": "toy", "image": "v.h5:raw", "labels": None}))
    cfg = {"name": "dr", "domains": {"datasets": [str(tmp_path / "m.json")]}}
    assert ex.load_config(cfg, data_root=data).raw["domains"]["data_root"] == str(data)
    assert ex.load_config(cfg).raw["domains"]["data_root"] is None
    with pytest.raises(InputValueError):  # no domains: the defaults' dict must not keep the root
        ex.load_config({"name": "x"}, data_root=data)
    assert ex.config._DEFAULTS["domains"]["data_root"] is None
    seen = {}

    def fake_run(config, out, **kw):
        seen["root"] = config.raw["domains"]["data_root"]
        from neuroadda_rt.study.experiments.plan import _prepare_dataset
        seen["dom"] = _prepare_dataset(config.raw["domains"]["datasets"][0], config, tmp_path / "out")
        raise SystemExit(0)

    monkeypatch.setattr(ex, "run_experiment", fake_run)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        main(["experiment", str(tmp_path / "c.json"), "--data-root", str(data), "--out", str(tmp_path / "out")])
    assert seen["root"] == str(data) and seen["dom"].name == "toy"
    assert np.load(seen["dom"].path("target_image")).shape == (4, 16, 16)


@pytest.mark.parametrize("flags, expected", [(["--json"], True), (["--json", "--no-progress"], False), ([], True)])
def test_cli_json_keeps_progress_on_stderr(tmp_path, monkeypatch, flags, expected):
    # Issue 19/15: `--json` silenced all progress, so a 30-minute run printed nothing until the end. Progress
    # bars go to stderr and do not mix with the JSON on stdout; only --no-progress hides them.
    from neuroadda_rt.cli import main

    seen = {}

    def fake_run(config, out, **kw):
        seen["progress"] = kw["progress"]
        raise SystemExit(0)

    monkeypatch.setattr(ex, "run_experiment", fake_run)
    (tmp_path / "c.json").write_text(json.dumps({"name": "p"}))
    with pytest.raises(SystemExit):
        main(["experiment", str(tmp_path / "c.json"), "--out", str(tmp_path / "out"), *flags])
    assert seen["progress"] is expected
