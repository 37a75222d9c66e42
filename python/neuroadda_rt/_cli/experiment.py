"""``neuroadda-rt experiment CONFIG``: run (or resume) the paper's study over a set of domains."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment", help="run or resume a study: sources, MMD² matrix, leave-one-out fine-tuning, table, figures",
        description="Train one source per domain (or reuse a zoo), compute the asymmetric MMD² matrix, fine-tune "
                    "every target from every other source and from scratch for each n, strategy and seed, and "
                    "write results.parquet/.csv, figures/ and summary.json. Re-running resumes: finished runs "
                    "are skipped.")
    p.add_argument("config", help="study configuration (YAML or JSON; see examples/experiments/)")
    p.add_argument("--out", default=None, help="output folder (default: experiments/<name>)")
    p.add_argument("--scheduler", default=None,
                   help="Dask scheduler address (tcp://host:8786) to run on an existing cluster; 'synchronous' "
                        "runs in this process; default: a local cluster")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder the dataset manifests' relative paths point into (overrides the config's "
                        "domains.data_root; default: $NEUROADDA_DATA)")
    p.add_argument("--workers", type=int, default=None, help="local cluster size (default: number of CPUs)")
    p.add_argument("--dry-run", action="store_true",
                   help="prepare data, sources and the MMD² matrix, plan the runs, and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr, also with --json)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ._common import print_json
    from ..study.experiments import load_config, run_experiment

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"expected --workers >= 1, got {args.workers}")
    config = load_config(args.config, data_root=args.data_root) if args.data_root is not None else args.config
    res = run_experiment(config, args.out, scheduler=args.scheduler, workers=args.workers,
                         progress=not args.no_progress, dry_run=args.dry_run)
    if args.json:
        print_json({"out": str(res.out), "runs": res.n_runs, "skipped": res.n_skipped,
                    "failures": [f["run_id"] for f in res.failures],
                    "figures": [str(p) for p in res.figures], "summary": res.summary})
    else:
        s = res.summary
        print(f"{res.n_runs} runs ({res.n_skipped} already done, {len(res.failures)} failed) -> {res.out}")
        print(f"table:   {res.out / 'results.parquet'}  ({len(res.table)} rows)")
        print(f"figures: {res.out / 'figures'}")
        if "vi_reduction_mean_percent" in s:
            print(f"VI reduction vs scratch at n = {s['n_for_comparisons']}: {s['vi_reduction_mean_percent']:.1f}% "
                  f"(mean over targets)")
        if s.get("spearman", {}).get("pooled") is not None:
            print(f"Spearman rho (MMD² rank vs fine-tuned VI), pooled: {s['spearman']['pooled']:.2f}")
        if s.get("phylogeny"):
            ph = s["phylogeny"]
            if "error" not in ph:
                print(f"atlas vs tree: cophenetic r = {ph['cophenetic_correlation']:.2f}, Mantel r = "
                      f"{ph['mantel_r']:.2f} (p = {ph['mantel_p']:.3g})")
        for f in res.failures:
            print(f"failed: {f['run_id']} (see {res.out / 'failed'})")
    return 1 if res.failures else 0
