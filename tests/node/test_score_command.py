"""Tests of `cacs-node score` on small CT series written to disk with a label map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.cli import main
from scoring.labels import write_label_map
from scoring.result import LAD, RCA
from scoring.series import load_series
from tests.factories import blank_hu, make_series_dir

PUBLIC_KEYS = (
    "series_instance_uid",
    "normalization_factor",
    "flags",
    "agatston",
    "volume_mm3",
    "mass_mg",
    "risk_category",
    "cac_drs",
    "lesions",
)


@pytest.fixture
def scored_case(tmp_path: Path) -> tuple[Path, Path, str]:
    """Write a 3-slice series (0.5 mm pixels, 3 mm apart) and its label map; return both paths and the UID.

    LAD: slice 0 has 4 × 4 pixels at 180 HU, slice 1 has 4 × 5 pixels at 450 HU.
    RCA: slice 2 has 2 × 2 pixels at 250 HU.
    """
    hu = blank_hu(3, 32, 32)
    hu[0, 4:8, 4:8] = 180.0
    hu[1, 4:8, 4:9] = 450.0
    hu[2, 10:12, 20:22] = 250.0
    datasets = make_series_dir(tmp_path / "dicom", hu, pixel_spacing=(0.5, 0.5))
    volume = load_series(tmp_path / "dicom")
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[:2][volume.hu[:2] >= 130] = LAD
    labels[2][volume.hu[2] >= 130] = RCA
    write_label_map(tmp_path / "labels.nrrd", labels, volume)
    return tmp_path / "dicom", tmp_path / "labels.nrrd", datasets[0].SeriesInstanceUID


def test_score_json_prints_public_keys_and_scores(
    scored_case: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, labels_path, series_uid = scored_case

    status = main(["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(labels_path), "--json"])

    document = json.loads(capsys.readouterr().out)
    assert status == 0
    for key in PUBLIC_KEYS:
        assert key in document
    assert document["series_instance_uid"] == series_uid
    # LAD: 16 px × 0.25 mm² = 4 mm² × 1 (180 HU) + 20 px × 0.25 = 5 mm² × 4 (450 HU) = 24.
    # RCA: 4 px × 0.25 = 1 mm² × 2 (250 HU) = 2. Factor 3 / 3 = 1.
    assert document["agatston"] == {"LAD": 24.0, "LCX": 0.0, "RCA": 2.0, "total": 26.0}
    # Volume: LAD 36 voxels × 0.25 mm² × 3 mm = 27 mm³, RCA 4 × 0.75 = 3 mm³.
    assert document["volume_mm3"] == {"LAD": 27.0, "LCX": 0.0, "RCA": 3.0, "total": 30.0}
    # Mass LAD: (16 × 180 + 20 × 450) HU × 0.75 mm³ / 1000 × 0.743 = 11880 × 0.00075 × 0.743.
    assert document["mass_mg"]["LAD"] == pytest.approx(11880 * 0.00075 * 0.743, rel=1e-12)
    assert document["normalization_factor"] == 1.0
    assert document["risk_category"] == "II"
    assert document["cac_drs"] == "A1/N2"
    assert [lesion["artery"] for lesion in document["lesions"]] == ["LAD", "RCA"]
    assert [flag["code"] for flag in document["flags"]] == ["MASS_UNCALIBRATED"]


def test_score_table_lists_arteries_and_risk(
    scored_case: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, labels_path, _ = scored_case

    status = main(["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(labels_path)])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert "LAD          24.0        27.0      6.62        1" in lines
    assert "RCA           2.0         3.0      0.56        1" in lines
    assert "Total        26.0        30.0      7.18        2" in lines
    assert "Risk category:        II" in lines
    assert "CAC-DRS:              A1/N2" in lines


def test_score_out_writes_seg_that_scores_the_same(
    scored_case: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, labels_path, _ = scored_case
    out_dir = tmp_path / "out"

    status = main(
        ["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(labels_path), "--json", "--out", str(out_dir)]
    )

    captured = capsys.readouterr()
    lines = [line.removeprefix("wrote ") for line in captured.err.splitlines() if line.startswith("wrote ")]
    written = [Path(line.rsplit(" ", 1)[1]) for line in lines]
    assert status == 0
    # SEG, SR and summary image, each named; the JSON object stays alone on standard output.
    assert [line.rsplit(" ", 1)[0] for line in lines] == ["calcium SEG", "SR", "summary image"]
    assert all(path.parent == out_dir and path.suffix == ".dcm" for path in written)
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(path.name for path in written)
    assert json.loads(captured.out)["agatston"]["total"] == 26.0

    # The first written object is the calcium SEG; scoring from it gives the same numbers.
    status = main(["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(written[0]), "--json"])
    assert status == 0
    assert json.loads(capsys.readouterr().out)["agatston"] == {"LAD": 24.0, "LCX": 0.0, "RCA": 2.0, "total": 26.0}


def test_score_missing_labels_exits_two(
    scored_case: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, _, _ = scored_case

    status = main(["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(tmp_path / "none.nrrd")])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert "none.nrrd not found" in captured.err


def test_score_labels_of_other_shape_exits_two(
    scored_case: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, _, _ = scored_case
    other_dir = tmp_path / "other"
    make_series_dir(other_dir, blank_hu(3, 16, 16), pixel_spacing=(0.5, 0.5))
    other_volume = load_series(other_dir)
    write_label_map(tmp_path / "small.nrrd", np.zeros(other_volume.shape, dtype=np.uint8), other_volume)

    status = main(["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(tmp_path / "small.nrrd")])

    assert status == 2
    assert "has (3, 16, 16) (slices, rows, columns) voxels" in capsys.readouterr().err


def test_score_folder_without_series_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")

    status = main(["--log-level", "WARNING", "score", str(tmp_path / "empty"), "--labels", "x.nrrd"])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith("cacs-node score: ")
    assert captured.out == ""


def test_score_missing_folder_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--log-level", "WARNING", "score", str(tmp_path / "absent")])

    assert status == 2
    assert "absent is not a folder" in capsys.readouterr().err


def test_score_missing_model_exits_three(
    scored_case: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, _, _ = scored_case

    status = main(
        ["--log-level", "WARNING", "score", str(dicom_dir), "--model", str(tmp_path / "absent.pt"), "--device", "cpu"]
    )

    captured = capsys.readouterr()
    assert status == 3
    assert "the segmentation model failed" in captured.err
    assert "absent.pt" in captured.err


def test_score_uid_root_without_dot_rejected_before_scoring(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import scoring.series

    loaded: list[object] = []
    monkeypatch.setattr(scoring.series, "load_series", lambda *args, **kwargs: loaded.append(args))
    (tmp_path / "series").mkdir()

    status = main(["score", str(tmp_path / "series"), "--uid-root", "1.2.3", "--out", str(tmp_path / "out")])

    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("cacs-node score: invalid --uid-root '1.2.3': expected digits in dot-separated")
    assert "such as '1.2.826.0.1.3680043.10.1234.'" in error
    # The series was never loaded and no output folder was made.
    assert loaded == []
    assert not (tmp_path / "out").exists()


def test_score_out_is_a_file_rejected_before_scoring(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import scoring.series

    loaded: list[object] = []
    monkeypatch.setattr(scoring.series, "load_series", lambda *args, **kwargs: loaded.append(args))
    (tmp_path / "series").mkdir()
    (tmp_path / "passwd").write_text("root:x:0:0\n")

    status = main(["score", str(tmp_path / "series"), "--out", str(tmp_path / "passwd")])

    assert status == 2
    assert capsys.readouterr().err == (
        f"cacs-node score: --out {tmp_path / 'passwd'}: exists and is not a folder; give a new or existing "
        "folder for the SEG, SR and summary image\n"
    )
    assert loaded == []


def test_score_two_equal_series_names_series_uid_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = make_series_dir(tmp_path / "study" / "a", uid_seed="ambiguous-a")
    second = make_series_dir(tmp_path / "study" / "b", uid_seed="ambiguous-b")

    status = main(["--log-level", "WARNING", "score", str(tmp_path / "study"), "--labels", "x.nrrd"])

    assert status == 2
    error = capsys.readouterr().err
    # Both series have the same slice thickness, so neither is preferred.
    assert "2 CT series are equally suited for calcium scoring" in error
    assert str(first[0].SeriesInstanceUID) in error
    assert str(second[0].SeriesInstanceUID) in error
    assert error.endswith("; pass --series-uid UID to choose one\n")


@pytest.mark.parametrize("name", ["default", ""])
def test_score_model_default_loads_shipped_model(
    scored_case: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, name: str,
) -> None:
    import scoring.inference

    requested: list[object] = []

    def record_request(path, device):
        requested.append(path)
        raise scoring.inference.ModelError("stopped after the request was recorded")

    monkeypatch.setattr(scoring.inference, "load_model", record_request)
    dicom_dir, _, _ = scored_case

    status = main(["--log-level", "WARNING", "score", str(dicom_dir), "--model", name, "--device", "cpu"])

    assert status == 3
    assert requested == [None]
    assert "stopped after the request was recorded" in capsys.readouterr().err


def test_score_names_the_label_map_it_scored(
    scored_case: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, labels_path, _ = scored_case

    assert main(["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(labels_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["segmentation"] == {"source": "label map", "path": str(labels_path)}

    assert main(["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(labels_path)]) == 0
    assert f"Segmentation: label map {labels_path}" in capsys.readouterr().out.splitlines()


@pytest.fixture
def model_case(tmp_path: Path) -> Path:
    """Write a 3-slice series of 64 × 64 pixels of 2 mm, large enough for the model; return its folder."""
    hu = blank_hu(3, 64, 64)
    hu[1, 30:33, 30:33] = 400.0
    make_series_dir(tmp_path / "model-case", hu, pixel_spacing=(2.0, 2.0))
    return tmp_path / "model-case"


def test_score_model_source_and_caution(
    model_case: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scoring.inference import load_model

    shipped = load_model(None, "cpu")
    dicom_dir = model_case

    status = main(["--log-level", "WARNING", "score", str(dicom_dir), "--json", "--runtime", "torch"])

    assert status == 0
    source = json.loads(capsys.readouterr().out)["segmentation"]
    assert source == {
        "source": "model",
        "model_version": shipped.model_version,
        "runtime": "torch",
        "device": "cpu",
        "model_caution": shipped.caution,
    }
    assert shipped.caution.startswith("trained on digital phantom data only")

    assert main(["--log-level", "WARNING", "score", str(dicom_dir), "--runtime", "torch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"Segmentation: model {shipped.model_version} (torch on cpu)"
    assert lines[2] == f"CAUTION, model: {shipped.caution}"


def test_score_unknown_device_exits_two(
    scored_case: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import scoring.series

    def fail_if_called(*args, **kwargs):
        raise AssertionError("the series was read")

    monkeypatch.setattr(scoring.series, "load_series", fail_if_called)
    dicom_dir, _, _ = scored_case

    assert main(["--log-level", "WARNING", "score", str(dicom_dir), "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err


def test_score_model_folder_is_named_a_folder(
    scored_case: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, _, _ = scored_case
    (tmp_path / "run").mkdir()

    status = main(["--log-level", "WARNING", "score", str(dicom_dir), "--model", str(tmp_path / "run"), "--device", "cpu"])

    assert status == 3
    assert f"model checkpoint {tmp_path / 'run'} is a folder" in capsys.readouterr().err


def test_score_threads_option_sets_the_thread_count(
    model_case: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    before = torch.get_num_threads()
    dicom_dir = model_case
    try:
        torch.set_num_threads(2)
        assert main(["--log-level", "WARNING", "score", str(dicom_dir), "--threads", "1", "--runtime", "torch"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "Segmentation: model " in capsys.readouterr().out


def test_score_small_images_rejected(
    scored_case: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, labels_path, _ = scored_case

    assert main(["--log-level", "WARNING", "score", str(dicom_dir), "--runtime", "torch"]) == 2
    assert ("the images have 32 × 32 pixels of 0.5 × 0.5 mm; the model needs at least 64 pixels in each "
            "direction") in capsys.readouterr().err
    # A label map needs no model, so the same series scores from it.
    assert main(["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(labels_path)]) == 0


def test_score_labels_unused_model_options(
    scored_case: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, labels_path, _ = scored_case

    status = main(["--log-level", "WARNING", "score", str(dicom_dir), "--labels", str(labels_path),
                   "--model", "other.pt", "--threads", "2"])

    captured = capsys.readouterr()
    assert status == 0
    assert captured.err == ("cacs-node score: --model, --threads not used: --labels scores the given label "
                            "map without the model\n")
    assert "Total        26.0        30.0      7.18        2" in captured.out.splitlines()


def test_score_onnx_on_cuda_exits_two_before_reading(
    scored_case: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dicom_dir, _, _ = scored_case

    assert main(["--log-level", "WARNING", "score", str(dicom_dir), "--runtime", "onnx", "--device", "cuda"]) == 2
    assert "runtime onnx runs on the CPU only, but the device is cuda" in capsys.readouterr().err


def test_score_threads_cap_exits_two(scored_case: tuple[Path, Path, str], capsys) -> None:
    dicom_dir, _, _ = scored_case
    with pytest.raises(SystemExit) as stopped:
        main(["score", str(dicom_dir), "--threads", "100000"])
    assert stopped.value.code == 2
    assert "invalid thread count 100000: expected at most 1024" in capsys.readouterr().err
