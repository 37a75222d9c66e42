"""The paper's study as one reproducible command (``neuroadda-rt experiment CONFIG``).

One module per job: :mod:`.config` (defaults, validation), :mod:`.plan` (the domains' data and
the leave-one-out runs), :mod:`.execute` (sources, MMD² matrix, runs, :func:`run_experiment`),
:mod:`.tables` (results table, summary statistics) and :mod:`.figures`.
"""

from ...selection import STRATEGIES
from .config import ExperimentConfig, load_config
from .execute import (SOURCE_FORMAT, ExperimentResult, compute_mmd_matrix, execute_run, load_source,
                      run_experiment)
from .figures import FIGURES, make_figures
from .plan import Domain, RunSpec, plan_runs, prepare_domains
from .tables import RESULTS_FORMAT, assemble_table, summarize

__all__ = ["ExperimentConfig", "ExperimentResult", "load_config", "plan_runs", "run_experiment",
           "assemble_table", "make_figures", "FIGURES", "Domain", "RunSpec", "SOURCE_FORMAT", "STRATEGIES",
           "RESULTS_FORMAT", "compute_mmd_matrix", "execute_run", "load_source", "prepare_domains", "summarize"]
