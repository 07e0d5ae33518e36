"""Tests of `cacs-node demo`: its generated settings, its output checks, and one full run."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from node.commands.demo import DEMO_OUTPUTS, _missing_outputs, _settings_text
from node.config import parse_settings
from node.folder_scp import ReceivedObject

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _received(*sop_classes: str) -> list[ReceivedObject]:
    return [ReceivedObject(uid, f"1.2.3.{index}", Path(f"{index}.dcm")) for index, uid in enumerate(sop_classes)]


def test_settings_text_valid_local_node(tmp_path: Path) -> None:
    args = argparse.Namespace(device="cpu", quiet_period=2.0, model=None)

    settings = parse_settings(_settings_text(tmp_path, 40001, 40002, args), base_dir=tmp_path)

    assert (settings.node.ae_title, settings.node.bind_address, settings.node.port) == ("CACS_NODE", "127.0.0.1", 40001)
    assert [(peer.ae_title, peer.host) for peer in settings.peers] == [("DEMO_SCANNER", "127.0.0.1")]
    (destination,) = settings.destinations
    assert (destination.ae_title, destination.port) == ("DEMO_PACS", 40002)
    assert destination.outputs == frozenset(DEMO_OUTPUTS)
    assert settings.storage.root == tmp_path / "node"
    assert settings.scoring.quiet_period_s == 2.0
    assert settings.scoring.model_path is None


def test_settings_text_model_path_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.pt").write_bytes(b"checkpoint")
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(device="auto", quiet_period=1.0, model=Path("models/mine.pt"))

    # The settings live in the work folder, so a relative --model is made absolute first.
    settings = parse_settings(_settings_text(tmp_path / "work", 40001, 40002, args), base_dir=tmp_path / "work")

    assert settings.scoring.model_path == tmp_path / "models" / "mine.pt"


def test_missing_outputs_all_present_none_missing() -> None:
    result = {"agatston": {"total": 12.5}}

    assert _missing_outputs(_received(SEG, SR, SECONDARY_CAPTURE), result) == []


def test_missing_outputs_zero_calcium_seg_not_expected() -> None:
    result = {"agatston": {"total": 0.0}}

    assert _missing_outputs(_received(SR, SECONDARY_CAPTURE), result) == []


def test_missing_outputs_calcium_without_seg_reports_seg() -> None:
    result = {"agatston": {"total": 3.0}}

    assert _missing_outputs(_received(SR), result) == ["the summary image", "the SEG"]


@pytest.mark.slow
@pytest.mark.integration
def test_demo_command_default_model_exits_zero(tmp_path: Path) -> None:
    from scoring.inference import default_model_path, load_model

    if not default_model_path().is_file():
        pytest.skip(f"the default model {default_model_path()} is not there yet; the demo needs it")

    completed = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--work-dir", str(tmp_path), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "job 1: done after" in completed.stdout
    assert f"results received by DEMO_PACS in {tmp_path / 'results'}" in completed.stdout
    received = [dcmread(path, stop_before_pixels=True) for path in sorted((tmp_path / "results").glob("*.dcm"))]
    sop_classes = sorted(str(dataset.SOPClassUID) for dataset in received)
    total_line = next(line for line in completed.stdout.splitlines() if line.strip().startswith("total"))
    total_agatston = float(total_line.split()[1])
    # SR and summary image always; a SEG only when the model found coronary calcium.
    expected = sorted([SR, SECONDARY_CAPTURE] + ([SEG] if total_agatston > 0 else []))
    assert sop_classes == expected
    # The shipped model states that it saw only synthetic data, and the demo repeats it.
    shipped = load_model(None, "cpu")
    assert f"  model {shipped.model_version}" in completed.stdout.splitlines()
    assert f"  CAUTION, model: {shipped.caution}" in completed.stdout.splitlines()


def test_print_scores_risk_category_differs(capsys) -> None:
    from node.commands.demo import _print_scores

    truth = {"agatston": {"LAD": 0.0, "LCX": 0.0, "RCA": 7.4, "total": 7.4}, "risk_category": "II"}
    _print_scores({"agatston": {"total": 213.5}, "risk_category": "III", "cac_drs": "A2/N1"}, truth)
    lines = capsys.readouterr().out.splitlines()
    assert "  risk category: III, CAC-DRS: A2/N1" in lines
    assert lines[-1] == ("  the phantom's true risk category is II: the model's differs. Its accuracy on "
                         "held-out phantom series is in scoring/models/MODEL_CARD.md")

    _print_scores({"agatston": {"total": 9.0}, "risk_category": "II", "cac_drs": "A1/N1"}, truth)
    assert "true risk category" not in capsys.readouterr().out
