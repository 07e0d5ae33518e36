"""Atomic file writes: write to a temporary file in the target folder, fsync it, then rename it.

A reader of the target path opens either the old file or the complete new one,
never a partial file, because os.replace is atomic within one file system.
After the rename the folder is fsynced too (POSIX only), so the new name
survives a power loss.

Temporary files are named `.partial-<random>.tmp`, or end with
`.tmp-<target name>` when a writer needs the target's extension (SimpleITK
picks its file format from it). A crash can leave one behind; delete such
files before reading a folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

#: Name prefix and suffix of temporary files.
TEMPORARY_PREFIX = ".partial-"
TEMPORARY_SUFFIX = ".tmp"

#: Permissions of written files. mkstemp creates 0600, but outputs are ordinary readable files.
FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, keep_extension: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder and move it onto `path` when the block ends.

    path: the target file; its folder is created when missing.
    keep_extension: end the temporary name with the target's name, for
        writers that pick the format from the extension (SimpleITK with
        ".nrrd" or ".nii.gz"). Without it the name ends in ".tmp", so a
        reader of the folder never takes the file for a finished ".dcm".
    The writer must have written and closed the file when the block ends.
    The file is then fsynced, made FILE_MODE and renamed, and the folder
    fsynced. On an exception inside the block the temporary file is deleted,
    the target is left unchanged and the exception propagates. Raises OSError
    when the folder cannot be created or the fsync or rename fails.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = f"{TEMPORARY_SUFFIX}-{target.name}" if keep_extension else TEMPORARY_SUFFIX
    descriptor, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=suffix, dir=target.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)


@contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing and move it onto `path` when the block ends (see `atomic_path`).

    mode: "wb" for bytes or "w" for text (then pass `encoding`).
    Raises ValueError for another mode.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode is {mode!r}; expected 'wb' or 'w'")
    with atomic_path(path, keep_extension=False) as temporary:
        with open(temporary, mode, encoding=encoding) as stream:
            yield stream


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path) as stream:
        stream.write(data)


def fsync_folder(folder: Path) -> None:
    """Flush a folder entry so that a rename inside it survives a power loss (POSIX only)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
