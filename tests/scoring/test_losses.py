"""Tests of the focal loss and the task weightings against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from scoring import losses


def _logits_from_probabilities(rows: list[list[float]]) -> torch.Tensor:
    """Logits (1, C, 1, P) whose softmax over C gives exactly the given per-pixel probabilities."""
    probabilities = torch.tensor(rows, dtype=torch.float64).T  # (C, P)
    return probabilities.log()[None, :, None, :]


def test_focal_loss_known_probabilities_matches_hand_value():
    # Pixel A: p = (0.8, 0.2), target 0 (weight 0.01):
    #   -0.01 * (1 - 0.8)^2 * ln 0.8 = 0.01 * 0.04 * 0.2231435513 = 8.925742e-5
    # Pixel B: p = (0.3, 0.7), target 1 (weight 1):
    #   -1 * (1 - 0.7)^2 * ln 0.7 = 0.09 * 0.3566749439 = 0.0321007450
    # Mean over the 2 valid pixels: 0.0160950012
    logits = _logits_from_probabilities([[0.8, 0.2], [0.3, 0.7]])
    target = torch.tensor([[[0, 1]]])
    loss = losses.focal_loss(logits, target, (0.01, 1.0))
    assert loss.item() == pytest.approx(0.0160950012, rel=1e-8)


def test_focal_loss_ignored_pixel_leaves_value_unchanged():
    # Pixel C (p = (0.5, 0.5), target 1) is masked out, so the value stays the
    # two-pixel mean of the previous test, 0.0160950012.
    logits = _logits_from_probabilities([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    target = torch.tensor([[[0, 1, 1]]])
    valid = torch.tensor([[[True, True, False]]])
    loss = losses.focal_loss(logits, target, (0.01, 1.0), valid=valid)
    assert loss.item() == pytest.approx(0.0160950012, rel=1e-8)


def test_focal_loss_negative_ignored_target_accepted():
    # Region targets mark unlabelled pixels with -1; they must not index the weights.
    logits = _logits_from_probabilities([[0.3, 0.7], [0.5, 0.5]])
    target = torch.tensor([[[1, -1]]])
    loss = losses.focal_loss(logits, target, (0.01, 1.0), valid=target >= 0)
    # Only pixel B of the first test: 0.0321007450.
    assert loss.item() == pytest.approx(0.0321007450, rel=1e-8)


def test_focal_loss_gamma_zero_equals_weighted_cross_entropy():
    # With gamma 0 the focal loss is -w_t ln p_t: (0.01 * 0.2231435513 + 0.3566749439) / 2.
    logits = _logits_from_probabilities([[0.8, 0.2], [0.3, 0.7]])
    target = torch.tensor([[[0, 1]]])
    loss = losses.focal_loss(logits, target, (0.01, 1.0), gamma=0.0)
    assert loss.item() == pytest.approx((0.01 * 0.2231435513 + 0.3566749439) / 2, rel=1e-8)


def test_focal_loss_no_valid_pixel_is_zero():
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    loss = losses.focal_loss(logits, target, (0.01, 1.0), valid=torch.zeros(1, 2, 2, dtype=bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_focal_loss_wrong_weight_count_raises():
    with pytest.raises(ValueError, match="expected 2 class weights, got \\(3,\\)"):
        losses.focal_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2), (1.0, 1.0, 1.0))


def test_focal_loss_target_shape_mismatch_raises():
    with pytest.raises(ValueError, match="expected target of shape \\(1, 2, 2\\)"):
        losses.focal_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2), (1.0, 1.0))


def test_region_loss_unlabelled_pixels_ignored():
    # Four region classes; pixel 0 is LAD with p_LAD = 0.5 (weight 1), pixel 1 unlabelled.
    # -(1 - 0.5)^2 * ln 0.5 = 0.25 * 0.6931471806 = 0.1732867951, mean over 1 valid pixel.
    logits = _logits_from_probabilities([[0.2, 0.5, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    target = torch.tensor([[[1, -1]]])
    assert losses.region_loss(logits, target).item() == pytest.approx(0.1732867951, rel=1e-8)


def test_lesion_loss_only_candidate_pixels_count():
    # Pixel 0 is a candidate, OTHER_CAC with p = 0.9 (weight 0.01):
    #   -0.01 * 0.1^2 * ln 0.9 = 0.01 * 0.01 * 0.1053605157 = 1.053605157e-5.
    # Pixel 1 is not a candidate, so its confident mistake does not count.
    logits = _logits_from_probabilities([[0.9, 0.1], [0.99, 0.01]])
    target = torch.tensor([[[0, 1]]])
    candidate = torch.tensor([[[True, False]]])
    loss = losses.lesion_loss(logits, target, candidate)
    assert loss.item() == pytest.approx(1.053605157e-5, rel=1e-7)


def test_uncertainty_weighting_value_matches_formula():
    # sigma_R^2 = 4 (s_R = ln 4), sigma_L^2 = 1 (s_L = 0), L_R = 2, L_L = 2:
    # L = 2/4 + 2/1 + ln 2 + ln 1 = 0.5 + 2 + 0.6931471806 = 3.1931471806.
    weighting = losses.UncertaintyWeighting()
    with torch.no_grad():
        weighting.log_variance_region.fill_(math.log(4.0))
    loss = weighting(torch.tensor(2.0), torch.tensor(2.0))
    assert loss.item() == pytest.approx(3.1931471806, rel=1e-6)
    assert weighting.sigmas() == pytest.approx((2.0, 1.0), rel=1e-6)


def test_uncertainty_weighting_gradient_matches_derivative():
    # dL/ds = -L exp(-s) + 1/2. For s_R = ln 4, L_R = 2: -0.5 + 0.5 = 0.
    # For s_L = 0, L_L = 2: -2 + 0.5 = -1.5. dL/dL_R = exp(-s_R) = 0.25.
    weighting = losses.UncertaintyWeighting()
    with torch.no_grad():
        weighting.log_variance_region.fill_(math.log(4.0))
    region_loss = torch.tensor(2.0, requires_grad=True)
    weighting(region_loss, torch.tensor(2.0)).backward()
    assert weighting.log_variance_region.grad.item() == pytest.approx(0.0, abs=1e-6)
    assert weighting.log_variance_lesion.grad.item() == pytest.approx(-1.5, rel=1e-6)
    assert region_loss.grad.item() == pytest.approx(0.25, rel=1e-6)


def test_static_weighting_alpha_point_four_matches_formula():
    # 0.4 * 2 + 0.6 * 0.5 = 1.1
    weighting = losses.StaticWeighting(0.4)
    assert weighting(torch.tensor(2.0), torch.tensor(0.5)).item() == pytest.approx(1.1)


def test_static_weighting_alpha_outside_unit_interval_raises():
    with pytest.raises(ValueError, match="alpha must lie in \\[0, 1\\], got 1.5"):
        losses.StaticWeighting(1.5)


def test_multiclass_loss_other_calcium_counts_as_other_cac():
    # Label 4 (non-coronary calcium) is class 0, OTHER_CAC, weight 0.01, p = 0.5:
    # -0.01 * 0.5^2 * ln 0.5 = 0.01 * 0.25 * 0.6931471806 = 1.732867951e-3.
    logits = _logits_from_probabilities([[0.5, 0.2, 0.2, 0.1]])
    labels = torch.tensor([[[4]]], dtype=torch.uint8)
    candidate = torch.tensor([[[True]]])
    loss = losses.multiclass_loss(logits, labels, candidate)
    assert loss.item() == pytest.approx(1.732867951e-3, rel=1e-7)
