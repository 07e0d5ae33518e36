"""Evaluation of a trained model on annotated series: segment, score, and compare with the reference."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scoring import metrics
from scoring.volume import CTVolume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationCase:
    """An annotated series: the volume, its reference CAC labels and CAR target.

    regions_target: int8 CAR target (−1 unlabelled, 0 OTHER_CAR, 1–3 arteries),
    None when the series has no CAR annotation.
    """

    name: str
    volume: CTVolume
    labels: np.ndarray
    regions_target: np.ndarray | None = None


def phantom_evaluation_cases(seeds: Iterable[int], **options) -> list[EvaluationCase]:
    """Generate phantom series in memory, as the CTVolume `load_series` gives for their files."""
    from scoring import phantom
    from scoring.training import phantom_region_mapping, region_target_from_annotation

    cases = []
    for seed in seeds:
        case = phantom.make_case(int(seed), **options)
        volume = case.to_volume()
        regions = region_target_from_annotation(case.regions, phantom_region_mapping())
        cases.append(EvaluationCase(f"phantom-{seed}", volume, np.asarray(case.labels), regions))
    return cases


def folder_evaluation_cases(root: Path) -> list[EvaluationCase]:
    """Load annotated series from a folder laid out as for `scoring.training.folder_cases`."""
    from scoring.labels import read_label_map
    from scoring.series import load_series
    from scoring.training import (
        LABEL_MAP_NAMES,
        REGION_MAP_NAMES,
        _first_existing,
        annotated_case_folders,
        phantom_region_mapping,
        region_target_from_annotation,
    )

    case_dirs = annotated_case_folders(root, "dicom/ and labels.nrrd (or .nii.gz, .dcm)")
    cases = []
    for case_dir in case_dirs:
        label_path = _first_existing(case_dir, LABEL_MAP_NAMES)
        if label_path is None:
            raise FileNotFoundError(
                f"case {case_dir} lacks a label map: expected one of {', '.join(LABEL_MAP_NAMES)}"
            )
        volume = load_series(case_dir / "dicom")
        labels = read_label_map(label_path, volume, calcium=True)
        region_path = _first_existing(case_dir, REGION_MAP_NAMES)
        regions = None
        if region_path is not None:
            annotation = read_label_map(region_path, volume)
            mapping = {1: 1, 2: 2, 3: 3, 4: 0} if region_path.suffix == ".dcm" else (
                phantom_region_mapping()
            )
            regions = region_target_from_annotation(annotation, mapping)
        cases.append(EvaluationCase(case_dir.name, volume, labels, regions))
    return cases


def evaluate_model(
    model_name: str,
    loaded_model,
    cases: Sequence[EvaluationCase],
    *,
    batch_size: int = 4,
    runtime: str = "torch",
) -> metrics.EvaluationReport:
    """Segment and score every case with `loaded_model` and pool the metrics.

    loaded_model: a `scoring.inference.LoadedModel`. runtime: as in `segment_volume`.
    Returns the EvaluationReport; its per-scan rows hold reference and
    predicted Agatston, volume and risk category.
    """
    from scoring.agatston import score_volume
    from scoring.inference import segment_volume

    scans = []
    for case in cases:
        started = time.perf_counter()
        segmentation = segment_volume(
            case.volume, loaded_model, batch_size=batch_size, runtime=runtime
        )
        predicted = score_volume(case.volume, segmentation.labels)
        reference = score_volume(case.volume, case.labels)
        logger.info(
            "evaluated %s with %s: Agatston %.1f (reference %.1f), risk %s (reference %s), "
            "%.1f s", case.name, model_name, predicted.agatston["total"],
            reference.agatston["total"], predicted.risk_category, reference.risk_category,
            time.perf_counter() - started,
        )
        scans.append(metrics.ScanEvaluation(
            name=case.name,
            predicted_labels=segmentation.labels,
            true_labels=case.labels,
            voxel_volume_mm3=case.volume.voxel_volume_mm3,
            predicted_volume_mm3=predicted.volume_mm3["total"],
            true_volume_mm3=reference.volume_mm3["total"],
            predicted_agatston=predicted.agatston["total"],
            true_agatston=reference.agatston["total"],
            predicted_risk=predicted.risk_category,
            true_risk=reference.risk_category,
            regions_predicted=(
                segmentation.regions if loaded_model.architecture != "single" else None
            ),
            regions_target=case.regions_target,
        ))
    return metrics.evaluate_scans(model_name, scans)


# ---------------------------------------------------------------------------
# Calibration of the lesion decision


#: Thresholds that `lesion_threshold_sweep` tries by default: 0.50 to 0.95 in steps of 0.01.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.01 * step, 2) for step in range(46))


@dataclass(frozen=True)
class ThresholdResult:
    """Multiclass CAC counts over all calibration series at one lesion threshold (None: argmax)."""

    threshold: float | None
    counts: metrics.DetectionCounts


def lesion_threshold_sweep(
    loaded_model,
    cases: Sequence[EvaluationCase],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    batch_size: int = 4,
) -> list[ThresholdResult]:
    """Count multiclass CAC TP, FP and FN of `loaded_model` for the argmax rule and each threshold.

    loaded_model: a `scoring.inference.LoadedModel`, run in torch on its device.
    See `sweep_thresholds` for the results.
    """
    series = [(np.asarray(case.volume.hu), case.labels) for case in cases]
    return sweep_thresholds(
        loaded_model.network, loaded_model.device, series, thresholds, batch_size=batch_size
    )


def sweep_thresholds(
    network,
    device,
    series: Iterable[tuple[np.ndarray, np.ndarray]],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    batch_size: int = 4,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[ThresholdResult]:
    """Count multiclass CAC TP, FP and FN of a network for the argmax rule and each threshold.

    series: (HU volume, reference CAC labels) pairs. The network runs once per
    series in eval mode, on the body window as in `segment_volume`, under the
    context manager that `autocast` returns. The first result is the argmax
    rule; the others follow `thresholds` in order.
    """
    import torch

    from scoring.inference import body_window, predict_array
    from scoring.model import check_lesion_threshold, combine_outputs

    for threshold in thresholds:
        check_lesion_threshold(threshold)

    def predict(inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = inputs.to(device)
        candidate = inputs[:, 1] > 0.5
        with autocast():
            output = network(inputs.contiguous(memory_format=torch.channels_last))
        argmax_labels, _ = combine_outputs(output, candidate)
        # The label each candidate gets if it is called calcium (0 where its CAC
        # probability rounds to 0), and the probability compared with each threshold.
        every_labels, _ = combine_outputs(output, candidate, lesion_threshold=1e-12)
        logits = output[1] if isinstance(output, tuple) else output
        probability = 1.0 - torch.softmax(logits.float(), dim=1)[:, 0]
        return argmax_labels, every_labels, torch.where(candidate, probability, 0.0)

    was_training = network.training
    network.eval()
    totals = [metrics.DetectionCounts(0, 0, 0) for _ in range(len(thresholds) + 1)]
    try:
        for hu, labels in series:
            argmax_labels, every_labels, probability = predict_array(
                hu, body_window(hu), predict, batch_size
            )
            totals[0] += metrics.multiclass_counts(argmax_labels, labels)
            for index, threshold in enumerate(thresholds, start=1):
                decided = np.where(probability > threshold, every_labels, 0)
                totals[index] += metrics.multiclass_counts(decided, labels)
    finally:
        network.train(was_training)
    return [
        ThresholdResult(threshold, counts)
        for threshold, counts in zip((None, *thresholds), totals)
    ]


def best_threshold(results: Sequence[ThresholdResult]) -> ThresholdResult:
    """Pick the result with the highest multiclass micro-F1.

    Among equal F1 values the one with the fewest errors (FP + FN) wins. So
    where every decision misses all calcium, fewer false positives still
    count. After that, the earliest result wins.
    """
    def key(result: ThresholdResult) -> tuple[float, int]:
        value = result.counts.f1
        errors = result.counts.false_positives + result.counts.false_negatives
        return (-1.0 if value != value else value, -errors)

    return max(results, key=key)


def write_calibrated_model(
    source: Path, destination: Path, chosen: ThresholdResult,
    results: Sequence[ThresholdResult], series: Sequence[str],
) -> str:
    """Copy the weights of `source` with the chosen lesion threshold in the metadata.

    The copy has no training state. Its model version is the model name and
    the weights' hash, as `export_model` writes it, with "-t" and the
    threshold appended (nothing for the argmax rule), so reports tell the
    two decisions apart. Returns the model version.
    """
    from scoring import checkpoint as checkpoint_module

    checkpoint = checkpoint_module.load_checkpoint(source)
    metadata = dict(checkpoint.metadata)
    version = checkpoint_module.model_version(
        metadata.get("model_name", checkpoint.architecture), checkpoint.state_dict,
        chosen.threshold,
    )
    metadata.pop("lesion_threshold", None)
    if chosen.threshold is not None:
        metadata["lesion_threshold"] = chosen.threshold
    metadata["model_version"] = version
    metadata["lesion_threshold_calibration"] = {
        "series": list(series),
        "chosen": chosen.threshold,
        "results": [
            {"threshold": result.threshold, **result.counts.to_json()} for result in results
        ],
    }
    checkpoint_module.save_checkpoint(
        destination,
        checkpoint_module.Checkpoint(checkpoint.architecture, checkpoint.state_dict, metadata),
    )
    return version
