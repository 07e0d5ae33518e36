"""Tests of the evaluation metrics on hand-made label volumes with hand-counted values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scoring import metrics


def test_binary_voxel_counts_artery_mixup_still_true_positive():
    truth = np.array([[[1, 2, 0, 0, 4]]], dtype=np.uint8)
    predicted = np.array([[[2, 2, 3, 0, 0]]], dtype=np.uint8)
    counts = metrics.binary_voxel_counts(predicted, truth)
    # Binary calcification ignores the artery: voxels 0 and 1 are TP, voxel 2 FP,
    # label 4 (non-coronary) is negative, so nothing is missed.
    assert (counts.true_positives, counts.false_positives, counts.false_negatives) == (2, 1, 0)
    assert counts.ppv == pytest.approx(2 / 3)
    assert counts.sensitivity == 1.0
    assert counts.f1 == pytest.approx(0.8)  # 2·2 / (2·2 + 1 + 0)


def test_multiclass_counts_wrong_artery_counts_twice():
    truth = np.array([[[1, 2, 0, 3]]], dtype=np.uint8)
    predicted = np.array([[[2, 2, 3, 0]]], dtype=np.uint8)
    counts = metrics.multiclass_counts(predicted, truth)
    # Voxel 0: LAD called LCX → FP and FN. Voxel 1: TP. Voxel 2: FP. Voxel 3: FN.
    assert (counts.true_positives, counts.false_positives, counts.false_negatives) == (1, 2, 2)
    assert counts.f1 == pytest.approx(2 / 6)  # 2·1 / (2·1 + 2 + 2)


def test_region_micro_f1_excludes_other_car_and_unlabelled():
    # Target: LAD, OTHER_CAR, unlabelled, RCA; prediction: LAD, LAD, RCA, LCX.
    target = np.array([[[1, 0, -1, 3]]], dtype=np.int8)
    predicted = np.array([[[1, 1, 3, 2]]], dtype=np.uint8)
    counts = metrics.region_counts(predicted, target)
    # Pixel 0 TP; pixel 1 FP (OTHER_CAR called LAD); pixel 2 ignored; pixel 3 FP and FN.
    assert (counts.true_positives, counts.false_positives, counts.false_negatives) == (1, 2, 1)
    assert metrics.region_micro_f1(predicted, target) == pytest.approx(2 / 5)


def test_f1_empty_prediction_and_truth_is_one():
    counts = metrics.binary_voxel_counts(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    assert counts.f1 == 1.0
    assert math.isnan(counts.ppv)


def test_lesion_counts_six_connectivity_and_minimum_volume():
    # Voxel volume 0.5 mm³, so a lesion needs at least 3 voxels (1.5 mm³).
    truth = np.zeros((3, 8, 8), dtype=np.uint8)
    truth[1, 1, 1:4] = 1                 # lesion A: 3 voxels in a row
    truth[1, 5, 5:7] = 2                 # lesion B: 4 face-connected voxels
    truth[1, 6, 6:8] = 2
    truth[0, 6, 1:4] = 3                 # lesion C: 3 voxels
    for step in range(3):                # a diagonal chain: three 1-voxel parts under
        truth[2, step, 5 + step] = 1     # 6-connectivity, so no lesion at all
    predicted = np.zeros_like(truth)
    predicted[1, 1, 2] = 1               # 1 voxel inside A: A is found
    predicted[2, 4, 2:5] = 1             # a 3-voxel lesion on no true calcium: FP
    predicted[2, 7, 7] = 1               # 1 voxel, below the minimum: not a lesion
    counts = metrics.lesion_counts(predicted, truth, voxel_volume_mm3=0.5)
    # True lesions A, B, C; only A overlaps a predicted voxel.
    assert counts.true_positives == 1
    assert counts.false_negatives == 2
    # Predicted lesions of at least 3 voxels: only the row at slice 2, row 4.
    assert counts.false_positives == 1


def test_lesion_counts_nonpositive_voxel_volume_raises():
    with pytest.raises(ValueError, match="voxel volume must be positive, got 0"):
        metrics.lesion_counts(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), 0)


def test_icc_constant_offset_lowers_absolute_agreement():
    # Raters [1, 2, 3] and [2, 3, 4]: MSR = 2, MSC = 1.5, MSE = 0, n = 3, k = 2:
    # ICC(2,1) = (2 - 0) / (2 + 0 + 2 (1.5 - 0) / 3) = 2 / 3.
    assert metrics.icc_absolute_agreement([1, 2, 3], [2, 3, 4]) == pytest.approx(2 / 3)


def test_icc_identical_ratings_is_one():
    assert metrics.icc_absolute_agreement([0, 10, 250], [0, 10, 250]) == pytest.approx(1.0)


def test_icc_single_scan_is_nan():
    assert math.isnan(metrics.icc_absolute_agreement([1.0], [2.0]))


def test_linear_weighted_kappa_matches_hand_value():
    # Reference I, I, II, II, III, IV; model I, I, I, II, III, IV.
    confusion = metrics.risk_confusion_matrix(
        ["I", "I", "II", "II", "III", "IV"], ["I", "I", "I", "II", "III", "IV"]
    )
    assert confusion.tolist() == [[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    # Weights 1 - |i - j| / 3. Observed agreement: 5/6 + (1/6)(2/3) = 17/18.
    # Marginals: rows (2, 2, 1, 1)/6, columns (3, 1, 1, 1)/6; expected agreement 16/27.
    # kappa = (17/18 - 16/27) / (1 - 16/27) = 19/22.
    assert metrics.linear_weighted_kappa(confusion) == pytest.approx(19 / 22)


def test_risk_confusion_unknown_category_raises():
    with pytest.raises(ValueError, match="unknown risk category 'V'"):
        metrics.risk_confusion_matrix(["I"], ["V"])


def _scan(name: str, predicted_value: int, true_value: int, risk: tuple[str, str]):
    predicted = np.zeros((1, 4, 4), dtype=np.uint8)
    truth = np.zeros((1, 4, 4), dtype=np.uint8)
    predicted[0, 0, :predicted_value] = 1
    truth[0, 0, :true_value] = 1
    return metrics.ScanEvaluation(
        name=name, predicted_labels=predicted, true_labels=truth, voxel_volume_mm3=1.0,
        predicted_volume_mm3=float(predicted_value), true_volume_mm3=float(true_value),
        predicted_agatston=float(predicted_value), true_agatston=float(true_value),
        predicted_risk=risk[0], true_risk=risk[1],
    )


def test_evaluate_scans_pools_counts_and_formats_tables():
    report = metrics.evaluate_scans(
        "mtl-uncertainty", [_scan("a", 2, 3, ("II", "II")), _scan("b", 0, 0, ("I", "I"))]
    )
    # Scan a: 2 TP, 1 FN voxels; one 3-voxel true lesion (≥ 1.5 mm³) found.
    assert (report.voxel.true_positives, report.voxel.false_negatives) == (2, 1)
    assert (report.lesion.true_positives, report.lesion.false_positives) == (1, 0)
    assert report.car is None
    assert report.kappa_risk == pytest.approx(1.0)
    document = report.to_json()
    assert document["risk_confusion"][1][1] == 1
    assert document["micro_f1_car"] is None
    table = metrics.format_detection_table([report])
    assert "mtl-uncertainty" in table
    assert "0.800" in table  # voxel F1 = 2·2 / (2·2 + 0 + 1)
    agreement = metrics.format_agreement_table(report)
    assert "Linearly weighted Cohen's kappa: 1.000" in agreement
    assert "(rows: reference, columns: model), 2 scans" in agreement


def test_agreement_table_counts_one_scan_in_the_singular():
    report = metrics.evaluate_scans("single", [_scan("a", 2, 3, ("II", "II"))])
    first = metrics.format_agreement_table(report).splitlines()[0]
    assert first == "Risk categories, single (rows: reference, columns: model), 1 scan"


def test_detection_table_widens_for_long_model_names():
    report = metrics.evaluate_scans("mtl-uncertainty-calibrated", [_scan("a", 2, 3, ("II", "II"))])
    lines = metrics.format_detection_table([report]).splitlines()
    # The model column widens to the 26-character name, so every line puts its first bar at 27.
    assert [line.index("|") for line in (lines[0], lines[1], lines[3])] == [27, 27, 27]


def test_counts_json_writes_undefined_ratio_as_null():
    import json

    document = metrics.DetectionCounts(0, 0, 4).to_json()
    assert document["ppv"] is None
    assert document["sensitivity"] == 0.0
    assert json.loads(json.dumps(document, allow_nan=False))["ppv"] is None
