"""Files under the storage root: received instances, conflicting copies and outputs.

Layout under `[storage] root`:

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    conflicts/<SeriesInstanceUID>/<SOPInstanceUID>.<digest prefix>.dcm
    outputs/job-<id>/<SOPInstanceUID>.dcm
    jobs.sqlite3 (node.jobs)

Every file is written to a temporary name in its final folder, fsynced, then
renamed, so a crash leaves either the complete file or a temporary file that
`remove_stale_temporaries` deletes at the next start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from pathlib import Path

# Temporary names of atomic writes; `remove_stale_temporaries` deletes those a crash left.
from scoring.fileio import TEMPORARY_PREFIX, TEMPORARY_SUFFIX, atomic_write_bytes

logger = logging.getLogger(__name__)

INCOMING_FOLDER = "incoming"
CONFLICTS_FOLDER = "conflicts"
OUTPUTS_FOLDER = "outputs"
#: Instances an operator set aside with `cacs-node retry --remove-instance`, kept for inspection.
REMOVED_FOLDER = "removed"
DATABASE_NAME = "jobs.sqlite3"
#: File under the storage root that a running node keeps locked, with its process ID.
LOCK_NAME = "node.lock"

#: A UID as PS3.5 section 9.1 defines it: digits and dots, at most 64 characters.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNSAFE_CHARACTERS = re.compile(r"[^0-9A-Za-z._-]")


class StorageError(OSError):
    """A path or file under the storage root cannot be used."""


def is_valid_uid(value: str) -> bool:
    """Tell whether `value` is a UID of digits and dots, 1 to 64 characters long."""
    return 0 < len(value) <= 64 and bool(_UID_PATTERN.match(value))


def clean_path_part(value: str) -> str:
    """Turn a UID (or any identifier) into one safe path component.

    Characters other than letters, digits, dot, hyphen and underscore become
    "_", so the result never contains a path separator.

    Raises:
        StorageError: the cleaned value is empty, "." or "..".
    """
    cleaned = _UNSAFE_CHARACTERS.sub("_", value.strip())
    if cleaned in ("", ".", ".."):
        raise StorageError(f"identifier {value!r} cannot be used as a file or folder name")
    return cleaned


class NodeLock:
    """The lock a running node holds on its storage root, so no second node shares it.

    `acquire` takes an exclusive lock on `LOCK_NAME` under the root and writes
    the process ID there. The operating system drops the lock when the
    process ends, even after a crash. `holder` returns whether a node runs
    on the root, for other commands.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._descriptor: int | None = None

    def acquire(self) -> None:
        """Lock the storage root for this process.

        Raises:
            StorageError: another process holds the lock, or the file cannot be opened.
        """
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StorageError(f"cannot open the lock file {self.path}: {error.strerror}") from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_process_id(descriptor)
            os.close(descriptor)
            raise _busy_error(self.path.parent, holder) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._descriptor = descriptor

    def release(self) -> None:
        """Unlock the storage root; the file stays for the next start."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    @staticmethod
    def check_free(root: Path) -> None:
        """Raise StorageError when a node holds `root`, without taking the lock."""
        holder = NodeLock.holder(root)
        if holder is not None:
            raise _busy_error(Path(root), holder)

    @staticmethod
    def holder(root: Path) -> int | None:
        """Return the process ID of the node that has `root` locked: 0 when unknown, None when no node has."""
        try:
            descriptor = os.open(Path(root) / LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_process_id(descriptor)
        finally:
            os.close(descriptor)
        return None


def _busy_error(root: Path, holder: int) -> StorageError:
    process = f" (process {holder})" if holder else ""
    return StorageError(
        f"another cacs-node serve{process} uses the storage root {root}; stop it, or give this "
        "node its own [storage] root"
    )


def _read_process_id(descriptor: int) -> int:
    """Read the process ID written in a lock file; 0 when it holds none."""
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


class InstanceStore:
    """The folders under the storage root and atomic writes into them.

    root: the storage root; created with its sub-folders by `create_layout`.
    min_free_space_mb: free space, in MiB, below which `has_free_space` is False.
    """

    def __init__(self, root: Path, min_free_space_mb: int) -> None:
        self.root = Path(root).resolve()
        self.min_free_space_mb = min_free_space_mb
        self.incoming = self.root / INCOMING_FOLDER
        self.conflicts = self.root / CONFLICTS_FOLDER
        self.outputs = self.root / OUTPUTS_FOLDER
        self.removed = self.root / REMOVED_FOLDER
        self.database_path = self.root / DATABASE_NAME

    def create_layout(self) -> None:
        """Create the storage root and its sub-folders when missing.

        Raises:
            StorageError: a folder cannot be created (permissions, a file in the way).
        """
        for folder in (self.root, self.incoming, self.conflicts, self.outputs):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StorageError(
                    f"cannot create storage folder {folder}: {error.strerror}; check [storage] root "
                    "and that the node's user may write there"
                ) from error

    def free_space_bytes(self) -> int:
        """Free space on the file system of the storage root, in bytes, for this user."""
        return shutil.disk_usage(self.root).free

    def has_free_space(self) -> bool:
        """Tell whether the free space is at least `min_free_space_mb` MiB."""
        return self.free_space_bytes() >= self.min_free_space_mb * 1024 * 1024

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Path of a received instance, checked to stay under the storage root.

        Raises:
            StorageError: a UID cannot be a path component, or the path leaves the root.
        """
        path = (
            self.incoming
            / clean_path_part(study_uid)
            / clean_path_part(series_uid)
            / f"{clean_path_part(sop_instance_uid)}.dcm"
        )
        return self.checked(path)

    def conflict_path(self, series_uid: str, sop_instance_uid: str, digest: str) -> Path:
        """Path of a re-sent instance whose content differs from the stored one."""
        return self._path_with_digest(self.conflicts, series_uid, sop_instance_uid, digest)

    def removed_path(self, series_uid: str, sop_instance_uid: str, digest: str) -> Path:
        """Path under which an instance set aside from its series is kept.

        The name carries the content digest, so a later copy of the same
        instance, set aside again, does not replace the first one.
        """
        return self._path_with_digest(self.removed, series_uid, sop_instance_uid, digest)

    def _path_with_digest(self, folder: Path, series_uid: str, sop_instance_uid: str, digest: str) -> Path:
        name = f"{clean_path_part(sop_instance_uid)}.{clean_path_part(digest[:16])}.dcm"
        return self.checked(folder / clean_path_part(series_uid) / name)

    def output_folder(self, job_id: int) -> Path:
        """Folder of the SEG, SR and summary image written for one job."""
        return self.checked(self.outputs / f"job-{int(job_id)}")

    def checked(self, path: Path) -> Path:
        """Return `path` resolved, after checking that it lies under the storage root.

        Raises:
            StorageError: the resolved path is outside the root.
        """
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise StorageError(f"path {path} resolves to {resolved}, outside the storage root {self.root}")
        return resolved

    def relative(self, path: Path) -> str:
        """`path` relative to the storage root, as stored in the job database."""
        return str(self.checked(path).relative_to(self.root))

    def absolute(self, relative_path: str) -> Path:
        """Inverse of `relative`, checked to stay under the root."""
        return self.checked(self.root / relative_path)

    def write_atomically(self, path: Path, data: bytes) -> None:
        """Write `data` to `path` through a temporary file, fsync, rename and folder fsync.

        Raises:
            OSError: the folder cannot be created or the write fails; no partial
                file is left at `path`.
        """
        atomic_write_bytes(self.checked(path), data)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by an interrupted write; return how many were deleted."""
        removed = 0
        for folder in (self.incoming, self.conflicts, self.outputs):
            for path in folder.rglob(f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"):
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.warning("deleted %d temporary file(s) left by an interrupted write under %s", removed, self.root)
        return removed
