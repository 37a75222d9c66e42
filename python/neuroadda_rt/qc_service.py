"""Deprecated location of the QC folder watcher: use :mod:`neuroadda_rt.qc.service`."""

import warnings

from .qc.service import DEFAULT_PATTERNS, QCService, read_tiles, split_tiles, write_report

__all__ = ["QCService", "read_tiles", "split_tiles", "write_report", "DEFAULT_PATTERNS"]

warnings.warn("neuroadda_rt.qc_service moved to neuroadda_rt.qc.service", DeprecationWarning, stacklevel=2)
