"""Tests of model loading, slice-batched segmentation, body cropping and MC dropout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from scoring import checkpoint, inference, model
from scoring.volume import CTVolume


def _volume(hu: np.ndarray) -> CTVolume:
    slices = hu.shape[0]
    return CTVolume(
        hu=hu.astype(np.float32),
        padding_mask=np.zeros(hu.shape, dtype=bool),
        origin=np.zeros(3),
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        slice_direction=np.array([0.0, 0.0, 1.0]),
        pixel_spacing=(0.5, 0.5),
        slice_increment=3.0,
        slice_thickness=3.0,
        kvp=120.0,
        positions=np.array([[0.0, 0.0, 3.0 * index] for index in range(slices)]),
        series_instance_uid="1.2.826.0.1.3680043.8.498.1",
        study_instance_uid="1.2.826.0.1.3680043.8.498.2",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.8.498.4.{i}" for i in range(slices)),
        headers=(),
    )


def _small_chest(slices: int = 2, size: int = 256) -> np.ndarray:
    """Air around a soft-tissue disc with a bright spot: body box 128 × 128 pixels."""
    hu = np.full((slices, size, size), -1000.0, dtype=np.float32)
    rows, columns = np.mgrid[:size, :size]
    body = (rows - size / 2) ** 2 + (columns - size / 2) ** 2 < (size / 4) ** 2
    hu[:, body] = 40.0
    hu[:, size // 2:size // 2 + 3, size // 2:size // 2 + 3] = 600.0
    return hu


@pytest.fixture(scope="module")
def random_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained multi-task network with fixed random weights, saved as a checkpoint."""
    torch.manual_seed(3)
    network = model.MultiTaskUNet()
    # Random batch-norm statistics, so that eval-mode outputs vary across pixels.
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("model") / "random.pt"
    checkpoint.save_checkpoint(
        path,
        checkpoint.Checkpoint("mtl", network.state_dict(), {"model_name": "mtl-test"}),
    )
    return path


def test_load_model_missing_file_raises_model_error(tmp_path: Path):
    with pytest.raises(inference.ModelError, match="model checkpoint .*missing.pt not found"):
        inference.load_model(tmp_path / "missing.pt", device="cpu")


def test_load_model_altered_weights_fail_hash_check(tmp_path: Path, random_model_path: Path):
    payload = torch.load(random_model_path, weights_only=True)
    first_key = sorted(payload["state_dict"])[0]
    payload["state_dict"][first_key] = payload["state_dict"][first_key] + 1.0
    altered = tmp_path / "altered.pt"
    torch.save(payload, altered)
    with pytest.raises(inference.ModelError, match="do not match their stored SHA-256"):
        inference.load_model(altered, device="cpu")


def test_load_model_not_a_checkpoint_raises(tmp_path: Path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(inference.ModelError, match="is not a cacs-node checkpoint"):
        inference.load_model(path, device="cpu")


def test_load_model_cuda_without_device_raises(random_model_path: Path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so the request is valid")
    with pytest.raises(inference.ModelError, match="torch finds no CUDA device"):
        inference.load_model(random_model_path, device="cuda")


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path, random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    inputs = model.prepare_input(_small_chest(1))
    with torch.inference_mode():
        before = loaded.network(inputs)
    copy = tmp_path / "copy.pt"
    source = checkpoint.load_checkpoint(random_model_path)
    checkpoint.save_checkpoint(copy, source)
    reloaded = inference.load_model(copy, device="cpu")
    with torch.inference_mode():
        after = reloaded.network(inputs)
    assert torch.equal(before[0], after[0])
    assert torch.equal(before[1], after[1])
    # The version is the metadata's model name and the hash of the weights that were loaded.
    assert reloaded.model_version == loaded.model_version == "mtl-test-" + source.weights_sha256[:12]


def test_body_window_small_body_gives_256_window():
    # Body disc radius 64 px centred at 128 in a 256² image: box rows 65-191, one 256 window.
    assert inference.body_window(_small_chest(1)) == (0, 0, 256, 256)


def test_body_window_body_in_corner_stays_inside_image():
    hu = np.full((1, 512, 512), -1000.0, dtype=np.float32)
    hu[0, 400:450, 10:60] = 40.0
    # 50-pixel box rounded up to 256, centred on rows 425 → 297..553, shifted back to 256..512.
    assert inference.body_window(hu) == (256, 0, 256, 256)


def test_body_window_without_body_covers_whole_image():
    assert inference.body_window(np.full((1, 300, 512), -1000.0)) == (0, 0, 512, 512)


def test_segment_volume_batches_give_same_labels(random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    volume = _volume(_small_chest(3))
    one_by_one = inference.segment_volume(volume, loaded, batch_size=1)
    all_at_once = inference.segment_volume(volume, loaded, batch_size=3)
    assert one_by_one.labels.shape == (3, 256, 256)
    assert one_by_one.labels.dtype == np.uint8
    assert one_by_one.regions.dtype == np.uint8
    assert one_by_one.model_version == loaded.model_version
    np.testing.assert_array_equal(one_by_one.labels, all_at_once.labels)
    np.testing.assert_array_equal(one_by_one.regions, all_at_once.regions)


def test_segment_volume_labels_only_on_candidates(random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    hu = _small_chest(1)
    segmentation = inference.segment_volume(_volume(hu), loaded)
    assert not np.any(segmentation.labels[hu < 130.0])
    assert set(np.unique(segmentation.labels)) <= {0, 1, 2, 3}


def test_segment_volume_zero_batch_size_raises(random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    with pytest.raises(ValueError, match="batch size must be at least 1, got 0"):
        inference.segment_volume(_volume(_small_chest(1)), loaded, batch_size=0)


def test_mc_dropout_rate_zero_gives_zero_variance(random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    maps = inference.mc_dropout_variance(_volume(_small_chest(1)), loaded, passes=3, rate=0.0)
    assert float(maps.region_variance.max()) == 0.0
    assert float(maps.lesion_variance.max()) == 0.0


def test_mc_dropout_rate_one_percent_gives_positive_variance(random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    volume = _volume(_small_chest(1))
    maps = inference.mc_dropout_variance(volume, loaded, passes=3, rate=0.01, seed=1)
    assert maps.region_variance.shape == volume.shape
    assert float(maps.region_variance.max()) > 0.0
    assert float(maps.lesion_variance.max()) > 0.0
    # The same seed repeats the dropout masks.
    again = inference.mc_dropout_variance(volume, loaded, passes=3, rate=0.01, seed=1)
    np.testing.assert_array_equal(maps.lesion_variance, again.lesion_variance)


def test_mc_dropout_restores_rates_and_modes(random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    network = loaded.network
    with inference.mc_dropout(network, 0.01):
        dropouts = [m for m in network.modules() if isinstance(m, torch.nn.Dropout)]
        assert all(m.p == 0.01 and m.training for m in dropouts)
        norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert not any(m.training for m in norms)
    rates = sorted({m.p for m in network.modules() if isinstance(m, torch.nn.Dropout)})
    # Block dropouts are 0 and the bottleneck dropout is 0.5 again, all in eval mode.
    assert rates == [0.0, 0.5]
    assert not network.training


def test_score_command_without_labels_runs_the_model(
    tmp_path: Path, random_model_path: Path, capsys: pytest.CaptureFixture[str]
):
    import json

    from node.cli import main
    from scoring import phantom
    from scoring.agatston import score_volume
    from scoring.series import load_series

    case = phantom.generate_phantom(tmp_path / "case", 11, size=256, slices=3)
    exit_code = main([
        "score", str(tmp_path / "case" / "dicom"),
        "--model", str(random_model_path), "--device", "cpu", "--json",
    ])
    assert exit_code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["series_instance_uid"] == case.series_instance_uid

    # The command must give what the API gives for the same series and model.
    volume = load_series(tmp_path / "case" / "dicom")
    loaded = inference.load_model(random_model_path, device="cpu")
    expected = score_volume(volume, inference.segment_volume(volume, loaded).labels)
    assert document["agatston"]["total"] == pytest.approx(expected.agatston["total"])
    assert document["risk_category"] == expected.risk_category


def test_score_command_missing_model_exits_with_model_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from node.cli import main
    from scoring import phantom

    phantom.generate_phantom(tmp_path / "case", 12, size=256, slices=2)
    exit_code = main([
        "score", str(tmp_path / "case" / "dicom"),
        "--model", str(tmp_path / "missing.pt"), "--device", "cpu",
    ])
    # node/commands/score.py maps a model failure to exit code 3.
    assert exit_code == 3
    assert "missing.pt not found" in capsys.readouterr().err


#: Held-out phantom seed of the shipped-model check, outside the training and
#: validation seeds listed in scoring/models/MODEL_CARD.md. Its series has two
#: small coronary lesions (true score 23.4, risk II) near non-coronary calcium
#: of the aortic wall and mitral annulus.
HELD_OUT_SEED = 2000

# NOTE: the shipped model passes on this seed partly through offsetting errors.
# It misses the left main lesion and adds a false cluster on the top slice. The
# model card gives the numbers.


@pytest.mark.slow
def test_shipped_model_held_out_phantom_matches_truth():
    from scoring import phantom
    from scoring.agatston import score_volume

    if not inference.default_model_path().is_file():
        pytest.fail(f"the shipped model {inference.default_model_path()} is missing")
    case = phantom.make_case(HELD_OUT_SEED)
    volume = case.to_volume()
    truth = score_volume(volume, case.labels)
    segmentation = inference.segment_volume(volume, device="cpu")
    predicted = score_volume(volume, segmentation.labels)
    assert predicted.risk_category == truth.risk_category
    # Tolerance: 15 % of the true total Agatston score, at least 10 points.
    tolerance = max(10.0, 0.15 * truth.agatston["total"])
    assert abs(predicted.agatston["total"] - truth.agatston["total"]) <= tolerance


def test_segment_volume_onnx_runtime_matches_torch(random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    volume = _volume(_small_chest(2))
    with_torch = inference.segment_volume(volume, loaded)
    with_onnx = inference.segment_volume(volume, loaded, runtime="onnx")
    np.testing.assert_array_equal(with_torch.labels, with_onnx.labels)
    np.testing.assert_array_equal(with_torch.regions, with_onnx.regions)


def test_segment_volume_unknown_runtime_raises(random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        inference.segment_volume(_volume(_small_chest(1)), loaded, runtime="tensorrt")


def test_resolve_runtime_auto_picks_onnx_on_the_cpu(random_model_path: Path):
    loaded = inference.load_model(random_model_path, device="cpu")
    assert inference.resolve_runtime(loaded, "auto") == "onnx"
    assert inference.resolve_runtime(loaded, "torch") == "torch"
    assert inference.prepare_runtime(loaded, "auto") == "onnx"
    # prepare_runtime exported the model once; segment_volume reuses that session.
    assert id(loaded.network) in inference._ONNX_SESSIONS


def test_resolve_runtime_auto_without_onnxruntime(
    random_model_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import sys

    loaded = inference.load_model(random_model_path, device="cpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert inference.resolve_runtime(loaded, "auto") == "torch"


def _with_metadata(source: Path, destination: Path, **metadata) -> Path:
    saved = checkpoint.load_checkpoint(source)
    checkpoint.save_checkpoint(
        destination,
        checkpoint.Checkpoint(saved.architecture, saved.state_dict, {**saved.metadata, **metadata}),
    )
    return destination


def test_segment_volume_applies_lesion_threshold_of_model(tmp_path: Path, random_model_path: Path):
    hu = _small_chest(2)
    hu[:, 100:140, 100:140] = 400.0
    volume = _volume(hu)
    argmax_model = inference.load_model(random_model_path, device="cpu")
    assert argmax_model.lesion_threshold is None
    low_path = _with_metadata(random_model_path, tmp_path / "low.pt", lesion_threshold=0.3)
    low_model = inference.load_model(low_path, device="cpu")
    assert low_model.lesion_threshold == 0.3

    # Measured with torch 2.13: the random network gives each of the 2 × 1,600
    # candidate pixels of the block a CAC probability between 0.3 and 0.5, and LAD
    # as region. So the argmax rule finds no calcium, and the threshold 0.3 finds all of it.
    argmax_labels = inference.segment_volume(volume, argmax_model).labels
    low_torch = inference.segment_volume(volume, low_model).labels
    low_onnx = inference.segment_volume(volume, low_model, runtime="onnx").labels
    assert int((argmax_labels > 0).sum()) == 0
    assert int((low_torch == 1).sum()) == 2 * 40 * 40
    np.testing.assert_array_equal(low_torch, low_onnx)


def test_load_model_invalid_lesion_threshold_raises(tmp_path: Path, random_model_path: Path):
    path = _with_metadata(random_model_path, tmp_path / "bad.pt", lesion_threshold=1.5)
    with pytest.raises(inference.ModelError, match="lesion threshold must lie strictly between"):
        inference.load_model(path, device="cpu")


def test_load_model_text_file_raises_model_error(tmp_path: Path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(inference.ModelError, match="cannot be read .*not a cacs-node checkpoint"):
        inference.load_model(path, device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": "single"}, "do not fit architecture 'single': .* tensors missing"),
        ({"state_dict": None}, "contains no weights"),
        ({"metadata": ["not", "a", "mapping"]}, "metadata that is not a mapping"),
    ],
)
def test_load_model_damaged_payload_raises_model_error(
    tmp_path: Path, random_model_path: Path, change: dict, message: str
):
    payload = torch.load(random_model_path, weights_only=True)
    payload.update(change)
    damaged = tmp_path / "damaged.pt"
    torch.save(payload, damaged)
    with pytest.raises(inference.ModelError, match=message):
        inference.load_model(damaged, device="cpu")


def _edited_copy(tmp_path: Path, name: str, **metadata_changes) -> tuple[Path, checkpoint.Checkpoint]:
    """Write the shipped model with changed metadata (None removes a key) and rehashed weights."""
    source = checkpoint.load_checkpoint(inference.default_model_path())
    metadata = dict(source.metadata)
    for key, value in metadata_changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    edited = checkpoint.Checkpoint(source.architecture, source.state_dict, metadata)
    path = tmp_path / name
    checkpoint.save_checkpoint(path, edited)
    return path, edited


def test_load_model_version_from_threshold(tmp_path: Path, caplog):
    shipped = inference.load_model(None, "cpu").model_version
    prefix = shipped.rsplit("-t", 1)[0]
    path, _ = _edited_copy(tmp_path, "low.pt", lesion_threshold=0.05)
    with caplog.at_level("WARNING", logger="scoring.inference"):
        loaded = inference.load_model(path, "cpu")
    assert loaded.model_version == f"{prefix}-t0.05"
    assert f"names itself model {shipped}, but its weights and lesion threshold make it {prefix}-t0.05" in caplog.text
    # Without a stored version, the computed one keeps the model name and threshold.
    path, _ = _edited_copy(tmp_path, "unnamed.pt", model_version=None)
    assert inference.load_model(path, "cpu").model_version == shipped


def test_load_model_version_follows_the_weights(tmp_path: Path):
    shipped = inference.load_model(None, "cpu").model_version
    source = checkpoint.load_checkpoint(inference.default_model_path())
    weights = dict(source.state_dict)
    first = next(key for key, value in weights.items() if value.is_floating_point())
    weights[first] = weights[first] + 0.001
    path = tmp_path / "changed.pt"
    checkpoint.save_checkpoint(path, checkpoint.Checkpoint(source.architecture, weights, source.metadata))
    threshold = source.metadata["lesion_threshold"]
    expected = checkpoint.model_version("mtl-uncertainty", weights, threshold)
    loaded = inference.load_model(path, "cpu")
    assert loaded.model_version == expected
    assert loaded.model_version != shipped
    assert loaded.model_version.startswith("mtl-uncertainty-")
    assert loaded.model_version.endswith(f"-t{threshold!r}")


def _sized_volume(rows: int, columns: int, spacing: tuple[float, float]) -> CTVolume:
    volume = _volume(np.full((1, rows, columns), -1000.0, dtype=np.float32))
    return dataclasses.replace(volume, pixel_spacing=spacing)


@pytest.mark.parametrize(
    ("rows", "columns", "spacing", "message"),
    [
        # 256 × 0.3904 mm = 99.94 mm: shown rounded down, so it reads below the limit.
        (256, 256, (0.3904, 0.8), r"the images cover 99\.9 × 204\.8 mm \(256 × 256 pixels of 0\.3904 × 0\.8 mm\)"),
        (1, 256, (150.0, 0.5), r"the images have 1 × 256 pixels of 150 × 0\.5 mm; the model needs at least 64"),
        (63, 256, (2.0, 2.0), r"the images have 63 × 256 pixels"),
    ],
)
def test_segment_volume_refuses_images_smaller_than_a_heart(rows, columns, spacing, message):
    from scoring.errors import FieldOfViewError

    with pytest.raises(FieldOfViewError, match=message):
        inference.segment_volume(_sized_volume(rows, columns, spacing), device="cpu")


def test_segment_volume_accepts_the_smallest_field_of_view():
    # 64 pixels of 1.5625 mm are exactly 100 mm.
    segmentation = inference.segment_volume(_sized_volume(64, 64, (1.5625, 1.5625)), device="cpu")
    assert segmentation.labels.shape == (1, 64, 64)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_name": "my\\model"}, r"metadata model_name or synthetic_only: model version 'my\\\\model-"),
        ({"model_name": "x" * 40}, r"is invalid; expected a non-empty text of at most 58 characters"),
        ({"synthetic_only": True}, r"model caution True is invalid"),
        ({"synthetic_only": "c" * 513}, r"expected a non-empty text of at most 512 characters"),
        ({"lesion_threshold": "0.7"}, r"lesion threshold must be a number strictly between 0 and 1, got '0.7' \(str\)"),
        ({"lesion_threshold": True}, r"got True \(bool\)"),
    ],
)
def test_load_model_refuses_metadata_the_outputs_cannot_carry(tmp_path: Path, changes, message):
    path, _ = _edited_copy(tmp_path, "edited.pt", **changes)
    with pytest.raises(inference.ModelError, match=message):
        inference.load_model(path, "cpu")


def test_load_model_version_tells_close_thresholds_apart(tmp_path: Path):
    shipped = inference.load_model(None, "cpu")
    # A threshold 1e-7 above the shipped one, e.g. 0.6800001 against 0.68.
    nearby = round(shipped.lesion_threshold + 1e-7, 7)
    path, _ = _edited_copy(tmp_path, "close.pt", lesion_threshold=nearby)
    close = inference.load_model(path, "cpu").model_version
    assert close == shipped.model_version.rsplit("-t", 1)[0] + f"-t{nearby!r}"
    assert close != shipped.model_version
