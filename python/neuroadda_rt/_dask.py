"""One way to get a Dask ``distributed`` client: a local cluster of our own, or an existing scheduler.

Both the study runner and the blockwise deployment run tasks on Dask; they share this so that a scheduler
address, the local cluster's shape and the silencing of Dask's cluster chatter behave the same in both.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from .errors import require

#: scheduler values that mean "start a local cluster of our own"
LOCAL = (None, "local", "distributed")


def local_workers(workers: int | None) -> int:
    """Workers of a local cluster: ``workers``, else one per CPU this process may use."""
    if workers:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def dask_client(scheduler=None, workers: int | None = None) -> Iterator:
    """A ``distributed.Client`` for the block of a ``with`` statement, closed (with its cluster) afterwards.

    Parameters
    ----------
    scheduler : None, "local", "distributed" or str
        None / "local" / "distributed": a local cluster of one-threaded worker processes, started here;
        anything else is a scheduler address such as ``"tcp://host:8786"``.
    workers : int, optional
        Size of the local cluster (default: one worker per usable CPU).

    Yields
    ------
    distributed.Client
    """
    distributed = require("distributed", "dask")
    # Dask's cluster chatter (workers starting, nannies closing) is not the user's business.
    quiet = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)
             if name == "distributed" or name.startswith("distributed.")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    cluster = client = None
    try:
        if scheduler in LOCAL:
            cluster = distributed.LocalCluster(n_workers=local_workers(workers), threads_per_worker=1,
                                               processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
            client = distributed.Client(cluster)
        else:
            client = distributed.Client(str(scheduler))
        yield client
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
