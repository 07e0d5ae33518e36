"""Tests of `cacs-node phantom`: files written, exit statuses and messages for bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli import main


def test_phantom_command_writes_case_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "case"

    status = main(["phantom", str(out_dir), "--seed", "3", "--size", "128", "--slices", "4", "--burden", "severe"])

    assert status == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["dicom", "labels.nrrd", "regions.nrrd", "truth.json"]
    assert len(list((out_dir / "dicom").glob("*.dcm"))) == 4
    truth = json.loads((out_dir / "truth.json").read_text())
    assert truth["phantom"]["burden"] == "severe"
    assert truth["phantom"]["slices"] == 4
    output = capsys.readouterr().out
    assert f"wrote 4 slices of series {truth['series_instance_uid']}" in output
    assert f"risk category {truth['risk_category']}" in output


def test_phantom_command_qrm_mode_writes_inserts(tmp_path: Path) -> None:
    status = main(["phantom", str(tmp_path), "--seed", "1", "--mode", "qrm", "--slices", "6", "--size", "256"])

    truth = json.loads((tmp_path / "truth.json").read_text())
    assert status == 0
    assert truth["phantom"]["mode"] == "qrm"
    # Three densities × three sizes.
    assert len(truth["phantom"]["inserts"]) == 9


def test_phantom_command_existing_output_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["phantom", str(tmp_path), "--seed", "1", "--size", "128", "--slices", "2"]) == 0
    capsys.readouterr()

    status = main(["phantom", str(tmp_path), "--seed", "2", "--size", "128", "--slices", "2"])

    assert status == 2
    assert "already contains files; choose an empty output folder" in capsys.readouterr().err


def test_phantom_command_qrm_with_burden_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["phantom", str(tmp_path), "--seed", "1", "--mode", "qrm", "--burden", "mild"])

    assert status == 2
    assert "apply to --mode patient only" in capsys.readouterr().err
    assert not (tmp_path / "dicom").exists()


def test_phantom_command_bad_size_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["phantom", str(tmp_path), "--seed", "1", "--size", "32"])

    assert status == 2
    assert "size is 32; expected 64–1024 pixels per side" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["patient", "qrm"])
def test_phantom_command_one_slice_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    status = main(["phantom", str(tmp_path), "--seed", "1", "--mode", mode, "--size", "128", "--slices", "1"])

    assert status == 2
    # `cacs-node score` rejects a 1-slice series, so the phantom must not write one.
    assert "slices is 1; expected 2–200 because the series loader needs at least 2 slices" in capsys.readouterr().err
    assert not (tmp_path / "dicom").exists()
    assert not (tmp_path / "truth.json").exists()
