"""Evaluation metrics of Föllmer et al. (Med Phys 2022) and their tables.

- Volume level (voxel-wise over the whole scan): PPV, sensitivity and F1 of
  the binary calcification (any artery against none).
- Lesion level: 3D lesions are 6-connected components of coronary calcium
  voxels of at least 1.5 mm³. A true lesion is found when any predicted
  calcium voxel overlaps it; a predicted lesion is correct when it overlaps
  any true calcium voxel.
- Micro-F1 of the CAR task over the three arteries on annotated pixels, with
  OTHER_CAR excluded: a pixel given the wrong artery counts as a false
  positive for the predicted artery and a false negative for the true one.
- Micro-F1 of the multiclass calcification (LAD, LCX, RCA) the same way.
- ICC of the per-scan calcium volume: ICC(2,1) of Shrout and Fleiss (1979),
  two-way random effects, absolute agreement, single measurement.
- Linearly weighted Cohen's κ of the risk categories I–IV with the confusion matrix.

`format_detection_table` and `format_agreement_table` print them in the
layout of the paper's Table 2 (detection) and Table 5 (agreement).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from scoring.result import LAD, RCA

#: Risk categories in order; the confusion matrix and κ use this order.
RISK_CATEGORIES: tuple[str, ...] = ("I", "II", "III", "IV")

#: Minimum 3D lesion volume of the lesion-level metrics, in mm³.
MINIMUM_LESION_VOLUME_MM3 = 1.5

_SIX_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class DetectionCounts:
    """True positives, false positives and false negatives, with PPV, sensitivity and F1.

    A ratio with a zero denominator is NaN, except F1, which is 1.0 when there
    is nothing to find and nothing was found.
    """

    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def ppv(self) -> float:
        return _ratio(self.true_positives, self.true_positives + self.false_positives)

    @property
    def sensitivity(self) -> float:
        return _ratio(self.true_positives, self.true_positives + self.false_negatives)

    @property
    def f1(self) -> float:
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        if denominator == 0:
            return 1.0
        return 2 * self.true_positives / denominator

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
        )

    def to_json(self) -> dict[str, float | None]:
        """Counts and ratios; a ratio with a zero denominator becomes None (JSON null)."""
        return {
            **asdict(self),
            "ppv": _json_float(self.ppv),
            "sensitivity": _json_float(self.sensitivity),
            "f1": _json_float(self.f1),
        }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _coronary(labels: np.ndarray) -> np.ndarray:
    return (labels >= LAD) & (labels <= RCA)


def binary_voxel_counts(predicted: np.ndarray, truth: np.ndarray) -> DetectionCounts:
    """Voxel counts of the binary calcification (labels 1–3 against all else)."""
    predicted_calcium = _coronary(np.asarray(predicted))
    true_calcium = _coronary(np.asarray(truth))
    _check_same_shape(predicted_calcium, true_calcium)
    return DetectionCounts(
        int(np.count_nonzero(predicted_calcium & true_calcium)),
        int(np.count_nonzero(predicted_calcium & ~true_calcium)),
        int(np.count_nonzero(~predicted_calcium & true_calcium)),
    )


def binary_voxel_metrics(predicted: np.ndarray, truth: np.ndarray) -> DetectionCounts:
    """Alias of `binary_voxel_counts`: the counts carry PPV, sensitivity and F1."""
    return binary_voxel_counts(predicted, truth)


def multiclass_counts(
    predicted: np.ndarray, truth: np.ndarray, classes: Sequence[int] = (1, 2, 3),
    valid: np.ndarray | None = None,
) -> DetectionCounts:
    """Micro-averaged counts over `classes`; other values count as negative.

    A voxel whose true class is in `classes` and whose predicted class is a
    different member counts once as FP and once as FN. valid: evaluate only
    where True (None for everywhere).
    """
    predicted = np.asarray(predicted)
    truth = np.asarray(truth)
    _check_same_shape(predicted, truth)
    if valid is None:
        valid = np.ones(truth.shape, dtype=bool)
    predicted_positive = np.isin(predicted, classes) & valid
    true_positive_class = np.isin(truth, classes) & valid
    correct = predicted_positive & (predicted == truth)
    true_positives = int(np.count_nonzero(correct))
    return DetectionCounts(
        true_positives,
        int(np.count_nonzero(predicted_positive)) - true_positives,
        int(np.count_nonzero(true_positive_class)) - true_positives,
    )


def multiclass_micro_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Micro-F1 of the multiclass calcification over LAD, LCX and RCA."""
    return multiclass_counts(predicted, truth).f1


def region_micro_f1(predicted_regions: np.ndarray, region_target: np.ndarray) -> float:
    """Micro-F1 of the CAR task over LAD, LCX, RCA on annotated pixels (target ≥ 0)."""
    return region_counts(predicted_regions, region_target).f1


def region_counts(predicted_regions: np.ndarray, region_target: np.ndarray) -> DetectionCounts:
    """Micro-averaged CAR counts on annotated pixels, OTHER_CAR (0) excluded as a class."""
    region_target = np.asarray(region_target)
    return multiclass_counts(predicted_regions, region_target, valid=region_target >= 0)


def lesion_counts(
    predicted: np.ndarray, truth: np.ndarray, voxel_volume_mm3: float,
    minimum_volume_mm3: float = MINIMUM_LESION_VOLUME_MM3,
) -> DetectionCounts:
    """Lesion-level counts of the binary calcification.

    Lesions are 6-connected components of labels 1–3 with at least
    `minimum_volume_mm3` (inclusive). TP: true lesions overlapped by any
    predicted calcium voxel. FN: the other true lesions. FP: predicted lesions
    that overlap no true calcium voxel.
    """
    if voxel_volume_mm3 <= 0:
        raise ValueError(f"voxel volume must be positive, got {voxel_volume_mm3} mm³")
    predicted_calcium = _coronary(np.asarray(predicted))
    true_calcium = _coronary(np.asarray(truth))
    _check_same_shape(predicted_calcium, true_calcium)
    minimum_voxels = minimum_volume_mm3 / voxel_volume_mm3

    true_components, true_large = _large_components(true_calcium, minimum_voxels)
    predicted_components, predicted_large = _large_components(predicted_calcium, minimum_voxels)
    overlapped_true = np.unique(true_components[predicted_calcium])
    overlapped_predicted = np.unique(predicted_components[true_calcium])
    found = int(np.count_nonzero(np.isin(true_large, overlapped_true)))
    false_positives = int(np.count_nonzero(~np.isin(predicted_large, overlapped_predicted)))
    return DetectionCounts(found, false_positives, len(true_large) - found)


def _large_components(mask: np.ndarray, minimum_voxels: float) -> tuple[np.ndarray, np.ndarray]:
    """6-connected component ids of `mask` and the ids of those with ≥ minimum_voxels voxels."""
    components, count = ndimage.label(mask, structure=_SIX_CONNECTIVITY)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    ids = np.arange(1, count + 1)
    # A small tolerance, because 1.5 mm³ in voxels is rarely a whole number.
    return components, ids[sizes[1:] >= minimum_voxels - 1e-9]


def _check_same_shape(first: np.ndarray, second: np.ndarray) -> None:
    if first.shape != second.shape:
        raise ValueError(
            f"predicted labels of shape {first.shape} and reference labels of shape "
            f"{second.shape} cannot be compared; both must cover the same voxels"
        )


def icc_absolute_agreement(first: Sequence[float], second: Sequence[float]) -> float:
    """ICC(2,1): two-way random effects, absolute agreement, single rater (Shrout & Fleiss 1979).

    ICC = (MSR − MSE) / (MSR + (k − 1) MSE + k (MSC − MSE) / n) with k = 2
    raters and n scans. NaN when fewer than 2 scans or all values are equal.
    """
    data = np.column_stack([np.asarray(first, float), np.asarray(second, float)])
    scans, raters = data.shape
    if scans < 2:
        return math.nan
    grand_mean = data.mean()
    row_means = data.mean(axis=1)
    column_means = data.mean(axis=0)
    mean_square_rows = raters * np.sum((row_means - grand_mean) ** 2) / (scans - 1)
    mean_square_columns = scans * np.sum((column_means - grand_mean) ** 2) / (raters - 1)
    residual = data - row_means[:, None] - column_means[None, :] + grand_mean
    mean_square_error = np.sum(residual**2) / ((scans - 1) * (raters - 1))
    denominator = (
        mean_square_rows
        + (raters - 1) * mean_square_error
        + raters * (mean_square_columns - mean_square_error) / scans
    )
    if denominator == 0:
        return math.nan
    return float((mean_square_rows - mean_square_error) / denominator)


def risk_confusion_matrix(
    reference: Sequence[str], predicted: Sequence[str]
) -> np.ndarray:
    """4 × 4 counts: rows the reference category I–IV, columns the predicted one."""
    if len(reference) != len(predicted):
        raise ValueError(
            f"{len(reference)} reference and {len(predicted)} predicted risk categories; "
            "expected one of each per scan"
        )
    matrix = np.zeros((len(RISK_CATEGORIES), len(RISK_CATEGORIES)), dtype=np.int64)
    for true_category, predicted_category in zip(reference, predicted):
        for category in (true_category, predicted_category):
            if category not in RISK_CATEGORIES:
                raise ValueError(
                    f"unknown risk category {category!r}; expected one of "
                    f"{', '.join(RISK_CATEGORIES)}"
                )
        matrix[RISK_CATEGORIES.index(true_category), RISK_CATEGORIES.index(predicted_category)] += 1
    return matrix


def linear_weighted_kappa(confusion: np.ndarray) -> float:
    """Cohen's κ with linear weights w_ij = 1 − |i − j| / (k − 1) from a k × k confusion matrix.

    NaN when the matrix is empty; 1.0 when expected and observed agreement are both perfect.
    """
    confusion = np.asarray(confusion, dtype=float)
    total = confusion.sum()
    if total == 0:
        return math.nan
    k = confusion.shape[0]
    indices = np.arange(k)
    weights = 1.0 - np.abs(indices[:, None] - indices[None, :]) / (k - 1)
    observed = confusion / total
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    observed_agreement = float(np.sum(weights * observed))
    expected_agreement = float(np.sum(weights * expected))
    if expected_agreement == 1.0:
        return 1.0 if observed_agreement == 1.0 else math.nan
    return (observed_agreement - expected_agreement) / (1.0 - expected_agreement)


@dataclass(frozen=True)
class ScanEvaluation:
    """The reference and predicted outcome of one scan, the input of `evaluate_scans`.

    regions_predicted/regions_target: CAR prediction and target (−1 unlabelled),
    None when the scan has no CAR annotation.
    """

    name: str
    predicted_labels: np.ndarray
    true_labels: np.ndarray
    voxel_volume_mm3: float
    predicted_volume_mm3: float
    true_volume_mm3: float
    predicted_agatston: float
    true_agatston: float
    predicted_risk: str
    true_risk: str
    regions_predicted: np.ndarray | None = None
    regions_target: np.ndarray | None = None


@dataclass(frozen=True)
class EvaluationReport:
    """All metrics of one model on one set of scans."""

    model: str
    scans: int
    voxel: DetectionCounts
    lesion: DetectionCounts
    car: DetectionCounts | None
    multiclass: DetectionCounts
    icc_volume: float
    kappa_risk: float
    risk_confusion: np.ndarray
    per_scan: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "scans": self.scans,
            "volume_level": self.voxel.to_json(),
            "lesion_level": self.lesion.to_json(),
            "micro_f1_car": None if self.car is None else self.car.f1,
            "car_counts": None if self.car is None else self.car.to_json(),
            "micro_f1_cac": self.multiclass.f1,
            "cac_counts": self.multiclass.to_json(),
            "icc_volume": _json_float(self.icc_volume),
            "kappa_risk_linear": _json_float(self.kappa_risk),
            "risk_categories": list(RISK_CATEGORIES),
            "risk_confusion": self.risk_confusion.tolist(),
            "per_scan": list(self.per_scan),
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def evaluate_scans(model: str, scans: Sequence[ScanEvaluation]) -> EvaluationReport:
    """Pool voxel, lesion and class counts over `scans` and compute ICC and κ."""
    if not scans:
        raise ValueError("no scans to evaluate")
    voxel = DetectionCounts(0, 0, 0)
    lesion = DetectionCounts(0, 0, 0)
    multiclass = DetectionCounts(0, 0, 0)
    car: DetectionCounts | None = None
    per_scan = []
    for scan in scans:
        voxel += binary_voxel_counts(scan.predicted_labels, scan.true_labels)
        lesion += lesion_counts(scan.predicted_labels, scan.true_labels, scan.voxel_volume_mm3)
        multiclass += multiclass_counts(scan.predicted_labels, scan.true_labels)
        if scan.regions_predicted is not None and scan.regions_target is not None:
            counts = region_counts(scan.regions_predicted, scan.regions_target)
            car = counts if car is None else car + counts
        per_scan.append({
            "name": scan.name,
            "true_agatston": scan.true_agatston,
            "predicted_agatston": scan.predicted_agatston,
            "true_volume_mm3": scan.true_volume_mm3,
            "predicted_volume_mm3": scan.predicted_volume_mm3,
            "true_risk": scan.true_risk,
            "predicted_risk": scan.predicted_risk,
        })
    confusion = risk_confusion_matrix(
        [scan.true_risk for scan in scans], [scan.predicted_risk for scan in scans]
    )
    return EvaluationReport(
        model=model,
        scans=len(scans),
        voxel=voxel,
        lesion=lesion,
        car=car,
        multiclass=multiclass,
        icc_volume=icc_absolute_agreement(
            [scan.true_volume_mm3 for scan in scans],
            [scan.predicted_volume_mm3 for scan in scans],
        ),
        kappa_risk=linear_weighted_kappa(confusion),
        risk_confusion=confusion,
        per_scan=tuple(per_scan),
    )


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def format_detection_table(reports: Sequence[EvaluationReport]) -> str:
    """Detection table in the layout of the paper's Table 2, one row per model.

    Columns: volume-level PPV, sensitivity, F1; lesion-level PPV, sensitivity,
    F1; micro-F1 of CAR; micro-F1 of the multiclass CAC.
    """
    width = max([18, *(len(report.model) for report in reports)])
    header = (
        f"{'Model':<{width}} | {'Volume level':^23} | {'Lesion level':^23} | {'F1 CAR':>7} | "
        f"{'F1 CAC':>7}\n"
        f"{'':<{width}} | {'PPV':>7}{'Sens':>8}{'F1':>8} | {'PPV':>7}{'Sens':>8}{'F1':>8} | "
        f"{'micro':>7} | {'micro':>7}"
    )
    lines = [header, "-" * len(header.splitlines()[0])]
    for report in reports:
        car_f1 = None if report.car is None else report.car.f1
        lines.append(
            f"{report.model:<{width}} | {_cell(report.voxel.ppv):>7}"
            f"{_cell(report.voxel.sensitivity):>8}"
            f"{_cell(report.voxel.f1):>8} | {_cell(report.lesion.ppv):>7}"
            f"{_cell(report.lesion.sensitivity):>8}{_cell(report.lesion.f1):>8} | "
            f"{_cell(car_f1):>7} | {_cell(report.multiclass.f1):>7}"
        )
    return "\n".join(lines)


def format_agreement_table(report: EvaluationReport) -> str:
    """Agreement table in the layout of the paper's Table 5: risk confusion matrix, κ and ICC.

    Rows are the reference categories, columns the model's.
    """
    width = 6
    lines = [
        f"Risk categories, {report.model} (rows: reference, columns: model), {report.scans} "
        f"scan{'' if report.scans == 1 else 's'}",
        f"{'':>8}" + "".join(f"{category:>{width}}" for category in RISK_CATEGORIES),
    ]
    for row_index, category in enumerate(RISK_CATEGORIES):
        lines.append(
            f"{category:>8}"
            + "".join(f"{count:>{width}d}" for count in report.risk_confusion[row_index])
        )
    lines.append(f"Linearly weighted Cohen's kappa: {_cell(report.kappa_risk)}")
    lines.append(f"ICC(2,1) of calcium volume: {_cell(report.icc_volume)}")
    return "\n".join(lines)


def summary_rows(reports: Mapping[str, EvaluationReport]) -> dict[str, Any]:
    """JSON form of several reports keyed by model name."""
    return {name: report.to_json() for name, report in reports.items()}
