"""Validation of written DICOM files with dicom3tools' dciodvfy, shared by the test packages."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

#: dciodvfy warnings that the node's outputs are known to produce, each with
#: its reason. docs/conformance.md lists them too.
ACCEPTED_WARNINGS: dict[str, str] = {
    # The node writes private codes in the "99CACS" scheme and declares it in
    # the Coding Scheme Identification Sequence. dciodvfy checks designators
    # against its list of registered schemes only.
    "Unrecognized defined term <99CACS>": "private coding scheme declared in (0008,0110)",
    # An empty StudyID is copied verbatim from a source that has an empty
    # one. Changing it would break the verbatim copy of the Study module.
    "needed to build DICOMDIR - Study ID": "empty StudyID copied from the source CT",
}


def run_dciodvfy(path: str | Path) -> list[str]:
    """Run dciodvfy on `path` and return its output lines (it writes its findings to stderr)."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        pytest.fail("dciodvfy not found on PATH; install the Debian package dicom3tools (scripts/test.sh does)")
    completed = subprocess.run(
        [executable, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return [line for line in (completed.stdout + completed.stderr).splitlines() if line.strip()]


def assert_dciodvfy_clean(path: str | Path, accepted: Iterable[str] = ACCEPTED_WARNINGS) -> list[str]:
    """Fail on any dciodvfy "Error" line or any warning outside `accepted`; return all warning lines.

    `accepted` contains substrings of warnings that are allowed, by default the
    justified ACCEPTED_WARNINGS.
    """
    lines = run_dciodvfy(path)
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], f"dciodvfy reports errors for {path}:\n" + "\n".join(lines)
    warnings = [line for line in lines if line.startswith("Warning")]
    accepted = tuple(accepted)
    unexpected = [line for line in warnings if not any(text in line for text in accepted)]
    assert unexpected == [], f"dciodvfy reports unexpected warnings for {path}:\n" + "\n".join(unexpected)
    return warnings
