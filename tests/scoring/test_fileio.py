"""Tests of atomic file writes: complete files, permissions, and no partial file on failure."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from scoring.fileio import atomic_path, atomic_write_bytes, atomic_writer


def test_atomic_write_bytes_new_folder_writes_file(tmp_path: Path) -> None:
    target = tmp_path / "new" / "data.bin"

    atomic_write_bytes(target, b"\x00\x01calcium")

    assert target.read_bytes() == b"\x00\x01calcium"
    # mkstemp creates 0600; written files are made 0644 like ordinary files.
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(path.name for path in target.parent.iterdir()) == ["data.bin"]


def test_atomic_writer_error_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "truth.json"
    target.write_text("old", encoding="utf-8")

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_writer(target, "w", encoding="utf-8") as stream:
            stream.write("new, but never finished")
            raise RuntimeError("disk full")

    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["truth.json"]


def test_atomic_writer_append_mode_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode is 'ab'; expected 'wb' or 'w'"):
        with atomic_writer(tmp_path / "x", "ab"):
            pass


def test_atomic_path_temporary_keeps_extension(tmp_path: Path) -> None:
    target = tmp_path / "labels.nii.gz"

    with atomic_path(target) as temporary:
        seen_name = temporary.name
        assert not target.exists()
        temporary.write_bytes(b"image")

    assert seen_name.startswith(".partial-")
    assert seen_name.endswith(".tmp-labels.nii.gz")
    assert target.read_bytes() == b"image"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels.nii.gz"]


def test_atomic_writer_temporary_ends_in_tmp(tmp_path: Path) -> None:
    target = tmp_path / "1.2.3.dcm"

    with atomic_writer(target) as stream:
        names = [path.name for path in tmp_path.iterdir()]
        stream.write(b"DICM")

    # A half-written object never carries the .dcm suffix of a finished one.
    assert len(names) == 1
    assert names[0].startswith(".partial-")
    assert names[0].endswith(".tmp")
    assert target.read_bytes() == b"DICM"
