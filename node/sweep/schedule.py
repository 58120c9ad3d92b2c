"""The sweep's cron schedule inside ``prognode serve`` (apscheduler)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from node.audit import AuditLog
from node.config import Config
from node.db import Database
from node.sweep.plan import SweepError
from node.sweep.sweeper import open_database, run_sweep

log = logging.getLogger(__name__)

SCHEDULER_JOB_ID = "prognode-sweep"


def scheduled_sweep(config_json: str) -> None:
    """The apscheduler job: sweep ``[sweep].lookback_days`` up to today (a top-level function, stored by reference)."""
    config = Config.model_validate_json(config_json)
    db = open_database(config)
    try:
        today = dt.date.today()
        audit = AuditLog(config.path(config.logging.audit_file))
        out = run_sweep(config, db, today - dt.timedelta(days=config.sweep.lookback_days), today,
                        audit=audit, progress=lambda line: log.info("%s", line))
        log.info("scheduled sweep %d: %s", out.sweep_id, out.state)
    except SweepError as e:
        log.error("scheduled sweep refused: %s", e)
    finally:
        db.dispose()


def start_scheduler(config: Config, db: Database) -> Any:
    """Start the cron schedule of ``[sweep]`` (returns the running ``BackgroundScheduler``).

    The job store lives in the node's database, the job has a fixed id and is replaced at each start,
    coalesces missed runs into one and never runs twice at once: restarts make no duplicate runs.
    """
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=db.url, tablename="apscheduler_jobs")},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
    )
    scheduler.add_job(scheduled_sweep, CronTrigger.from_crontab(config.sweep.cron), id=SCHEDULER_JOB_ID,
                      name="PACS sweep", kwargs={"config_json": config.model_dump_json()},
                      replace_existing=True, coalesce=True, max_instances=1)
    scheduler.start()
    log.info("sweep schedule %r started (job store %s)", config.sweep.cron, db.url.split("://")[0])
    return scheduler
