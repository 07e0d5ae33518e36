"""Evaluation of a trained model on annotated series: segment, score, and compare with the reference."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
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
        phantom_region_mapping,
        region_target_from_annotation,
    )

    root = Path(root)
    case_dirs = sorted(p.parent for p in root.rglob("dicom") if p.is_dir())
    if not case_dirs:
        raise FileNotFoundError(
            f"no annotated series found under {root}: expected folders holding dicom/ and "
            "labels.nrrd (or .nii.gz, .dcm)"
        )
    cases = []
    for case_dir in case_dirs:
        label_path = _first_existing(case_dir, LABEL_MAP_NAMES)
        if label_path is None:
            raise FileNotFoundError(
                f"case {case_dir} lacks a label map: expected one of {', '.join(LABEL_MAP_NAMES)}"
            )
        volume = load_series(case_dir / "dicom")
        labels = read_label_map(label_path, volume)
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
