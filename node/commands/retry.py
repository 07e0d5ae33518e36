"""`cacs-node retry JOB`: put a failed or refused job back for the running node."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.config import NodeSettings
    from node.jobs import InstanceRecord, JobStore
    from node.storage import InstanceStore

HELP = ("retry a failed or refused job; resolve a conflicting series with --keep-stored or --take-new, "
        "or set a damaged instance aside with --remove-instance")

logger = logging.getLogger(__name__)


class RetryError(ValueError):
    """The job cannot be retried as requested; the message states what to do."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", type=int, help="job id as listed by `cacs-node status`")
    parser.add_argument(
        "--config",
        default=None,
        help="settings file naming the storage root (default: $CACS_NODE_CONFIG, else ./node.toml)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="score again even when the job is done or was scored with the same model version",
    )
    parser.add_argument(
        "--remove-instance",
        action="append",
        default=[],
        metavar="SOP_INSTANCE_UID",
        help="set this instance of the job's series aside under <storage root>/removed and score the "
             "series without it, e.g. the damaged instance a refused job names; repeat for several",
    )
    resolution = parser.add_mutually_exclusive_group()
    resolution.add_argument(
        "--keep-stored",
        action="store_true",
        help="for a conflicting series: keep the first copy of each instance and delete the re-sent copies",
    )
    resolution.add_argument(
        "--take-new",
        action="store_true",
        help="for a conflicting series: replace each instance with its latest re-sent copy",
    )


def retry_job(
    settings: NodeSettings,
    job_id: int,
    *,
    force: bool = False,
    keep_stored: bool = False,
    take_new: bool = False,
    remove: Sequence[str] = (),
) -> str:
    """Resolve a series conflict or set instances aside if asked, then put the job back for the node's worker.

    remove: SOPInstanceUIDs of the job's series to move from the series to
        the storage root's removed folder; the file is kept, not deleted.

    A job that failed while sending keeps its outputs and sends only what was
    not stored, unless `force`; any other job is scored again.

    Returns:
        A sentence describing what was done.

    Raises:
        RetryError: the job is still running, is done without `force`, has
            a conflict and neither `keep_stored` nor `take_new` was given, or
            has no conflict and one of them was given, or an instance of
            `remove` is not in the job's series or is its last instance.
        node.jobs.JobStoreError: no such job.
    """
    from node.jobs import ACTIVE_STATES, DONE, FAILED, JobStore
    from node.storage import InstanceStore, NodeLock

    store = InstanceStore(settings.storage.root, settings.storage.min_free_space_mb)
    if not store.database_path.is_file():
        raise RetryError(f"no job database at {store.database_path}; check [storage] root")
    jobs = JobStore(store.database_path)
    try:
        job = jobs.job(job_id)
        if job.state in ACTIVE_STATES:
            raise RetryError(f"job {job_id} is still {job.state}; wait until it is done, failed or refused")
        if job.state == DONE and not force:
            raise RetryError(f"job {job_id} is done; add --force to score it again")

        conflict = jobs.series_conflict(job.series_instance_uid)
        if not conflict and (keep_stored or take_new):
            option = "--keep-stored" if keep_stored else "--take-new"
            raise RetryError(
                f"job {job_id}: series {job.series_instance_uid} has no conflicting instances, so {option} "
                f"has nothing to resolve; run `cacs-node retry {job_id}` without it"
            )
        resolved = ""
        moved = jobs.cross_series_conflicts(job.series_instance_uid) if conflict else {}
        if take_new and moved:
            sop_uid, other = next(iter(moved.items()))
            raise RetryError(
                f"job {job_id}: --take-new would move instance {sop_uid} out of series {other} into series "
                f"{job.series_instance_uid}; use --keep-stored and re-send the series with new SOP Instance UIDs"
            )
        if conflict:
            if not (keep_stored or take_new):
                raise RetryError(
                    f"job {job_id}: {conflict}. Add --keep-stored or --take-new to say which copies to score"
                )
            resolved = _resolve_conflict(store, jobs, job.series_instance_uid, take_new=take_new)

        if remove:
            set_aside = _set_aside(store, jobs, job_id, job.series_instance_uid, remove, settings.path)
            resolved = f"{resolved} and {set_aside}" if resolved else set_aside

        resend_only = job.state == FAILED and not force and not resolved and _outputs_present(store, jobs, job_id)
        note = "retried by an operator" + (f" after {resolved}" if resolved else "")
        jobs.requeue(job_id, force=force, note=note, resend_only=resend_only)
        action = "sends the outputs not yet stored" if resend_only else "scores the series again"
        logger.info("job %d study %s series %s: %s; the node %s", job_id, job.study_instance_uid,
                    job.series_instance_uid, note, action)
        node = "the running node" if NodeLock.holder(store.root) is not None else "the node, once started,"
        return f"job {job_id} queued: {node} {action}" + (f" ({resolved})" if resolved else "")
    finally:
        jobs.close()


def _outputs_present(store: InstanceStore, jobs: JobStore, job_id: int) -> bool:
    outputs = jobs.outputs(job_id)
    return bool(outputs) and all(store.absolute(path).is_file() for path, _uid in outputs.values())


def _resolve_conflict(store: InstanceStore, jobs: JobStore, series_uid: str, *, take_new: bool) -> str:
    from pydicom import dcmread

    conflicts = jobs.conflicts_of_series(series_uid)
    replacements: dict[str, tuple[str, str, str]] = {}
    if take_new:
        latest = {row["sop_instance_uid"]: row for row in conflicts}
        for sop_uid, row in latest.items():
            record = jobs.find_instance(sop_uid)
            if record is None:
                continue
            source = store.absolute(row["path"])
            target = store.absolute(record.path)
            transfer_syntax = str(dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            store.write_atomically(target, source.read_bytes())
            replacements[sop_uid] = (record.path, row["digest"], transfer_syntax)
    jobs.resolve_conflicts(series_uid, replacements)
    for row in conflicts:
        store.absolute(row["path"]).unlink(missing_ok=True)
    if take_new:
        return f"replaced {len(replacements)} instance(s) with their re-sent copies"
    return f"kept the stored copies and deleted {len(conflicts)} re-sent copy(ies)"


def _set_aside(
    store: InstanceStore, jobs: JobStore, job_id: int, series_uid: str, remove: Sequence[str],
    settings_path: Path | None,
) -> str:
    """Move the instances `remove` of a series to the removed folder, unregister them and describe what was done.

    settings_path: the settings file to name in the status command that errors suggest.
    """
    from node.config import config_option

    uids = list(dict.fromkeys(uid.strip() for uid in remove))
    stored = {record.sop_instance_uid for record in jobs.series_instances(series_uid)}
    unknown = [uid for uid in uids if uid not in stored]
    if unknown:
        raise RetryError(
            f"job {job_id}: series {series_uid} has no stored instance {', '.join(unknown)}; "
            f"`cacs-node status{config_option(settings_path)} {job_id}` names the series "
            "and its refusal reason names the instance"
        )
    if len(uids) == len(stored):
        raise RetryError(
            f"job {job_id}: removing {len(uids)} instance(s) would leave series {series_uid} empty; "
            "re-send the series instead"
        )

    missing: list[str] = []

    def move(record: InstanceRecord) -> None:
        source = store.absolute(record.path)
        if not source.exists():
            logger.warning("instance %s: its file %s is already gone; unregistering it", record.sop_instance_uid, source)
            missing.append(record.sop_instance_uid)
            return
        target = store.removed_path(series_uid, record.sop_instance_uid, record.digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)

    for uid in uids:
        try:
            jobs.remove_instance(uid, move)
        except OSError as error:
            raise RetryError(
                f"job {job_id}: cannot move instance {uid} to {store.removed} ({error.strerror}); it stays in the "
                "series; check that the node's user may write under the storage root"
            ) from error
        logger.info("job %d series %s: instance %s set aside under %s", job_id, series_uid, uid, store.removed)
    moved = [uid for uid in uids if uid not in missing]
    described = [f"set aside instance(s) {', '.join(moved)} under {store.removed}"] if moved else []
    if missing:
        described.append(f"unregistered instance(s) {', '.join(missing)}, whose file was already gone")
    return " and ".join(described)


def run(args: argparse.Namespace) -> int:
    from node.config import ConfigError, default_config_path, load_settings
    from node.jobs import JobStoreError

    path = args.config or default_config_path()
    try:
        settings = load_settings(path)
    except ConfigError as error:
        print(f"cacs-node retry: {error}", file=sys.stderr)
        return 2
    try:
        message = retry_job(settings, args.job, force=args.force, keep_stored=args.keep_stored,
                            take_new=args.take_new, remove=args.remove_instance)
    except (RetryError, JobStoreError) as error:
        print(f"cacs-node retry: {error}", file=sys.stderr)
        return 1
    print(message)
    return 0
