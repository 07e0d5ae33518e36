"""The running node: Storage SCP, series completion and job runner around one job store."""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from node.config import NodeSettings
from node.jobs import InstanceRecord, JobStore, JobStoreError
from node.pipeline import Pipeline, ScoringPipeline
from node.scheduler import CompletionScheduler
from node.scp import StorageSCP
from node.storage import InstanceStore, NodeLock, is_valid_uid
from node.worker import JobRunner

logger = logging.getLogger(__name__)


class NodeServer:
    """A cacs-node: receives series, scores complete ones and sends the results.

    settings: the validated node settings.
    pipeline: the job steps; None for `ScoringPipeline(settings)`, the real one.
    """

    def __init__(self, settings: NodeSettings, *, pipeline: Pipeline | None = None) -> None:
        self.settings = settings
        self.store = InstanceStore(settings.storage.root, settings.storage.min_free_space_mb)
        self.pipeline = pipeline if pipeline is not None else ScoringPipeline(settings)
        self.jobs: JobStore | None = None
        self.runner: JobRunner | None = None
        self.scheduler: CompletionScheduler | None = None
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None
        #: The Storage SCP once started.
        self.scp: StorageSCP | None = None
        self._lock: NodeLock | None = None

    @property
    def port(self) -> int:
        """The TCP port the SCP listens on."""
        if self._server is None:
            raise RuntimeError("the node is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Open the storage and job store, resume unfinished jobs and start listening; return at once.

        Raises:
            node.storage.StorageError: the storage root cannot be created, or
                another node holds it (see node.storage.NodeLock).
            OSError: the port cannot be bound (in use, or below 1024 without privileges).
        """
        self.store.create_layout()
        lock = NodeLock(self.store.root)
        lock.acquire()
        self._lock = lock
        try:
            self._start_locked()
        except BaseException:
            self._lock = None
            lock.release()
            raise

    def _start_locked(self) -> None:
        self.store.remove_stale_temporaries()
        self.jobs = JobStore(self.store.database_path)
        self._register_unrecorded_instances(self.jobs)

        self.runner = JobRunner(self.settings, self.store, self.jobs, self.pipeline)
        for job_id in self.jobs.reset_interrupted():
            self.runner.submit(job_id)
        self.runner.start()
        self.scheduler = CompletionScheduler(
            self.jobs, self.settings.scoring.quiet_period_s, self.runner.submit, self.runner.is_queued
        )
        self.scheduler.start()

        scp = StorageSCP(self.settings, self.store, self.jobs)
        self.scp = scp
        ae = scp.build_ae()
        self._ae = ae
        node = self.settings.node
        try:
            self._server = ae.start_server(
                (node.bind_address, node.port), block=False, evt_handlers=scp.event_handlers()
            )
        except OSError:
            self.scheduler.stop()
            self.runner.stop()
            raise
        logger.info(
            "cacs-node %s listening on %s:%d, storage %s, quiet period %.1f s, %d destination(s)",
            node.ae_title,
            node.bind_address,
            self.port,
            self.store.root,
            self.settings.scoring.quiet_period_s,
            len(self.settings.destinations),
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, abort open associations, stop the scheduler and let the worker finish its step.

        Instances already acknowledged are on disk and in the job store. The
        next start completes their series and resumes unfinished jobs. A
        sender whose association is aborted gets no response for the instance
        in flight and sends it again.
        """
        if self._ae is not None:
            open_associations = list(self._ae.active_associations)
            established = sum(1 for assoc in open_associations if assoc.is_established)
            if established:
                logger.warning("stopping: aborting %d established association(s)", established)
            # pynetdicom 3.0 raises InvalidEventError in the DUL thread when it
            # aborts a connection still waiting for its A-ASSOCIATE-RQ, so those
            # connections are only stopped, without an A-ABORT.
            for assoc in open_associations:
                if assoc.requestor.primitive is None:
                    assoc.kill()
            # AE.shutdown stops the listening server and aborts the associations.
            self._ae.shutdown()
            for assoc in open_associations:
                assoc.join(timeout)
            self._ae = None
            self._server = None
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.runner is not None:
            self.runner.stop(timeout)
        if self.jobs is not None:
            self.jobs.close()
            self.jobs = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        logger.info("cacs-node %s stopped", self.settings.node.ae_title)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every received series has become a job and every job has ended.

        Returns:
            True when idle, False when `timeout` seconds passed first.
        """
        if self.jobs is None or self.runner is None:
            raise RuntimeError("the node is not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                self.jobs.pending_series_count() == 0
                and self.jobs.active_job_count() == 0
                and self.runner.is_idle
            ):
                return True
            time.sleep(0.05)
        return False

    def _register_unrecorded_instances(self, jobs: JobStore) -> None:
        """Register instance files that a stop left on disk but not in the job store.

        The SCP returns success only after registering, so these instances
        were never acknowledged; keeping them spares the sender a re-send.
        """
        known = jobs.all_instance_paths()
        added = 0
        for path in sorted(self.store.incoming.rglob("*.dcm")):
            relative = self.store.relative(path)
            if relative in known:
                continue
            if self._register_file(jobs, path, relative):
                added += 1
        if added:
            logger.warning("registered %d instance file(s) that an earlier stop left unregistered", added)

    def _register_file(self, jobs: JobStore, path: Path, relative: str) -> bool:
        try:
            dataset = dcmread(path, stop_before_pixels=True)
            uids = (str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
            sop_class = str(dataset.SOPClassUID)
            transfer_syntax = str(dataset.file_meta.TransferSyntaxUID)
        except (OSError, InvalidDicomError, AttributeError, ValueError) as error:
            logger.warning("ignoring unreadable file %s left under the storage root: %s", path, error)
            return False
        if not all(is_valid_uid(uid) for uid in uids):
            logger.warning("ignoring file %s with invalid UIDs left under the storage root", path)
            return False

        data = path.read_bytes()
        # The digest covers the dataset without preamble and file meta, like the SCP's.
        offset = _dataset_offset(data)
        record = InstanceRecord(
            sop_instance_uid=uids[2],
            series_instance_uid=uids[1],
            sop_class_uid=sop_class,
            transfer_syntax_uid=transfer_syntax,
            path=relative,
            digest=hashlib.sha256(data[offset:]).hexdigest(),
            size=len(data),
            received_at=path.stat().st_mtime,
        )
        try:
            jobs.record_instance(record, uids[0])
        except JobStoreError as error:
            logger.warning("not registering %s: %s", path, error)
            return False
        return True


def _dataset_offset(data: bytes) -> int:
    """Offset of the dataset after the preamble, "DICM" and the file meta group (PS3.10 section 7.1)."""
    if data[128:132] != b"DICM":
        return 0
    # (0002,0000) UL group length, explicit VR: tag 4 bytes, "UL", length 2 bytes, value 4 bytes.
    group_length = struct.unpack("<I", data[140:144])[0]
    return 144 + group_length
