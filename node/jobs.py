"""The job store: received series, their instances and scoring jobs in SQLite (WAL).

A job moves through received → scoring → writing → sending → done, or ends as
failed (the node or a destination failed; `cacs-node retry` may help) or
refused (the input cannot be scored as it is, and the reason states what to change).
The database lives in the storage root, so the node and the `status` and
`retry` commands share it. WAL mode lets those commands read while the node
writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RECEIVED = "received"
SCORING = "scoring"
WRITING = "writing"
SENDING = "sending"
DONE = "done"
FAILED = "failed"
REFUSED = "refused"

#: States a job leaves by itself; a restart resumes jobs in these states.
ACTIVE_STATES: tuple[str, ...] = (RECEIVED, SCORING, WRITING, SENDING)
FINAL_STATES: tuple[str, ...] = (DONE, FAILED, REFUSED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL DEFAULT '',
    peer_address TEXT NOT NULL DEFAULT '',
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    pending INTEGER NOT NULL DEFAULT 1,
    conflict TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS conflicts (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    received_at REAL NOT NULL,
    calling_ae_title TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    instance_count INTEGER NOT NULL DEFAULT 0,
    fingerprint TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    force INTEGER NOT NULL DEFAULT 0,
    supersedes_job_id INTEGER,
    result_json TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_series ON jobs(series_instance_uid);
CREATE TABLE IF NOT EXISTS job_outputs (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    PRIMARY KEY (job_id, kind)
);
CREATE TABLE IF NOT EXISTS sr_history (
    id INTEGER PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    written_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sr_history_by_series ON sr_history(series_instance_uid);
CREATE TABLE IF NOT EXISTS job_sends (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sent INTEGER NOT NULL,
    status INTEGER,
    error_comment TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL,
    PRIMARY KEY (job_id, destination, kind)
);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT ''
);
"""


class JobStoreError(RuntimeError):
    """A request to the job store cannot be carried out (unknown job, wrong state)."""


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance; `path` is relative to the storage root."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    digest: str
    size: int
    received_at: float


@dataclass(frozen=True)
class Job:
    """One row of the jobs table.

    fingerprint: SHA-256 over the sorted (SOPInstanceUID, digest) pairs of the
        instances the job scored, so an unchanged series is recognised.
    force: score even when a done job scored the same instances with the same
        model version.
    supersedes_job_id: the earlier job of the same series whose SR this job's
        SR replaces, None for the first.
    result: the ScoringResult JSON once scored, else None.
    """

    id: int
    series_instance_uid: str
    study_instance_uid: str
    state: str
    reason: str
    instance_count: int
    fingerprint: str
    model_version: str
    force: bool
    supersedes_job_id: int | None
    result: dict[str, Any] | None
    attempts: int
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        """Return the `cacs-node status --json` form of the job."""
        return {
            "id": self.id,
            "series_instance_uid": self.series_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "state": self.state,
            "reason": self.reason,
            "instance_count": self.instance_count,
            "model_version": self.model_version,
            "supersedes_job_id": self.supersedes_job_id,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "agatston_total": (self.result or {}).get("agatston", {}).get("total"),
            "risk_category": (self.result or {}).get("risk_category"),
        }


def series_fingerprint(instances: Sequence[InstanceRecord]) -> str:
    """SHA-256 over the sorted (SOPInstanceUID, digest) pairs of a series' instances."""
    digest = hashlib.sha256()
    for record in sorted(instances, key=lambda item: item.sop_instance_uid):
        digest.update(f"{record.sop_instance_uid}={record.digest};".encode("ascii"))
    return digest.hexdigest()


class JobStore:
    """Thread-safe access to the job database; one instance is shared by the node's threads.

    Every method runs in its own transaction. SQLite waits up to
    `busy_timeout_s` for a lock held by another process (`cacs-node retry`).
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._connection = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._connection.row_factory = sqlite3.Row
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._connection.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cursor = self._connection.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")

    # Instances and series.

    def find_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """Return the stored instance with this SOPInstanceUID, or None."""
        with self._lock:
            row = self._connection.execute(
                "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return InstanceRecord(**dict(row)) if row else None

    def record_instance(
        self,
        record: InstanceRecord,
        study_instance_uid: str,
        *,
        calling_ae_title: str = "",
        peer_address: str = "",
    ) -> None:
        """Register a newly stored instance and restart its series' quiet period.

        Raises:
            JobStoreError: an instance with this SOPInstanceUID is already registered.
        """
        with self._transaction() as cursor:
            self._touch_series(cursor, record.series_instance_uid, study_instance_uid, calling_ae_title, peer_address, record.received_at)
            try:
                cursor.execute(
                    "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.sop_instance_uid,
                        record.series_instance_uid,
                        record.sop_class_uid,
                        record.transfer_syntax_uid,
                        record.path,
                        record.digest,
                        record.size,
                        record.received_at,
                    ),
                )
            except sqlite3.IntegrityError as error:
                raise JobStoreError(f"instance {record.sop_instance_uid} is already registered") from error

    def remove_instance(self, sop_instance_uid: str, set_aside: Callable[[InstanceRecord], None]) -> InstanceRecord:
        """Unregister a stored instance, calling `set_aside(record)` to move its file in the same transaction.

        When `set_aside` raises, the instance stays registered.

        Raises:
            JobStoreError: no instance with this SOPInstanceUID is registered.
        """
        with self._transaction() as cursor:
            row = cursor.execute("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
            if row is None:
                raise JobStoreError(f"no stored instance has SOPInstanceUID {sop_instance_uid}")
            record = InstanceRecord(**dict(row))
            cursor.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
            set_aside(record)
        return record

    def record_conflict(
        self,
        sop_instance_uid: str,
        series_instance_uid: str,
        study_instance_uid: str,
        path: str,
        digest: str,
        *,
        received_at: float,
        calling_ae_title: str = "",
        peer_address: str = "",
    ) -> str:
        """Register a re-sent instance with different content and mark its series conflicting.

        Returns:
            The conflict reason now stored on the series.
        """
        with self._transaction() as cursor:
            self._touch_series(cursor, series_instance_uid, study_instance_uid, calling_ae_title, peer_address, received_at)
            cursor.execute(
                "INSERT INTO conflicts (sop_instance_uid, series_instance_uid, path, digest, received_at, calling_ae_title)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (sop_instance_uid, series_instance_uid, path, digest, received_at, calling_ae_title),
            )
            uids = [
                row[0]
                for row in cursor.execute(
                    "SELECT DISTINCT sop_instance_uid FROM conflicts WHERE series_instance_uid = ? ORDER BY id",
                    (series_instance_uid,),
                )
            ]
            moved = _cross_series(cursor, series_instance_uid)
            if moved:
                reason = _cross_series_reason(series_instance_uid, moved)
            else:
                shown = ", ".join(uids[:5]) + (f" and {len(uids) - 5} more" if len(uids) > 5 else "")
                reason = (
                    f"series has conflicting instances: {len(uids)} SOP instance(s) ({shown}) were received again "
                    "with different content. The first copies are kept in incoming/ and the new copies in "
                    "conflicts/ under the storage root. Check which copy is right, then run "
                    "`cacs-node retry JOB --keep-stored` or `cacs-node retry JOB --take-new`"
                )
            cursor.execute(
                "UPDATE series SET conflict = ? WHERE series_instance_uid = ?", (reason, series_instance_uid)
            )
        return reason

    def _touch_series(
        self,
        cursor: sqlite3.Cursor,
        series_uid: str,
        study_uid: str,
        calling_ae_title: str,
        peer_address: str,
        at: float,
    ) -> None:
        cursor.execute(
            "INSERT INTO series (series_instance_uid, study_instance_uid, calling_ae_title, peer_address,"
            " first_received_at, last_received_at, pending) VALUES (?, ?, ?, ?, ?, ?, 1)"
            " ON CONFLICT(series_instance_uid) DO UPDATE SET last_received_at = MAX(last_received_at, excluded.last_received_at),"
            " pending = 1, calling_ae_title = excluded.calling_ae_title, peer_address = excluded.peer_address",
            (series_uid, study_uid, calling_ae_title, peer_address, at, at),
        )

    def series_instances(self, series_uid: str) -> list[InstanceRecord]:
        """Return the instances registered for a series, in SOPInstanceUID order."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT * FROM instances WHERE series_instance_uid = ? ORDER BY sop_instance_uid", (series_uid,)
            ).fetchall()
        return [InstanceRecord(**dict(row)) for row in rows]

    def all_instance_paths(self) -> set[str]:
        """Relative paths of every registered instance."""
        with self._lock:
            return {row[0] for row in self._connection.execute("SELECT path FROM instances")}

    def series_conflict(self, series_uid: str) -> str:
        """Return the conflict reason of a series, "" when it has none."""
        with self._lock:
            row = self._connection.execute(
                "SELECT conflict FROM series WHERE series_instance_uid = ?", (series_uid,)
            ).fetchone()
        return row[0] if row else ""

    def series_origin(self, series_uid: str) -> str:
        """Return "CALLING_AE@address" of the peer that sent the series' latest instance, "" when unknown."""
        with self._lock:
            row = self._connection.execute(
                "SELECT calling_ae_title, peer_address FROM series WHERE series_instance_uid = ?", (series_uid,)
            ).fetchone()
        if row is None or not row[0]:
            return ""
        return f"{row[0]}@{row[1]}"

    def cross_series_conflicts(self, series_uid: str) -> dict[str, str]:
        """Return SOPInstanceUID → other series, for the series' conflicting copies stored under another series."""
        with self._lock:
            return _cross_series(self._connection.cursor(), series_uid)

    def conflicts_of_series(self, series_uid: str) -> list[dict[str, Any]]:
        """Return the conflicting copies of a series, oldest first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT * FROM conflicts WHERE series_instance_uid = ? ORDER BY id", (series_uid,)
            ).fetchall()
        return [dict(row) for row in rows]

    def resolve_conflicts(self, series_uid: str, replacements: dict[str, tuple[str, str, str]]) -> None:
        """Clear the conflict of a series.

        replacements: SOPInstanceUID → (new relative path, digest, transfer syntax)
            for the instances whose new copy replaces the stored one; empty to
            keep every stored copy.
        """
        with self._transaction() as cursor:
            for sop_uid, (path, digest, transfer_syntax) in replacements.items():
                cursor.execute(
                    "UPDATE instances SET path = ?, digest = ?, transfer_syntax_uid = ?, received_at = ?"
                    " WHERE sop_instance_uid = ?",
                    (path, digest, transfer_syntax, time.time(), sop_uid),
                )
            cursor.execute("DELETE FROM conflicts WHERE series_instance_uid = ?", (series_uid,))
            cursor.execute("UPDATE series SET conflict = '' WHERE series_instance_uid = ?", (series_uid,))

    def due_series(self, quiet_period_s: float, now: float, not_before: float) -> list[str]:
        """Series with new instances and no new instance for `quiet_period_s` seconds.

        not_before: the quiet period is counted from no earlier than this time
            (the node's start), so a restart gives senders a full quiet period.
        """
        with self._lock:
            rows = self._connection.execute(
                "SELECT series_instance_uid FROM series WHERE pending = 1 AND MAX(last_received_at, ?) <= ?"
                " ORDER BY last_received_at",
                (not_before, now - quiet_period_s),
            ).fetchall()
        return [row[0] for row in rows]

    def receiving_series(self) -> list[dict[str, Any]]:
        """Series with instances not yet handed to a job, or with an unresolved conflict, newest arrival first.

        Each entry has series_instance_uid, study_instance_uid, calling_ae_title,
        instance_count (instances stored so far), conflict_count (re-sent
        copies kept apart), first_received_at, last_received_at, pending
        (still in its quiet period) and conflict (the reason, "" when none).
        """
        with self._lock:
            rows = self._connection.execute(
                "SELECT s.series_instance_uid, s.study_instance_uid, s.calling_ae_title,"
                " s.first_received_at, s.last_received_at, s.pending, s.conflict,"
                " (SELECT COUNT(*) FROM instances i WHERE i.series_instance_uid = s.series_instance_uid)"
                " AS instance_count,"
                " (SELECT COUNT(*) FROM conflicts c WHERE c.series_instance_uid = s.series_instance_uid)"
                " AS conflict_count"
                " FROM series s WHERE s.pending = 1 OR s.conflict != '' ORDER BY s.last_received_at DESC"
            ).fetchall()
        return [{**dict(row), "pending": bool(row["pending"])} for row in rows]

    def pending_series_count(self) -> int:
        """Number of series with instances not yet handed to a job."""
        with self._lock:
            return int(self._connection.execute("SELECT COUNT(*) FROM series WHERE pending = 1").fetchone()[0])

    # Jobs.

    def open_job_for_series(self, series_uid: str) -> Job | None:
        """Turn a complete series into a job, or fold it into a job that has not started.

        A job still waiting in "received" loads the instances when it starts,
        so it takes the new ones and no second job is made. When the series
        has a conflict, the new job is refused with the conflict as reason.

        Returns:
            The new job, or None when an unstarted job already covers the series.
        """
        now = time.time()
        with self._transaction() as cursor:
            series = cursor.execute(
                "SELECT * FROM series WHERE series_instance_uid = ?", (series_uid,)
            ).fetchone()
            if series is None:
                raise JobStoreError(f"series {series_uid} is not in the job store")
            cursor.execute("UPDATE series SET pending = 0 WHERE series_instance_uid = ?", (series_uid,))

            waiting = cursor.execute(
                "SELECT id FROM jobs WHERE series_instance_uid = ? AND state = ? ORDER BY id DESC LIMIT 1",
                (series_uid, RECEIVED),
            ).fetchone()
            if waiting is not None and not series["conflict"]:
                return None

            previous = cursor.execute(
                "SELECT id FROM jobs WHERE series_instance_uid = ? ORDER BY id DESC LIMIT 1", (series_uid,)
            ).fetchone()
            count = cursor.execute(
                "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?", (series_uid,)
            ).fetchone()[0]
            state, reason = (REFUSED, series["conflict"]) if series["conflict"] else (RECEIVED, "")
            cursor.execute(
                "INSERT INTO jobs (series_instance_uid, study_instance_uid, state, reason, instance_count,"
                " supersedes_job_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (series_uid, series["study_instance_uid"], state, reason, count, previous[0] if previous else None, now, now),
            )
            job_id = int(cursor.lastrowid or 0)
            if with_job_id(reason, job_id) != reason:
                reason = with_job_id(reason, job_id)
                cursor.execute("UPDATE jobs SET reason = ? WHERE id = ?", (reason, job_id))
            cursor.execute(
                "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, ?, ?)",
                (job_id, now, state, reason or f"series complete with {count} instance(s)"),
            )
        return self.job(job_id)

    def job(self, job_id: int) -> Job:
        """Return the job with this id.

        Raises:
            JobStoreError: no such job.
        """
        with self._lock:
            row = self._connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobStoreError(f"job {job_id} not found; `cacs-node status` lists the jobs")
        return _job_from_row(row)

    def jobs(self, *, states: Sequence[str] | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first, optionally only those in `states`."""
        query = "SELECT * FROM jobs"
        parameters: list[Any] = []
        if states:
            query += f" WHERE state IN ({', '.join('?' for _ in states)})"
            parameters.extend(states)
        query += " ORDER BY id DESC"
        if limit is not None:
            query += " LIMIT ?"
            parameters.append(int(limit))
        with self._lock:
            rows = self._connection.execute(query, parameters).fetchall()
        return [_job_from_row(row) for row in rows]

    def jobs_of_series(self, series_uid: str) -> list[Job]:
        """Jobs of one series, oldest first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT * FROM jobs WHERE series_instance_uid = ? ORDER BY id", (series_uid,)
            ).fetchall()
        return [_job_from_row(row) for row in rows]

    def claim(self, job_id: int) -> bool:
        """Move a job from received to scoring; return False when the job is in another state."""
        with self._transaction() as cursor:
            cursor.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE id = ? AND state = ?",
                (SCORING, time.time(), job_id, RECEIVED),
            )
            claimed = cursor.rowcount == 1
            if claimed:
                cursor.execute(
                    "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, ?, '')",
                    (job_id, time.time(), SCORING),
                )
        return claimed

    def set_state(self, job_id: int, state: str, reason: str = "", **fields: Any) -> None:
        """Move a job to `state` with `reason`, also setting instance_count,
        fingerprint, model_version, result (a dict) or force when given."""
        allowed = {"instance_count", "fingerprint", "model_version", "result", "force"}
        unknown = set(fields) - allowed
        if unknown:
            raise TypeError(f"set_state got unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        columns = ["state = ?", "reason = ?", "updated_at = ?"]
        values: list[Any] = [state, reason, time.time()]
        for name, value in fields.items():
            column = "result_json" if name == "result" else name
            columns.append(f"{column} = ?")
            values.append(json.dumps(value) if name == "result" else value)
        with self._transaction() as cursor:
            previous = cursor.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if previous is None:
                raise JobStoreError(f"job {job_id} not found")
            cursor.execute(f"UPDATE jobs SET {', '.join(columns)} WHERE id = ?", (*values, job_id))
            # The event history records state changes and reasons, not field updates.
            if previous[0] != state or reason:
                cursor.execute(
                    "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, ?, ?)",
                    (job_id, time.time(), state, reason),
                )

    def requeue(self, job_id: int, *, force: bool, note: str, resend_only: bool = False) -> Job:
        """Put a job back for the worker, for `cacs-node retry`.

        resend_only: keep the written outputs and the successful sends, and
            move the job to sending, so only what failed is sent again. When
            False, the job goes back to received and is scored again.

        Raises:
            JobStoreError: no such job.
        """
        state = SENDING if resend_only else RECEIVED
        with self._transaction() as cursor:
            cursor.execute(
                "UPDATE jobs SET state = ?, reason = '', force = ?, updated_at = ? WHERE id = ?",
                (state, int(force), time.time(), job_id),
            )
            if cursor.rowcount != 1:
                raise JobStoreError(f"job {job_id} not found; `cacs-node status` lists the jobs")
            if resend_only:
                cursor.execute("DELETE FROM job_sends WHERE job_id = ? AND sent = 0", (job_id,))
            else:
                # Scored again: the earlier score must not show on a job that may now end refused or failed.
                cursor.execute("UPDATE jobs SET result_json = '' WHERE id = ?", (job_id,))
                cursor.execute("DELETE FROM job_sends WHERE job_id = ?", (job_id,))
                cursor.execute("DELETE FROM job_outputs WHERE job_id = ?", (job_id,))
            cursor.execute(
                "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, ?, ?)",
                (job_id, time.time(), state, note),
            )
        return self.job(job_id)

    def reset_interrupted(self) -> list[int]:
        """Move jobs that a stop left in scoring or writing back to received; list the active jobs.

        Jobs in sending keep their state and their outputs, so only what was
        not yet sent is sent again.

        Returns:
            The ids of all active jobs, oldest first, for the worker to resume.
        """
        with self._transaction() as cursor:
            interrupted = [
                row[0]
                for row in cursor.execute("SELECT id FROM jobs WHERE state IN (?, ?)", (SCORING, WRITING))
            ]
            for job_id in interrupted:
                cursor.execute(
                    "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?", (RECEIVED, time.time(), job_id)
                )
                cursor.execute("DELETE FROM job_outputs WHERE job_id = ?", (job_id,))
                cursor.execute(
                    "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, ?, ?)",
                    (job_id, time.time(), RECEIVED, "interrupted by a stop of the node; scoring again"),
                )
            active = [
                row[0]
                for row in cursor.execute(
                    f"SELECT id FROM jobs WHERE state IN ({', '.join('?' for _ in ACTIVE_STATES)}) ORDER BY id",
                    ACTIVE_STATES,
                )
            ]
        if interrupted:
            logger.warning("job(s) %s were interrupted by a stop and will be scored again", interrupted)
        return active

    def find_scored(self, series_uid: str, fingerprint: str, model_version: str) -> Job | None:
        """A done job that scored exactly these instances with this model version, or None."""
        with self._lock:
            row = self._connection.execute(
                "SELECT * FROM jobs WHERE series_instance_uid = ? AND fingerprint = ? AND model_version = ?"
                " AND state = ? ORDER BY id DESC LIMIT 1",
                (series_uid, fingerprint, model_version, DONE),
            ).fetchone()
        return _job_from_row(row) if row else None

    def latest_sr(self, series_uid: str) -> tuple[int, str] | None:
        """Return (job id, relative path) of the newest SR written for the series, or None.

        Every SR ever written counts, also one of the same job's earlier run
        (`cacs-node retry --force`), because it may already be in a PACS and
        the new SR must supersede it.
        """
        with self._lock:
            row = self._connection.execute(
                "SELECT job_id, path FROM sr_history WHERE series_instance_uid = ? ORDER BY id DESC LIMIT 1",
                (series_uid,),
            ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def record_outputs(self, job_id: int, outputs: dict[str, tuple[str, str]]) -> None:
        """Store the written outputs of a job: kind → (relative path, SOPInstanceUID).

        The SR also goes into the series' SR history, which `latest_sr` reads.
        """
        with self._transaction() as cursor:
            cursor.execute("DELETE FROM job_outputs WHERE job_id = ?", (job_id,))
            for kind, (path, sop_uid) in outputs.items():
                cursor.execute("INSERT INTO job_outputs VALUES (?, ?, ?, ?)", (job_id, kind, path, sop_uid))
            if "sr" in outputs:
                cursor.execute(
                    "INSERT INTO sr_history (series_instance_uid, job_id, sop_instance_uid, path, written_at)"
                    " SELECT series_instance_uid, id, ?, ?, ? FROM jobs WHERE id = ?",
                    (outputs["sr"][1], outputs["sr"][0], time.time(), job_id),
                )

    def outputs(self, job_id: int) -> dict[str, tuple[str, str]]:
        """Return the written outputs of a job: kind → (relative path, SOPInstanceUID)."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT kind, path, sop_instance_uid FROM job_outputs WHERE job_id = ?", (job_id,)
            ).fetchall()
        return {row[0]: (row[1], row[2]) for row in rows}

    def record_send(
        self,
        job_id: int,
        destination: str,
        kind: str,
        sop_instance_uid: str,
        *,
        sent: bool,
        status: int | None,
        error_comment: str,
        reason: str,
    ) -> None:
        """Store the outcome of sending one output to one destination."""
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT OR REPLACE INTO job_sends VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, destination, kind, sop_instance_uid, int(sent), status, error_comment, reason, time.time()),
            )

    def sends(self, job_id: int) -> list[dict[str, Any]]:
        """Send outcomes of a job, one per destination and output kind."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT * FROM job_sends WHERE job_id = ? ORDER BY destination, kind", (job_id,)
            ).fetchall()
        return [dict(row) for row in rows]

    def events(self, job_id: int) -> list[dict[str, Any]]:
        """State changes of a job, oldest first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT at, state, message FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        return [dict(row) for row in rows]

    def active_job_count(self) -> int:
        """Number of jobs in received, scoring, writing or sending."""
        with self._lock:
            return int(
                self._connection.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE state IN ({', '.join('?' for _ in ACTIVE_STATES)})",
                    ACTIVE_STATES,
                ).fetchone()[0]
            )


def _cross_series(cursor: sqlite3.Cursor, series_uid: str) -> dict[str, str]:
    rows = cursor.execute(
        "SELECT DISTINCT c.sop_instance_uid, i.series_instance_uid FROM conflicts c"
        " JOIN instances i ON i.sop_instance_uid = c.sop_instance_uid"
        " WHERE c.series_instance_uid = ? AND i.series_instance_uid != c.series_instance_uid ORDER BY c.id",
        (series_uid,),
    ).fetchall()
    return {row[0]: row[1] for row in rows}


def with_job_id(reason: str, job_id: int) -> str:
    """Put the job's id into a series reason, written before the job existed as `cacs-node retry JOB`."""
    return reason.replace("cacs-node retry JOB", f"cacs-node retry {job_id}")


def _cross_series_reason(series_uid: str, moved: dict[str, str]) -> str:
    """Explain a series whose SOP Instance UIDs are already stored in another series."""
    uids = list(moved)
    shown = ", ".join(uids[:5]) + (f" and {len(uids) - 5} more" if len(uids) > 5 else "")
    others = ", ".join(sorted(set(moved.values())))
    return (
        f"series {series_uid} reuses {len(uids)} SOP Instance UID(s) ({shown}) already stored in series "
        f"{others}: a SOP Instance UID names one instance of one series, so the sender reused UIDs. "
        "The stored series is unchanged, and the new copies are kept in conflicts/ under the storage root "
        "and not scored. Check both series at the sender and re-send this one with new SOP Instance UIDs; "
        "`cacs-node retry JOB --keep-stored` deletes the copies"
    )


def _job_from_row(row: sqlite3.Row) -> Job:
    return Job(
        id=int(row["id"]),
        series_instance_uid=row["series_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        state=row["state"],
        reason=row["reason"],
        instance_count=int(row["instance_count"]),
        fingerprint=row["fingerprint"],
        model_version=row["model_version"],
        force=bool(row["force"]),
        supersedes_job_id=row["supersedes_job_id"],
        result=json.loads(row["result_json"]) if row["result_json"] else None,
        attempts=int(row["attempts"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )
