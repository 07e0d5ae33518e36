"""Tests of the network architecture, its input channels and the task-combination rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scoring import model


def _conv(in_channels: int, out_channels: int, kernel: int) -> int:
    """Weights plus biases of one convolution."""
    return kernel * kernel * in_channels * out_channels + out_channels


def _down(in_channels: int, out_channels: int) -> int:
    # 4 × 4 stride-2 convolution, 3 × 3 convolution, batch norm (weight and bias).
    return _conv(in_channels, out_channels, 4) + _conv(out_channels, out_channels, 3) + 2 * out_channels


def _up(in_channels: int, out_channels: int) -> int:
    # Two 3 × 3 convolutions and batch norm.
    return _conv(in_channels, out_channels, 3) + _conv(out_channels, out_channels, 3) + 2 * out_channels


def _expected_multitask_parameters() -> int:
    """Count the parameters from the layer list of Föllmer et al. 2022, independent of scoring.model."""
    encoder = [16, 32, 32, 64, 64, 64, 128, 128]
    levels = [16] + encoder  # stem output, then levels 1..8
    total = _conv(2, 16, 5) + _conv(16, 16, 5)
    total += sum(_down(levels[i], levels[i + 1]) for i in range(8))
    region_out = [128, 64, 64, 64, 32, 32, 16, 16]
    low = 128
    for step in range(8):
        skip = levels[7 - step]
        total += _up(low + skip, region_out[step])
        low = region_out[step]
    total += _conv(16, 4, 3) + _conv(4, 4, 3)
    lesion_out = [128, 64, 64, 64, 32, 32, 16, 32]
    low = 128
    for step in range(8):
        skip = levels[7 - step] + region_out[step] + (2 if step == 7 else 0)
        total += _up(low + skip, lesion_out[step])
        low = lesion_out[step]
    total += _conv(32, 16, 3) + _conv(16, 2, 3)
    return total


def test_multitask_unet_parameter_count_matches_layer_list():
    network = model.MultiTaskUNet()
    count = model.count_parameters(network)
    # 3,109,130 from the layer list above; Föllmer et al. 2022 give "about 3.1 million".
    assert count == _expected_multitask_parameters()
    assert count == 3_109_130


def test_multitask_unet_256_input_gives_both_task_shapes():
    network = model.MultiTaskUNet().eval()
    with torch.no_grad():
        region_logits, lesion_logits = network(torch.zeros(2, 2, 256, 256))
    assert region_logits.shape == (2, 4, 256, 256)
    assert lesion_logits.shape == (2, 2, 256, 256)


def test_comparison_models_256_input_give_class_shapes():
    single = model.SingleTaskUNet().eval()
    sequential = model.SequentialUNet().eval()
    with torch.no_grad():
        single_logits = single(torch.zeros(1, 2, 256, 256))
        region_logits, lesion_logits = sequential(torch.zeros(1, 2, 256, 256))
    assert single_logits.shape == (1, 4, 256, 256)
    assert region_logits.shape == (1, 4, 256, 256)
    assert lesion_logits.shape == (1, 2, 256, 256)


def test_encoder_input_not_multiple_of_256_raises():
    network = model.MultiTaskUNet().eval()
    with pytest.raises(ValueError, match="multiple of 256"):
        network(torch.zeros(1, 2, 200, 256))


def test_build_model_unknown_name_raises():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        model.build_model("resnet")


def test_prepare_input_normalises_hu_and_sets_candidate_mask():
    hu = np.array([[[-3024.0, -2048.0, 129.9, 130.0, 1300.0]]], dtype=np.float32)
    inputs = model.prepare_input(hu)
    assert inputs.shape == (1, 2, 1, 5)
    # (-2048 + 2000) / 3300 = -0.0145454...; -3024 is raised to -2048 first.
    # (129.9 + 2000) / 3300 = 0.645424...; (130 + 2000) / 3300 = 0.645454...; 3300 / 3300 = 1.
    expected_image = [-48 / 3300, -48 / 3300, 2129.9 / 3300, 2130 / 3300, 1.0]
    np.testing.assert_allclose(inputs[0, 0, 0].numpy(), expected_image, rtol=1e-6)
    # The candidate mask is HU >= 130, the inclusive Agatston threshold.
    assert inputs[0, 1, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_prepare_input_wrong_dimensions_raises():
    with pytest.raises(ValueError, match="expected HU slices of shape"):
        model.prepare_input(np.zeros((1, 1, 4, 4)))


def _one_hot_logits(classes: list[list[int]], count: int) -> torch.Tensor:
    """Logits (1, count, H, W) whose argmax is `classes`."""
    indices = torch.tensor(classes)
    return torch.nn.functional.one_hot(indices, count).permute(2, 0, 1)[None].float()


def test_combine_tasks_hand_made_tensors_follow_rule():
    # Pixel by pixel (row 0, then row 1):
    #   region:    LAD, LCX, OTHER_CAR | RCA, LAD, RCA
    #   lesion:    CAC, CAC, CAC       | CAC, OTHER_CAC, CAC
    #   candidate: yes, yes, yes       | no,  yes, yes
    # → labels:    1,   2,   0 (OTHER_CAR) | 0 (no candidate), 0 (no lesion), 3
    region = _one_hot_logits([[1, 2, 0], [3, 1, 3]], 4)
    lesion = _one_hot_logits([[1, 1, 1], [1, 0, 1]], 2)
    candidate = torch.tensor([[[True, True, True], [False, True, True]]])
    labels = model.combine_tasks(region, lesion, candidate)
    assert labels.dtype == torch.uint8
    assert labels[0].tolist() == [[1, 2, 0], [0, 0, 3]]


def test_combine_multiclass_outside_candidate_is_background():
    logits = _one_hot_logits([[2, 3, 0]], 4)
    candidate = torch.tensor([[[True, False, True]]])
    assert model.combine_multiclass(logits, candidate)[0].tolist() == [[2, 0, 0]]


def test_predict_labels_multitask_returns_labels_and_regions():
    torch.manual_seed(0)
    network = model.MultiTaskUNet().eval()
    hu = np.full((1, 256, 256), 40.0, dtype=np.float32)
    hu[0, 100:110, 100:110] = 500.0
    with torch.no_grad():
        labels, regions = model.predict_labels(network, model.prepare_input(hu))
    assert labels.shape == regions.shape == (1, 256, 256)
    # Labels can only be set inside the candidate mask (HU >= 130), here 100 pixels.
    assert int((labels > 0).sum()) <= 100
    assert int((labels[0, :100] > 0).sum()) == 0


def _lesion_logits(probabilities: list[list[float]]) -> torch.Tensor:
    """Two-class logits (1, 2, H, W) whose softmax gives CAC these probabilities."""
    cac = torch.tensor(probabilities)
    return torch.stack([torch.zeros_like(cac), torch.log(cac / (1.0 - cac))])[None]


def test_combine_tasks_lesion_threshold_moves_decision():
    region = _one_hot_logits([[1, 2, 3]], 4)
    lesion = _lesion_logits([[0.45, 0.6, 0.8]])
    candidate = torch.ones(1, 1, 3, dtype=torch.bool)
    assert model.combine_tasks(region, lesion, candidate)[0].tolist() == [[0, 2, 3]]
    assert model.combine_tasks(region, lesion, candidate, 0.7)[0].tolist() == [[0, 0, 3]]
    assert model.combine_tasks(region, lesion, candidate, 0.3)[0].tolist() == [[1, 2, 3]]


def test_combine_multiclass_threshold_uses_summed_artery_probability():
    # P(OTHER_CAC, LAD, LCX, RCA) = (0.4, 0.1, 0.35, 0.15): argmax is OTHER_CAC, but
    # the arteries together have 0.6, so a threshold of 0.5 calls it LCX calcium.
    logits = torch.log(torch.tensor([0.4, 0.1, 0.35, 0.15]))[None, :, None, None]
    candidate = torch.ones(1, 1, 1, dtype=torch.bool)
    assert model.combine_multiclass(logits, candidate)[0].tolist() == [[0]]
    assert model.combine_multiclass(logits, candidate, 0.5)[0].tolist() == [[2]]
    assert model.combine_multiclass(logits, candidate, 0.65)[0].tolist() == [[0]]


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.2, 1.5])
def test_check_lesion_threshold_outside_open_interval_raises(threshold: float):
    with pytest.raises(ValueError, match="lesion threshold must lie strictly between 0 and 1"):
        model.check_lesion_threshold(threshold)
