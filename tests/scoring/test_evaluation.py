"""Tests of the lesion-threshold calibration and the calibrate command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scoring import checkpoint, evaluation, inference, model
from tests.scoring.test_inference import _small_chest, _volume


class _HuRule(torch.nn.Module):
    """Region LAD everywhere; CAC logit (HU − 500) / 100, so P(CAC) > 0.5 above 500 HU."""

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hu = inputs[:, 0] * 3300.0 - 2000.0
        region = torch.zeros(inputs.shape[0], 4, *inputs.shape[2:])
        region[:, 1] = 1.0
        lesion = torch.stack([torch.zeros_like(hu), (hu - 500.0) / 100.0], dim=1)
        return region, lesion


def _calibration_case() -> evaluation.EvaluationCase:
    """A LAD lesion at 700 HU (P(CAC) 0.88), bone at 550 HU (0.62) and at 300 HU (0.12)."""
    hu = _small_chest(1)
    hu[hu > 130] = 40.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    hu[0, 100:104, 100:104] = 700.0
    labels[0, 100:104, 100:104] = 1
    hu[0, 150:155, 100:105] = 550.0
    hu[0, 150:155, 150:155] = 300.0
    return evaluation.EvaluationCase("calibration", _volume(hu), labels)


def _hu_rule_model() -> inference.LoadedModel:
    return inference.LoadedModel(_HuRule(), "mtl", "hu-rule", torch.device("cpu"))


def test_lesion_threshold_sweep_counts_each_decision():
    results = evaluation.lesion_threshold_sweep(
        _hu_rule_model(), [_calibration_case()], [0.6, 0.7, 0.9]
    )
    table = [
        (result.threshold, result.counts.true_positives, result.counts.false_positives,
         result.counts.false_negatives)
        for result in results
    ]
    # 16 lesion pixels; the 25 bone pixels at 550 HU pass the argmax rule and 0.6.
    assert table == [(None, 16, 25, 0), (0.6, 16, 25, 0), (0.7, 16, 0, 0), (0.9, 0, 0, 16)]
    assert evaluation.best_threshold(results).threshold == 0.7


def test_best_threshold_equal_f1_prefers_fewer_errors():
    counts = evaluation.metrics.DetectionCounts
    results = [
        evaluation.ThresholdResult(None, counts(0, 861, 40)),
        evaluation.ThresholdResult(0.6, counts(0, 7, 40)),
        evaluation.ThresholdResult(0.7, counts(0, 7, 40)),
    ]
    # Every F1 is 0; the fewest errors win, and the earlier of two equal results.
    assert evaluation.best_threshold(results).threshold == 0.6


def test_lesion_threshold_sweep_invalid_threshold_raises():
    with pytest.raises(ValueError, match="lesion threshold must lie strictly between 0 and 1"):
        evaluation.lesion_threshold_sweep(_hu_rule_model(), [_calibration_case()], [0.5, 1.0])


def _saved_model(path: Path) -> Path:
    torch.manual_seed(0)
    network = model.MultiTaskUNet()
    checkpoint.save_checkpoint(
        path, checkpoint.Checkpoint("mtl", network.state_dict(), {"model_name": "mtl-test"})
    )
    return path


def test_write_calibrated_model_sets_threshold_and_version(tmp_path: Path):
    source = _saved_model(tmp_path / "model.pt")
    results = evaluation.lesion_threshold_sweep(
        _hu_rule_model(), [_calibration_case()], [0.6, 0.7]
    )
    chosen = evaluation.best_threshold(results)
    version = evaluation.write_calibrated_model(
        source, tmp_path / "calibrated.pt", chosen, results, ["calibration"]
    )
    weights_hash = checkpoint.load_checkpoint(source).weights_sha256
    assert version == f"mtl-test-{weights_hash[:12]}-t0.7"

    loaded = inference.load_model(tmp_path / "calibrated.pt", device="cpu")
    assert loaded.lesion_threshold == 0.7
    assert loaded.model_version == version
    calibration = loaded.metadata["lesion_threshold_calibration"]
    assert calibration["series"] == ["calibration"]
    assert [row["threshold"] for row in calibration["results"]] == [None, 0.6, 0.7]
    assert calibration["results"][2]["false_positives"] == 0


def test_write_calibrated_model_argmax_choice_drops_threshold(tmp_path: Path):
    source = _saved_model(tmp_path / "model.pt")
    argmax = evaluation.ThresholdResult(None, evaluation.metrics.DetectionCounts(5, 0, 0))
    earlier = evaluation.ThresholdResult(0.8, evaluation.metrics.DetectionCounts(4, 0, 1))
    evaluation.write_calibrated_model(source, tmp_path / "first.pt", earlier, [earlier], ["a"])
    version = evaluation.write_calibrated_model(
        tmp_path / "first.pt", tmp_path / "second.pt", argmax, [argmax, earlier], ["a"]
    )
    loaded = inference.load_model(tmp_path / "second.pt", device="cpu")
    assert loaded.lesion_threshold is None
    assert not version.endswith("-t0.8")


def test_parse_thresholds_range_and_list():
    import argparse

    from node.commands.calibrate import parse_thresholds

    assert parse_thresholds("0.6:0.7:0.05") == [0.6, 0.65, 0.7]
    assert parse_thresholds("0.5:0.53:0.02") == [0.5, 0.52]
    assert parse_thresholds("0.9:0.99:0.1") == [0.9]
    assert parse_thresholds("0.55,0.8") == [0.55, 0.8]
    with pytest.raises(argparse.ArgumentTypeError, match="STOP is below START"):
        parse_thresholds("0.9:0.5:0.1")
    with pytest.raises(argparse.ArgumentTypeError, match="each must lie strictly between 0 and 1"):
        parse_thresholds("0.5,1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected START:STOP:STEP"):
        parse_thresholds("0.5:0.9")


def test_parse_thresholds_caps_the_count():
    import argparse

    from node.commands.calibrate import parse_thresholds

    assert len(parse_thresholds("0.001:0.999:0.001")) == 999
    with pytest.raises(argparse.ArgumentTypeError, match="name 45,001 values; .* at most 1,000"):
        parse_thresholds("0.5:0.95:0.00001")
    with pytest.raises(argparse.ArgumentTypeError, match="name 1,001 values; give at most 1,000"):
        parse_thresholds(",".join(["0.5"] * 1001))


def test_calibrate_command_writes_calibrated_copy(tmp_path: Path, capsys):
    from node.cli import main

    source = _saved_model(tmp_path / "model.pt")
    # The first 2 slices of phantom seed 1007 hold coronary calcium.
    status = main([
        "calibrate", str(source), str(tmp_path / "new" / "calibrated.pt"), "--phantom-seeds",
        "1007", "--phantom-slices", "2", "--thresholds", "0.6,0.9", "--device", "cpu",
        "--threads", "1",
    ])
    output = capsys.readouterr().out
    assert status == 0
    assert "| argmax" in output
    assert "| P(CAC) > 0.9" in output
    assert "(chosen)" in output
    assert f"wrote {tmp_path / 'new' / 'calibrated.pt'}" in output
    saved = checkpoint.load_checkpoint(tmp_path / "new" / "calibrated.pt")
    assert saved.training_state is None
    calibration = saved.metadata["lesion_threshold_calibration"]
    assert calibration["series"] == ["phantom-1007 (2 slices)"]
    assert [row["threshold"] for row in calibration["results"]] == [None, 0.6, 0.9]


def test_calibrate_command_without_calcium_exits_2(tmp_path: Path, capsys):
    from node.cli import main

    source = _saved_model(tmp_path / "model.pt")
    # The first 2 slices of phantom seed 1000 hold no coronary calcium.
    status = main([
        "calibrate", str(source), str(tmp_path / "calibrated.pt"), "--phantom-seeds", "1000",
        "--phantom-slices", "2", "--device", "cpu", "--threads", "1",
    ])
    assert status == 2
    assert "contain no coronary calcium, so no threshold can be judged" in capsys.readouterr().err
    assert not (tmp_path / "calibrated.pt").exists()


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("model.pt", "is also an input of this command; give a new path"),
        ("folder", "is a folder; give the path of a new file"),
        ("model.pt/x.pt", "is a file, not a folder"),
    ],
)
def test_calibrate_command_bad_output_exits_2(tmp_path: Path, capsys, output: str, message: str):
    from node.cli import main

    source = _saved_model(tmp_path / "model.pt")
    (tmp_path / "folder").mkdir()
    assert main(["calibrate", str(source), str(tmp_path / output), "--phantom-seeds", "1000"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--batch-size", "0"], "invalid number 0: expected 1 or more"),
        (["--threads", "-1"], "invalid number -1: expected 1 or more"),
        (["--phantom-slices", "x"], "invalid number 'x': expected a whole number"),
    ],
)
def test_calibrate_command_bad_numbers_exit_2(tmp_path: Path, capsys, options, message):
    from node.cli import main

    with pytest.raises(SystemExit) as raised:
        main(["calibrate", "default", str(tmp_path / "out.pt"), *options])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_calibrate_command_one_slice_phantom_exits_2(tmp_path: Path, capsys):
    from node.cli import main

    source = _saved_model(tmp_path / "model.pt")
    status = main([
        "calibrate", str(source), str(tmp_path / "out.pt"), "--phantom-seeds", "1000",
        "--phantom-slices", "1", "--device", "cpu",
    ])
    assert status == 2
    assert "slices is 1; expected 2–200" in capsys.readouterr().err


def test_evaluate_command_prints_versions_and_strict_json(tmp_path: Path, capsys):
    import json

    from node.cli import main

    source = _saved_model(tmp_path / "model.pt")
    # The version is the metadata's model name and the weights' hash (no threshold: argmax).
    version = "mtl-test-" + checkpoint.load_checkpoint(source).weights_sha256[:12]
    status = main([
        "evaluate", "--model", f"random={source}", "--phantom-seeds", "1007",
        "--phantom-slices", "2", "--json", str(tmp_path / "out.json"), "--device", "cpu",
        "--threads", "1", "--runtime", "torch",
    ])
    assert status == 0
    assert f"random: model {version}" in capsys.readouterr().out

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not valid JSON")

    document = json.loads((tmp_path / "out.json").read_text(), parse_constant=reject)
    assert document["model_versions"] == {"random": version}
    assert document["series"] == ["phantom-1007"]


def test_evaluate_command_missing_data_folder_exits_2(tmp_path: Path, capsys):
    from node.cli import main

    status = main(["evaluate", "--data", str(tmp_path / "absent")])
    assert status == 2
    assert f"annotated data folder {tmp_path / 'absent'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("model.pt", "is also an input of this command; give a new path"),
        ("folder", "is a folder; give the path of a new file"),
        ("model.pt/report.json", "is a file, not a folder"),
    ],
)
def test_evaluate_command_bad_json_path_exits_2(tmp_path: Path, capsys, output: str, message: str):
    from node.cli import main

    source = _saved_model(tmp_path / "model.pt")
    before = source.read_bytes()
    (tmp_path / "folder").mkdir()
    status = main([
        "evaluate", "--model", str(source), "--json", str(tmp_path / output),
        "--phantom-seeds", "2000", "--phantom-slices", "2",
    ])
    assert status == 2
    assert message in capsys.readouterr().err
    assert source.read_bytes() == before


def test_evaluate_command_repeated_model_name_exits_2(tmp_path: Path, capsys):
    from node.cli import main

    first = _saved_model(tmp_path / "first" / "best.pt")
    second = _saved_model(tmp_path / "second" / "best.pt")
    status = main(["evaluate", "--model", str(first), "--model", str(second),
                   "--phantom-seeds", "2000", "--phantom-slices", "2"])
    assert status == 2
    assert "model name best is given more than once" in capsys.readouterr().err


def test_evaluate_command_json_over_default_model_exits_2(tmp_path: Path, capsys, monkeypatch):
    import scoring.inference
    from node.cli import main

    shipped = _saved_model(tmp_path / "shipped.pt")
    before = shipped.read_bytes()
    monkeypatch.setattr(scoring.inference, "default_model_path", lambda: shipped)
    status = main(["evaluate", "--json", str(shipped), "--phantom-seeds", "2000",
                   "--phantom-slices", "2"])
    assert status == 2
    assert "is also an input of this command; give a new path" in capsys.readouterr().err
    assert shipped.read_bytes() == before


def test_evaluate_command_warns_on_training_series(capsys):
    from node.cli import main

    status = main(["evaluate", "--phantom-seeds", "5,2001", "--phantom-slices", "2", "--device", "cpu",
                   "--threads", "1", "--runtime", "torch"])

    assert status == 0
    # The shipped model was trained on phantom seeds 0-99.
    assert ("cacs-node evaluate: model default: warning: 1 of the 2 series were training series of this "
            "model (phantom-5), so its results on them overstate it") in capsys.readouterr().err


def test_seen_in_training_reads_the_listed_names():
    metadata = {"training_data": {"training": {"names": ["phantom-1", "case-a"]}}}
    assert checkpoint.seen_in_training(metadata, ["case-a", "phantom-2", "phantom-1"]) == ["case-a", "phantom-1"]
    assert checkpoint.seen_in_training({}, ["phantom-1"]) == []
    assert checkpoint.seen_in_training({"training_data": {"training": {"names": "phantom-1"}}}, ["phantom-1"]) == []


def test_training_summary_lists_all_names():
    from types import SimpleNamespace

    from scoring.training import summarise_cases

    cases = [SimpleNamespace(name=f"phantom-{seed}", hu=np.zeros((3, 2, 2)), labelled_slices=2,
                             calcium_slices=[1]) for seed in range(250)]
    summary = summarise_cases(cases)

    assert (summary["series"], summary["slices"], summary["labelled_slices"], summary["calcium_slices"]) == (
        250, 750, 500, 250)
    metadata = {"training_data": {"training": summary}}
    assert checkpoint.seen_in_training(metadata, ["phantom-249", "phantom-250", "phantom-0"]) == [
        "phantom-249", "phantom-0"]
