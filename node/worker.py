"""The job runner: one worker thread that scores, writes and sends jobs off the network threads.

Jobs run one at a time in id order, so a re-score of a series always runs
after the job it supersedes. Each destination is sent to on its own thread,
so one that is down or retrying does not hold back the others.
"""

from __future__ import annotations

import logging
import queue
import shlex
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node.config import NOTICE, Destination, NodeSettings, config_option
from node.jobs import (
    DONE, FAILED, REFUSED, SCORING, SENDING, WRITING, InstanceRecord, Job, JobStore, series_fingerprint,
    with_job_id,
)
from node.pipeline import Pipeline, ScoredSeries
from node.storage import InstanceStore
from scoring.errors import DamagedInstanceError, NoEligibleSeriesError, SeriesError

logger = logging.getLogger(__name__)


def cli_command() -> str:
    """Return the path of the cacs-node command installed beside this Python, else the bare name.

    Job reasons suggest commands to paste, and under systemd the virtual environment is not on PATH.
    """
    installed = Path(sys.executable).parent / "cacs-node"
    return str(installed) if installed.is_file() else "cacs-node"


class JobRunner:
    """Runs submitted jobs on one worker thread.

    settings: destinations and AE title for sending.
    store: the storage root (instance paths, output folders).
    jobs: the job store.
    pipeline: the steps; `node.pipeline.ScoringPipeline` in the node.
    """

    def __init__(self, settings: NodeSettings, store: InstanceStore, jobs: JobStore, pipeline: Pipeline) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.pipeline = pipeline
        self._queue: queue.Queue[int] = queue.Queue()
        self._queued: set[int] = set()
        self._queued_lock = threading.Lock()
        self._busy = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cacs-job-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the worker to stop after the current step; return False if it is still running after `timeout`.

        A job interrupted in scoring or writing is scored again at the next
        start; one interrupted in sending sends what was not yet sent.
        """
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if not stopped:
            logger.warning("job runner still busy %.0f s after the stop request", timeout)
        return stopped

    def submit(self, job_id: int) -> None:
        """Queue a job; a job already queued is not queued twice."""
        with self._queued_lock:
            if job_id in self._queued:
                return
            self._queued.add(job_id)
        self._queue.put(job_id)

    @property
    def is_idle(self) -> bool:
        """True when no job is queued or running."""
        with self._queued_lock:
            return not self._queued and not self._busy.is_set()

    def is_queued(self, job_id: int) -> bool:
        """True when the job is waiting in the queue or running."""
        with self._queued_lock:
            return job_id in self._queued

    def _run(self) -> None:
        self._preload_model()
        while not self._stop.is_set():
            try:
                job_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._busy.set()
            try:
                self.process(job_id)
            except Exception:
                # A bug in a step must not end the worker: record it on the job and go on.
                logger.exception("job %d failed unexpectedly", job_id)
                self._fail_unexpectedly(job_id)
            finally:
                with self._queued_lock:
                    self._queued.discard(job_id)
                self._busy.clear()

    def _preload_model(self) -> None:
        # Loading the model before the first series arrives takes the load
        # time out of the first job's latency. A failure here is only logged:
        # each job then fails with the reason, and a fixed model file is
        # picked up by the next job.
        try:
            self.pipeline.model_version()
        except Exception as error:
            logger.error("cannot load the model at start (%s); jobs fail until it loads", error)

    def _fail_unexpectedly(self, job_id: int) -> None:
        try:
            self.jobs.set_state(
                job_id, FAILED, f"internal error in the node; see the node log, then run `cacs-node retry {job_id}`"
            )
        except Exception:
            logger.exception("cannot mark job %d as failed", job_id)

    # Steps.

    def process(self, job_id: int) -> None:
        """Run one job from its current state to done, failed or refused."""
        job = self.jobs.job(job_id)
        origin = self.jobs.series_origin(job.series_instance_uid)
        ids = f"job {job.id} study {job.study_instance_uid} series {job.series_instance_uid}" + (
            f" from {origin}" if origin else ""
        )
        if job.state == SENDING:
            logger.info("%s: resuming sending", ids)
            self._send(job, ids)
            return
        if not self.jobs.claim(job_id):
            logger.debug("%s: not started, state is %s", ids, job.state)
            return
        logger.info("%s: scoring started", ids)

        scored = self._score(job, ids)
        if scored is None or self._stop.is_set():
            return
        if not self._write(job, scored, ids) or self._stop.is_set():
            return

        self.jobs.set_state(job.id, SENDING, "")
        self._send(self.jobs.job(job.id), ids)

    def _score(self, job: Job, ids: str) -> ScoredSeries | None:
        """Score the series' current instances; return None when the job ended here."""
        instances = self.jobs.series_instances(job.series_instance_uid)
        conflict = self.jobs.series_conflict(job.series_instance_uid)
        if conflict:
            self._refuse(job, with_job_id(conflict, job.id), instances, ids)
            return None

        fingerprint = series_fingerprint(instances)
        try:
            model_version = self.pipeline.model_version()
        except Exception as error:
            logger.exception("%s: cannot load the model", ids)
            self._finish(job, FAILED, f"cannot load the model: {error}; check [scoring] model_path and device", ids)
            return None

        # At most one scoring per set of instances and model version, unless forced.
        if not job.force:
            earlier = self.jobs.find_scored(job.series_instance_uid, fingerprint, model_version)
            if earlier is not None and earlier.id != job.id:
                reason = (
                    f"not scored again: job {earlier.id} already scored these {len(instances)} instance(s) with "
                    f"model version {model_version}; run `cacs-node retry {job.id} --force` to score again"
                )
                self.jobs.set_state(job.id, DONE, reason, instance_count=len(instances), fingerprint=fingerprint,
                                    model_version=model_version, result=earlier.result)
                logger.info("%s: %s", ids, reason)
                return None

        self.jobs.set_state(
            job.id, SCORING, "", instance_count=len(instances), fingerprint=fingerprint, model_version=model_version
        )
        try:
            scored = self.pipeline.score([self.store.absolute(record.path) for record in instances])
        except SeriesError as error:
            # A series without CT images (localizers, reports) is not a failed
            # calcium score, so it gets no notice.
            notify = not isinstance(error, NoEligibleSeriesError)
            self._refuse(job, self._refusal_reason(job, error, instances), instances, ids, notify=notify)
            return None
        except Exception as error:
            logger.exception("%s: scoring failed", ids)
            self._finish(job, FAILED, f"scoring failed: {type(error).__name__}: {error}; see the node log", ids)
            return None

        total = scored.result.agatston.get("total")
        logger.info("%s: scored %d instance(s), total Agatston %s, risk category %s", ids, len(instances), total,
                    scored.result.risk_category)
        if self.settings.node.log_patient_identifiers:
            self._log_patient(scored, ids)
        return scored

    def _refuse(self, job: Job, reason: str, instances: list[InstanceRecord], ids: str, *, notify: bool = True) -> None:
        """End the job as refused, after sending the not-scored notice when `notify` and a destination takes it.

        The job stays active while the notice is sent, so `retry` waits for it
        and a stop of the node leaves the job to be refused again at the next start.
        """
        problem = self._send_notice(job, reason, instances, ids) if notify else ""
        self._finish(job, REFUSED, f"{reason}. {problem}" if problem else reason, ids)

    def _send_notice(self, job: Job, reason: str, instances: list[InstanceRecord], ids: str) -> str:
        """Write the not-scored notice and send it to the destinations that take it; return what failed, or ""."""
        destinations = [destination for destination in self.settings.destinations if NOTICE in destination.outputs]
        if not destinations or self._stop.is_set():
            return ""
        try:
            out_dir = self.store.output_folder(job.id)
            out_dir.mkdir(parents=True, exist_ok=True)
            notice = self.pipeline.write_notice([self.store.absolute(record.path) for record in instances], reason, out_dir)
            self.jobs.record_outputs(job.id, {NOTICE: (self.store.relative(notice.path), notice.sop_instance_uid)})
        except Exception as error:
            logger.exception("%s: writing the not-scored notice failed", ids)
            return f"The not-scored notice could not be written: {type(error).__name__}: {error}"
        outputs = self.jobs.outputs(job.id)
        failures = [self._send_to(job, destination, [NOTICE], outputs, ids) for destination in destinations]
        failures = [failure for failure in failures if failure]
        return f"The not-scored notice was not sent: {'; '.join(failures)}" if failures else ""

    def _refusal_reason(self, job: Job, error: SeriesError, instances: list[InstanceRecord]) -> str:
        """Return the loader's reason, plus the command that sets aside the damaged stored instances it names."""
        if not isinstance(error, DamagedInstanceError):
            return str(error)
        damaged = {Path(path).resolve() for path in error.paths}
        uids = [record.sop_instance_uid for record in instances if self.store.absolute(record.path) in damaged]
        if not uids:
            return str(error)
        if len(uids) == len(instances):
            return f"{error}. Every instance of the series is damaged: re-send the series"
        config = config_option(self.settings.path)
        options = " ".join(f"--remove-instance {uid}" for uid in uids)
        return (f"{error}. To score the series without the damaged instance(s), run "
                f"`{shlex.quote(cli_command())} retry{config} {job.id} {options}`. "
                "This helps only for instances at either end of the series: "
                "without a middle slice the series has a gap")

    def _write(self, job: Job, scored: ScoredSeries, ids: str) -> bool:
        """Write the outputs and record them; return False when the job failed here."""
        self.jobs.set_state(job.id, WRITING, "", result=scored.result.to_json(), model_version=scored.model_version)
        try:
            predecessor = self._predecessor_sr(job, ids)
            out_dir = self.store.output_folder(job.id)
            out_dir.mkdir(parents=True, exist_ok=True)
            written = self.pipeline.write(scored, out_dir, predecessor)
            self.jobs.record_outputs(
                job.id, {output.kind: (self.store.relative(output.path), output.sop_instance_uid) for output in written}
            )
        except Exception as error:
            logger.exception("%s: writing the outputs failed", ids)
            self._finish(job, FAILED, f"writing SEG/SR/summary failed: {type(error).__name__}: {error}", ids)
            return False
        logger.info("%s: wrote %s", ids, ", ".join(f"{output.kind} {output.sop_instance_uid}" for output in written))
        return True

    @staticmethod
    def _log_patient(scored: Any, ids: str) -> None:
        # Only with [node] log_patient_identifiers = true: the operator has
        # decided that the log is protected like the images.
        headers = getattr(scored.volume, "headers", ()) or ()
        if headers:
            header = headers[0]
            logger.info("%s: patient %s, PatientID %s", ids, header.get("PatientName", ""), header.get("PatientID", ""))

    def _predecessor_sr(self, job: Job, ids: str) -> Any:
        earlier = self.jobs.latest_sr(job.series_instance_uid)
        if earlier is None:
            return None
        earlier_job, path = earlier
        try:
            dataset = dcmread(self.store.absolute(path))
        except (OSError, InvalidDicomError) as error:
            raise RuntimeError(
                f"the SR of job {earlier_job} at {path} cannot be read ({error}); the new SR must reference it"
            ) from error
        logger.info("%s: the new SR supersedes SR %s of job %d", ids, dataset.SOPInstanceUID, earlier_job)
        return dataset

    def _send(self, job: Job, ids: str) -> None:
        outputs = self.jobs.outputs(job.id)
        done = {(row["destination"], row["kind"]) for row in self.jobs.sends(job.id) if row["sent"]}
        plans: list[tuple[Destination, list[str]]] = []
        for destination in self.settings.destinations:
            kinds = [kind for kind in sorted(destination.outputs) if kind in outputs and (destination.name, kind) not in done]
            if kinds:
                plans.append((destination, kinds))

        reasons: list[str] = []
        if plans:
            with ThreadPoolExecutor(max_workers=len(plans), thread_name_prefix="cacs-send") as executor:
                futures = [executor.submit(self._send_to, job, destination, kinds, outputs, ids)
                           for destination, kinds in plans]
                for future in futures:
                    reason = future.result()
                    if reason:
                        reasons.append(reason)
        if self._stop.is_set() and reasons:
            logger.info("%s: stopped while sending; the rest is sent at the next start", ids)
            return

        if reasons:
            self._finish(job, FAILED, "; ".join(reasons) + "; fix the destination, then run `cacs-node retry "
                         f"{job.id}` to send again", ids)
            return
        names = ", ".join(destination.name for destination in self.settings.destinations) or "no destination"
        self._finish(job, DONE, f"outputs sent to {names}" if self.settings.destinations else
                     "scored; no [[destinations]] configured, outputs kept under the storage root", ids)

    def _send_to(
        self, job: Job, destination: Destination, kinds: list[str], outputs: dict[str, tuple[str, str]], ids: str
    ) -> str:
        """Send the job's outputs of `kinds` to one destination; return the failure reason or ""."""
        files = [self.store.absolute(outputs[kind][0]) for kind in kinds]
        try:
            report = self.pipeline.send(files, destination, self._stop)
        except Exception as error:
            logger.exception("%s: sending to %s failed", ids, destination.name)
            for kind in kinds:
                self.jobs.record_send(job.id, destination.name, kind, outputs[kind][1], sent=False, status=None,
                                      error_comment="", reason=str(error))
            return f"sending to destination {destination.name!r} failed: {type(error).__name__}: {error}"

        by_path = {Path(result.path).resolve(): result for result in report.instances}
        for kind, path in zip(kinds, files):
            result = by_path.get(path.resolve())
            self.jobs.record_send(
                job.id,
                destination.name,
                kind,
                outputs[kind][1],
                sent=bool(result and result.sent),
                status=result.status if result else None,
                error_comment=result.error_comment if result else "",
                reason=result.reason if result else "no result reported for this file",
            )
        if report.all_sent and len(report.instances) == len(files):
            logger.info("%s: sent %s to %s (%s)", ids, ", ".join(kinds), destination.name, report.peer)
            return ""
        reason = report.failure_reason() or f"destination {destination.name!r} did not report every file"
        logger.error("%s: %s", ids, reason)
        return reason

    def _finish(self, job: Job, state: str, reason: str, ids: str) -> None:
        self.jobs.set_state(job.id, state, reason)
        log = logger.info if state == DONE else logger.warning
        log("%s: %s: %s", ids, state, reason)
