"""Acquisition-time quality control: drift and artefact monitoring in encoder feature space.

* :mod:`~neuroadda_rt.qc.monitor` -- :class:`QCMonitor` (drift tests and artefact flags per tile),
  its results :class:`QCReport` and :class:`WindowResult`;
* :mod:`~neuroadda_rt.qc.descriptors` -- the per-tile intensity descriptors (:func:`image_stats`);
* :mod:`~neuroadda_rt.qc.state` -- the saved-state file format;
* :mod:`~neuroadda_rt.qc.reading` -- tiles from image files and folders;
* :mod:`~neuroadda_rt.qc.service` -- :class:`QCService`, the folder watcher;
* :mod:`~neuroadda_rt.qc.report` -- the HTML report of a watcher's database.
"""

from .descriptors import image_stats
from .monitor import QCCalibrationWarning, QCMonitor, QCReport, WindowResult
from .reading import DEFAULT_PATTERNS, load_array as _load_array, read_tiles, split_tiles  # noqa: F401
from .report import write_report
from .service import QCService

__all__ = ["QCMonitor", "QCReport", "WindowResult", "QCCalibrationWarning", "image_stats", "QCService", "read_tiles", "split_tiles",
           "write_report", "DEFAULT_PATTERNS"]
