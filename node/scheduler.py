"""Series completion: turn a series into a job once no instance arrived for the quiet period.

The quiet period is counted from the series' last received instance as
stored in the job store, so it spans association boundaries: one association
per image and a series split over several associations behave the same. The
scheduler also hands the worker jobs that `cacs-node retry` put back into
received or sending from another process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from node.jobs import RECEIVED, SENDING, JobStore

logger = logging.getLogger(__name__)


class CompletionScheduler:
    """A thread that polls the job store for complete series and retried jobs.

    quiet_period_s: seconds without a new instance after which a series is complete.
    submit: hands a job id to the worker; called on the scheduler thread.
    is_queued: returns True when the worker already has the job id.
    poll_interval_s: seconds between polls; by default a fifth of the quiet
        period, at most 1 s, so completion is late by at most that much.
    """

    def __init__(
        self,
        jobs: JobStore,
        quiet_period_s: float,
        submit: Callable[[int], None],
        is_queued: Callable[[int], bool],
        *,
        poll_interval_s: float | None = None,
    ) -> None:
        self.jobs = jobs
        self.quiet_period_s = quiet_period_s
        self.submit = submit
        self.is_queued = is_queued
        self.poll_interval_s = poll_interval_s or min(1.0, quiet_period_s / 5.0)
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start polling; quiet periods count from now at the earliest."""
        self.started_at = time.time()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cacs-completion", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
            except Exception:
                # A database error (disk full, locked too long) must not end
                # completion for good; the next poll tries again.
                logger.exception("series completion poll failed; trying again in %.1f s", self.poll_interval_s)

    def poll(self, now: float | None = None) -> list[int]:
        """Open jobs for complete series and submit waiting jobs; return the ids submitted."""
        now = time.time() if now is None else now
        submitted: list[int] = []
        for series_uid in self.jobs.due_series(self.quiet_period_s, now, self.started_at):
            job = self.jobs.open_job_for_series(series_uid)
            if job is None:
                logger.info("series %s: new instances join the job that has not started yet", series_uid)
                continue
            logger.info(
                "job %d study %s series %s: series complete with %d instance(s), job %s%s",
                job.id,
                job.study_instance_uid,
                series_uid,
                job.instance_count,
                job.state,
                f" ({job.reason})" if job.reason else "",
            )
        for job in reversed(self.jobs.jobs(states=[RECEIVED, SENDING])):
            if not self.is_queued(job.id):
                self.submit(job.id)
                submitted.append(job.id)
        return submitted
