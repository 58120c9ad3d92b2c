"""Sweeps: query a PACS for a date range, skip what the ledger already has, retrieve the rest.

``prognode sweep --config FILE --from DATE --to DATE [--dry-run]`` runs one sweep now; ``prognode serve``
runs ``[sweep].cron`` through :func:`start_scheduler`.  A source is ``kind = "dimse"`` (C-FIND, then
C-MOVE or C-GET) or ``kind = "dicomweb"`` (QIDO-RS, then WADO-RS); either way the same ledger, resume and
throttle apply, and every instance goes through the node's own C-STORE path (one Storage, the route
keywords, the door checks and caps); after retrieval the node's completion, routing and jobs do the work.

The package:

* :mod:`node.sweep.plan`: the query (C-FIND / QIDO-RS) and the ledger (``sweeps``, ``sweep_items``);
* :mod:`node.sweep.retrieve`: C-MOVE (to the running node's SCP), C-GET and WADO-RS, and the store path;
* :mod:`node.sweep.dicomweb`: the ``dicomweb-client`` side of a DICOMweb source;
* :mod:`node.sweep.sweeper`: :class:`Sweeper` (throttle, resume, retry, report) and :func:`run_sweep`;
* :mod:`node.sweep.schedule`: the apscheduler cron job;
* :mod:`node.sweep.cli`: ``prognode sweep``;
* :mod:`node.sweep.cohort`: ``prognode cohort features --source NAME --studies LIST.csv``.

Importing it imports neither torch nor monai (the receive path's import contract).
"""

from node.sweep.cli import main, register
from node.sweep.plan import (
    RemoteSeries,
    RemoteStudy,
    SweepError,
    SweepOutcome,
    parse_date,
    within_hours,
)
from node.sweep.retrieve import StoreHandler, default_store_handler, retrieve_contexts
from node.sweep.schedule import SCHEDULER_JOB_ID, scheduled_sweep, start_scheduler
from node.sweep.sweeper import Sweeper, open_database, run_sweep

__all__ = [
    "SCHEDULER_JOB_ID",
    "RemoteSeries",
    "RemoteStudy",
    "StoreHandler",
    "SweepError",
    "SweepOutcome",
    "Sweeper",
    "default_store_handler",
    "main",
    "open_database",
    "parse_date",
    "register",
    "retrieve_contexts",
    "run_sweep",
    "scheduled_sweep",
    "start_scheduler",
    "within_hours",
]
