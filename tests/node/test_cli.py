"""Tests of node.cli: options shared by all subcommands and a closed standard output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.cli import EXIT_BROKEN_PIPE, build_parser, main
from node.jobs import InstanceRecord, JobStore
from node.storage import InstanceStore


def test_parser_log_level_after_subcommand_accepted() -> None:
    args = build_parser().parse_args(["status", "--log-level", "DEBUG"])

    assert args.log_level == "DEBUG"


def test_parser_log_level_before_subcommand_kept() -> None:
    args = build_parser().parse_args(["--log-level", "ERROR", "status"])

    # The subcommand's own option is absent, so the value given before it stays.
    assert args.log_level == "ERROR"


def test_main_log_level_after_subcommand_sets_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    levels: list[int] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **options: levels.append(options["level"]))
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nroot = "{tmp_path / "empty"}"\n', encoding="utf-8")

    # No job database yet: status reports no jobs, after logging was configured.
    assert main(["status", "--config", str(path), "--log-level", "DEBUG"]) == 0
    assert levels == ["DEBUG"]


def test_main_version_prints_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--version"])

    assert raised.value.code == 0
    # pyproject.toml and scoring.__version__ both give 1.0.0.
    assert capsys.readouterr().out == "cacs-node 1.0.0\n"


def test_main_closed_stdout_exits_quietly(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    store = InstanceStore(root, 0)
    store.create_layout()
    jobs = JobStore(store.database_path)
    record = InstanceRecord("1.2.3.1", "1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            "incoming/a.dcm", "0" * 64, 10, time.time())
    jobs.record_instance(record, "1.2")
    jobs.open_job_for_series("1.2.3")
    jobs.close()
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nroot = "{root}"\n', encoding="utf-8")

    # A pipe whose read end is already closed, like `| head -1` after its first line.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "node.cli", "status", "--config", str(path)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )
    finally:
        os.close(write_end)

    assert completed.returncode == EXIT_BROKEN_PIPE == 141
    assert completed.stderr == ""


def test_main_interrupted_exits_130(monkeypatch, capsys):
    import node.cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(node.cli, "_run", interrupted)
    assert main(["status"]) == 130
    assert capsys.readouterr().err == "cacs-node: interrupted\n"


def test_score_help_lists_exit_statuses(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["score", "--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 scored; 2 the series" in text
    assert "3 the segmentation model cannot be loaded or run; 130 interrupted" in text


def test_library_noise_quiets_highdicom():
    from node.logs import reduce_library_log_noise

    highdicom = logging.getLogger("highdicom")
    root = logging.getLogger()
    saved = (highdicom.level, root.level)
    try:
        highdicom.setLevel(logging.NOTSET)
        root.setLevel(logging.INFO)
        reduce_library_log_noise()
        assert highdicom.getEffectiveLevel() == logging.WARNING

        highdicom.setLevel(logging.NOTSET)
        root.setLevel(logging.DEBUG)
        reduce_library_log_noise()
        assert highdicom.getEffectiveLevel() == logging.DEBUG
    finally:
        highdicom.setLevel(saved[0])
        root.setLevel(saved[1])


def test_demo_unwritable_work_dir_exits_two(capsys):
    assert main(["demo", "--work-dir", "/proc/cacs-node-demo"]) == 2
    assert "cacs-node demo: cannot create the working folder /proc/cacs-node-demo" in capsys.readouterr().err
