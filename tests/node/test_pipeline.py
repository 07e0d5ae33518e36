"""Tests of node.pipeline.ScoringPipeline with a real (untrained) model on a small series."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scoring import inference

from node.pipeline import ScoringPipeline
from tests.factories import blank_hu, make_series_dir
from tests.node.helpers import make_settings, untrained_model_version, write_untrained_model


def test_scoring_pipeline_onnx_runtime_matches_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 4-slice 64 × 64 series with a 400 HU block: enough candidate voxels for both
    # runtimes to label, small enough for a CPU test. Pixels of 2 mm give the
    # 128 mm field of view the model needs.
    hu = blank_hu(slices=4, rows=64, columns=64)
    hu[1:3, 20:30, 24:34] = 400.0
    make_series_dir(tmp_path / "series", hu, pixel_spacing=(2.0, 2.0), slice_thickness=3.0)
    paths = sorted((tmp_path / "series").iterdir())
    model_path = write_untrained_model(tmp_path / "untrained.pt")

    settings = make_settings(tmp_path / "storage")
    torch_settings = replace(settings, scoring=replace(settings.scoring, model_path=model_path, runtime="torch"))
    onnx_settings = replace(torch_settings, scoring=replace(torch_settings.scoring, runtime="onnx"))

    # An untrained network may label nothing, so equal outputs alone would not show that
    # the setting reached segment_volume: count the ONNX Runtime sessions requested.
    sessions_requested = []
    real_session = inference._onnx_session

    def counting_session(loaded: inference.LoadedModel) -> object:
        sessions_requested.append(loaded.model_version)
        return real_session(loaded)

    monkeypatch.setattr(inference, "_onnx_session", counting_session)

    with_torch = ScoringPipeline(torch_settings).score(paths)
    assert sessions_requested == []
    with_onnx = ScoringPipeline(onnx_settings).score(paths)
    version = untrained_model_version(model_path)
    assert sessions_requested == [version]

    assert with_onnx.volume.shape == (4, 64, 64)
    np.testing.assert_array_equal(with_onnx.labels, with_torch.labels)
    np.testing.assert_array_equal(with_onnx.regions, with_torch.regions)
    assert with_onnx.result.agatston == with_torch.result.agatston
    assert with_onnx.model_version == with_torch.model_version == version


def test_check_model_prepares_onnx_runtime(tmp_path: Path) -> None:
    model_path = write_untrained_model(tmp_path / "untrained.pt")
    settings = make_settings(tmp_path / "storage")
    settings = replace(settings, scoring=replace(settings.scoring, model_path=model_path, device="cpu"))
    assert settings.scoring.runtime == "auto"
    pipeline = ScoringPipeline(settings)

    assert pipeline.check_model() == untrained_model_version(model_path)
    assert id(pipeline._loaded_model().network) in inference._ONNX_SESSIONS


def test_scoring_pipeline_refuses_images_smaller_than_a_heart(tmp_path: Path) -> None:
    from scoring.errors import FieldOfViewError

    make_series_dir(tmp_path / "series", blank_hu(slices=3, rows=64, columns=64), pixel_spacing=(0.5, 0.5))
    paths = sorted((tmp_path / "series").iterdir())
    settings = make_settings(tmp_path / "storage")
    model_path = write_untrained_model(tmp_path / "untrained.pt")
    settings = replace(settings, scoring=replace(settings.scoring, model_path=model_path, runtime="torch"))

    with pytest.raises(FieldOfViewError, match=r"the images cover 32.0 × 32.0 mm \(64 × 64 pixels of 0.5 × 0.5 mm\), "
                       r"less than the 100 mm in each direction that a heart needs"):
        ScoringPipeline(settings).score(paths)
