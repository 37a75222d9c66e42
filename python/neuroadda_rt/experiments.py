"""Deprecated alias: :mod:`neuroadda_rt.study.experiments` (the research harness moved out of the core)."""

import warnings

warnings.warn("neuroadda_rt.experiments moved to neuroadda_rt.study.experiments", DeprecationWarning, stacklevel=2)

from .study.experiments import (  # noqa: E402
    Domain, ExperimentConfig, ExperimentResult, FIGURES, RESULTS_FORMAT, RunSpec, SOURCE_FORMAT,
    STRATEGIES, assemble_table, compute_mmd_matrix, execute_run, load_config, load_source,
    make_figures, plan_runs, prepare_domains, run_experiment, summarize)

__all__ = ['Domain', 'ExperimentConfig', 'ExperimentResult', 'FIGURES', 'RESULTS_FORMAT', 'RunSpec', 'SOURCE_FORMAT', 'STRATEGIES', 'assemble_table', 'compute_mmd_matrix', 'execute_run', 'load_config', 'load_source', 'make_figures', 'plan_runs', 'prepare_domains', 'run_experiment', 'summarize']
