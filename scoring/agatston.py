"""Agatston, volume and mass scores per coronary artery from a CT volume and its CAC label map.

The rules, with their sources, are in docs/scoring-rules.md. In short:

- Candidate voxels carry an artery label (1 LAD with the left main, 2 LCX,
  3 RCA) and have HU ≥ the threshold (130 HU, inclusive, on float HU).
  Background (0), non-coronary calcium (4) and pixel padding are ignored.
- Agatston: on each slice, a lesion is a 2D component of one artery's
  candidate voxels with 8-connectivity. Lesions with an area below the
  minimum (1 mm², inclusive) are dropped. Area = pixel count × row spacing ×
  column spacing. The weight comes from the lesion's peak HU on that slice:
  1 below 200, 2 for [200, 300), 3 for [300, 400), 4 for ≥ 400. The sum of
  area × weight is multiplied by slice increment / 3 mm.
- Scored voxels are the voxels of the 2D lesions that pass the minimum area.
  Volume and mass count exactly these voxels, so a voxel counts for all three
  scores or for none.
  Volume = scored voxels × pixel area × slice increment.
  Mass = Σ lesions mean HU × volume (cm³) × calibration factor, which equals
  Σ scored voxels HU × voxel volume (cm³) × factor.
- Lesion list: 3D components of one artery's scored voxels with
  6-connectivity, listed when their volume is ≥ 1.5 mm³. Each voxel carries
  pixel area × its 2D lesion's weight × normalisation factor, so a lesion's
  Agatston share is the sum over its voxels. Listed lesions add up to the
  artery's scores unless some 3D component is under 1.5 mm³.
- Risk category from the total Agatston score: I = 0, II = (0, 100),
  III = [100, 300), IV ≥ 300. CAC-DRS: "A0", or "A1"/"A2"/"A3" for the same
  ranges followed by "/N" and the number of arteries with calcium.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from scoring.config import ScoringParameters
from scoring.errors import LabelError, SliceSpacingError
from scoring.result import (
    ARTERIES,
    ARTERY_LABELS,
    OTHER_CALCIUM,
    Lesion,
    ScoringResult,
)
from scoring.volume import CTVolume, ProtocolFlag

logger = logging.getLogger(__name__)

#: Lower HU bounds of density weights 2, 3 and 4 (Agatston 1990). A peak below
#: 200 HU gets weight 1.
DENSITY_WEIGHT_BOUNDS_HU = (200.0, 300.0, 400.0)

#: In-plane 8-connectivity without links between slices: labelling the whole
#: volume with this structure yields the 2D components of every slice at once.
IN_PLANE_8_CONNECTIVITY = np.array(
    [
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
        [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
    ],
    dtype=bool,
)

#: 3D face connectivity (6 neighbours) for the lesion list.
FACE_6_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)

#: Slack for the inclusive minimum area and volume, in mm² or mm³. Pixel areas
#: such as 0.5 × 0.5 mm can make 4 pixels 0.9999999999999999 mm² in float, and
#: that lesion must still count as 1.0 mm².
SIZE_TOLERANCE = 1e-9

#: Largest label value a CAC label map may contain (OTHER_CALCIUM).
MAX_LABEL_VALUE = OTHER_CALCIUM


@dataclass(frozen=True)
class _ArteryScore:
    """Scores and lesions of one artery."""

    agatston: float
    volume_mm3: float
    mass_mg: float
    lesions: tuple[Lesion, ...]


def density_weight(peak_hu: np.ndarray | float) -> np.ndarray:
    """Return the Agatston density weight (1–4) for each peak HU value.

    Weight 1 below 200 HU, 2 for [200, 300), 3 for [300, 400), 4 from 400 HU.
    """
    return np.digitize(np.asarray(peak_hu, dtype=np.float64), DENSITY_WEIGHT_BOUNDS_HU) + 1


def normalization_factor(slice_increment: float, reference_increment_mm: float = 3.0) -> float:
    """Return slice increment / reference increment, the factor applied to the Agatston sum.

    Raises:
        SliceSpacingError: the increment is not a positive finite number.
    """
    if not math.isfinite(slice_increment) or slice_increment <= 0:
        raise SliceSpacingError(
            f"slice increment {slice_increment!r} mm is not a positive number, but the "
            "Agatston normalisation needs the measured distance between slices. "
            "Reload the series with scoring.series.load_series."
        )
    return float(slice_increment) / float(reference_increment_mm)


def risk_category(total_agatston: float) -> str:
    """Return the risk category: "I" (0), "II" (>0, <100), "III" ([100, 300)), "IV" (≥300)."""
    if total_agatston <= 0:
        return "I"
    if total_agatston < 100:
        return "II"
    if total_agatston < 300:
        return "III"
    return "IV"


def cac_drs_grade(total_agatston: float, artery_count: int) -> str:
    """Return the CAC-DRS grade, "A0" or "A1"–"A3" followed by "/N<artery_count>".

    The Agatston ranges are those of the risk category: A1 (>0, <100),
    A2 ([100, 300)), A3 (≥300).
    """
    category = risk_category(total_agatston)
    if category == "I":
        return "A0"
    grade = {"II": "A1", "III": "A2", "IV": "A3"}[category]
    # TODO(#2): CAC-DRS counts the left main as its own vessel (N up to 4), but
    # the label map folds it into the LAD, so N never exceeds 3 here.
    return f"{grade}/N{artery_count}"


def score_volume(
    volume: CTVolume,
    labels: np.ndarray,
    parameters: ScoringParameters = ScoringParameters(),
) -> ScoringResult:
    """Compute Agatston, volume and mass per artery, the lesion list, risk category and CAC-DRS.

    Parameters:
        volume: the CT series in volume order.
        labels: integer label map of `volume.shape`: 0 background, 1 LAD (with
            the left main), 2 LCX, 3 RCA, 4 non-coronary calcium (ignored).
        parameters: threshold, minimum lesion area and volume, reference
            increment and the default mass calibration factor.

    Returns:
        The ScoringResult. Its flags are the volume's flags plus
        MASS_UNCALIBRATED when the default calibration factor was used.

    Raises:
        LabelError: the label map has another shape, a non-integer type, or
            values outside 0–4.
        SliceSpacingError: the volume's slice increment is not positive.
        ValueError: a scoring parameter is out of range.
    """
    started = time.perf_counter()
    _validate_parameters(parameters)
    labels = _validated_labels(volume, labels)
    factor = normalization_factor(volume.slice_increment, parameters.reference_increment_mm)
    calibration, calibrated, calibration_flags = _mass_calibration(volume, parameters)

    candidates = _candidate_mask(volume, labels, parameters)
    crop = _bounding_box(candidates)

    artery_scores: dict[str, _ArteryScore] = {}
    for artery in ARTERIES:
        if crop is None:
            artery_scores[artery] = _ArteryScore(0.0, 0.0, 0.0, ())
            continue
        artery_mask = candidates[crop] & (labels[crop] == ARTERY_LABELS[artery])
        artery_scores[artery] = _score_artery(
            artery, artery_mask, volume, crop, factor, calibration, parameters
        )

    agatston = {artery: artery_scores[artery].agatston for artery in ARTERIES}
    volume_mm3 = {artery: artery_scores[artery].volume_mm3 for artery in ARTERIES}
    mass_mg = {artery: artery_scores[artery].mass_mg for artery in ARTERIES}
    for scores in (agatston, volume_mm3, mass_mg):
        scores["total"] = scores["LAD"] + scores["LCX"] + scores["RCA"]

    arteries_with_calcium = sum(1 for artery in ARTERIES if agatston[artery] > 0)
    lesions = tuple(lesion for artery in ARTERIES for lesion in artery_scores[artery].lesions)
    flags = _merge_flags(volume.flags, calibration_flags)
    result = ScoringResult(
        series_instance_uid=volume.series_instance_uid,
        normalization_factor=factor,
        agatston=agatston,
        volume_mm3=volume_mm3,
        mass_mg=mass_mg,
        risk_category=risk_category(agatston["total"]),
        cac_drs=cac_drs_grade(agatston["total"], arteries_with_calcium),
        lesions=lesions,
        mass_calibration_factor=calibration,
        mass_calibrated=calibrated,
        threshold_hu=float(parameters.threshold_hu),
        flags=flags,
    )
    logger.info(
        "scored series %s: Agatston %.1f (risk %s, %s), %d lesions, %.0f ms",
        volume.series_instance_uid,
        agatston["total"],
        result.risk_category,
        result.cac_drs,
        len(lesions),
        (time.perf_counter() - started) * 1000,
    )
    return result


def scored_voxel_labels(
    volume: CTVolume,
    labels: np.ndarray,
    parameters: ScoringParameters = ScoringParameters(),
) -> np.ndarray:
    """Return the voxels that `score_volume` counts, labelled with their artery.

    A voxel is scored when it is an artery candidate (label 1–3, HU at or
    above the threshold, not padding) in a 2D 8-connected lesion whose area
    reaches the minimum lesion area. Writers use this map so that a SEG
    covers exactly the voxels behind the volume and mass scores.

    Parameters:
        volume: the CT series in volume order.
        labels: integer label map of `volume.shape` with values 0–4.
        parameters: the scoring parameters of the result being described.

    Returns:
        A uint8 array of `volume.shape`: 1 LAD, 2 LCX, 3 RCA on scored voxels, 0 elsewhere.

    Raises:
        LabelError: the label map has another shape, a non-integer type, or
            values outside 0–4.
        ValueError: a scoring parameter is out of range.
    """
    _validate_parameters(parameters)
    labels = _validated_labels(volume, labels)
    scored = np.zeros(volume.shape, dtype=np.uint8)
    candidates = _candidate_mask(volume, labels, parameters)
    crop = _bounding_box(candidates)
    if crop is None:
        return scored
    scored_crop = scored[crop]
    for artery in ARTERIES:
        artery_mask = candidates[crop] & (labels[crop] == ARTERY_LABELS[artery])
        components, _, passes_minimum_area = _planar_lesions(artery_mask, volume.pixel_area_mm2, parameters)
        scored_crop[passes_minimum_area[components]] = ARTERY_LABELS[artery]
    return scored


def _candidate_mask(volume: CTVolume, labels: np.ndarray, parameters: ScoringParameters) -> np.ndarray:
    """Return the artery-labelled voxels at or above the threshold that are not padding."""
    candidates = volume.hu >= parameters.threshold_hu
    candidates &= (labels >= 1) & (labels <= max(ARTERY_LABELS.values()))
    candidates &= ~volume.padding_mask
    return candidates


def _planar_lesions(
    artery_mask: np.ndarray, pixel_area: float, parameters: ScoringParameters
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label the 2D 8-connected lesions of one artery's candidates on every slice at once.

    Returns the component map (0 background), the pixel count of each
    component id and whether each id reaches the minimum lesion area. Both
    arrays have one entry per id. Id 0 (background) counts 0 pixels and never passes.
    """
    components, component_count = ndimage.label(artery_mask, structure=IN_PLANE_8_CONNECTIVITY)
    pixel_counts = np.bincount(components[artery_mask], minlength=component_count + 1)
    passes_minimum_area = pixel_counts * pixel_area >= parameters.minimum_lesion_area_mm2 - SIZE_TOLERANCE
    passes_minimum_area[0] = False
    return components, pixel_counts, passes_minimum_area


def _score_artery(
    artery: str,
    artery_mask: np.ndarray,
    volume: CTVolume,
    crop: tuple[slice, slice, slice],
    factor: float,
    calibration: float,
    parameters: ScoringParameters,
) -> _ArteryScore:
    """Score one artery's candidate voxels inside the bounding box `crop`.

    Per-lesion statistics run on the 1D arrays of candidate voxels only, because
    scipy.ndimage.maximum sorts every voxel of its input, background included.
    """
    pixel_area = volume.pixel_area_mm2
    voxel_volume = volume.voxel_volume_mm3

    components, pixel_counts, passes_minimum_area = _planar_lesions(artery_mask, pixel_area, parameters)
    component_count = pixel_counts.size - 1
    if component_count == 0:
        return _ArteryScore(0.0, 0.0, 0.0, ())
    component_ids = components[artery_mask]
    voxel_hu = volume.hu[crop][artery_mask].astype(np.float64)
    peaks = np.full(component_count + 1, -np.inf)
    np.maximum.at(peaks, component_ids, voxel_hu)
    weights = np.where(passes_minimum_area, density_weight(peaks), 0)

    # Sum integer pixel counts × weights first, so the float error is one multiplication.
    weighted_pixels = int(np.sum(pixel_counts * weights))
    agatston = weighted_pixels * pixel_area * factor

    # Scored voxels: those of the 2D lesions that pass the minimum area.
    voxel_weights = weights[component_ids]
    scored = voxel_weights > 0
    scored_count = int(np.count_nonzero(scored))
    volume_mm3 = scored_count * voxel_volume
    mass_mg = float(np.sum(voxel_hu[scored])) * voxel_volume / 1000.0 * calibration

    scored_mask = np.zeros(artery_mask.shape, dtype=bool)
    scored_mask[artery_mask] = scored
    lesions = _list_lesions(
        artery,
        scored_mask,
        voxel_weights[scored],
        voxel_hu[scored],
        volume,
        crop,
        factor,
        calibration,
        parameters,
    )
    return _ArteryScore(agatston, volume_mm3, mass_mg, lesions)


def _list_lesions(
    artery: str,
    scored_mask: np.ndarray,
    voxel_weights: np.ndarray,
    voxel_hu: np.ndarray,
    volume: CTVolume,
    crop: tuple[slice, slice, slice],
    factor: float,
    calibration: float,
    parameters: ScoringParameters,
) -> tuple[Lesion, ...]:
    """Return the 6-connected 3D lesions of one artery's scored voxels that reach the minimum volume.

    `voxel_weights` and `voxel_hu` contain one value per True voxel of
    `scored_mask`, in C order.
    """
    lesion_map, lesion_count = ndimage.label(scored_mask, structure=FACE_6_CONNECTIVITY)
    if lesion_count == 0:
        return ()
    voxel_volume = volume.voxel_volume_mm3
    lesion_ids = lesion_map[scored_mask]
    coordinates = np.nonzero(scored_mask)

    voxel_counts = np.bincount(lesion_ids, minlength=lesion_count + 1)
    hu_sums = np.bincount(lesion_ids, weights=voxel_hu, minlength=lesion_count + 1)
    weighted_pixels = np.bincount(lesion_ids, weights=voxel_weights, minlength=lesion_count + 1)
    peaks = np.full(lesion_count + 1, -np.inf)
    np.maximum.at(peaks, lesion_ids, voxel_hu)
    offsets = (crop[0].start, crop[1].start, crop[2].start)
    centroids = np.stack(
        [
            np.bincount(lesion_ids, weights=axis_index, minlength=lesion_count + 1)
            / np.maximum(voxel_counts, 1)
            + offset
            for axis_index, offset in zip(coordinates, offsets)
        ],
        axis=-1,
    )
    centroids_mm = volume.index_to_patient(centroids)

    lesions = []
    for lesion_id in range(1, lesion_count + 1):
        count = int(voxel_counts[lesion_id])
        lesion_volume = count * voxel_volume
        if lesion_volume < parameters.minimum_lesion_volume_mm3 - SIZE_TOLERANCE:
            continue
        lesions.append(
            Lesion(
                artery=artery,
                voxel_count=count,
                volume_mm3=lesion_volume,
                mass_mg=float(hu_sums[lesion_id]) * voxel_volume / 1000.0 * calibration,
                peak_hu=float(peaks[lesion_id]),
                agatston=int(round(weighted_pixels[lesion_id])) * volume.pixel_area_mm2 * factor,
                centroid_mm=tuple(float(c) for c in centroids_mm[lesion_id]),
            )
        )
    return tuple(lesions)


def _validate_parameters(parameters: ScoringParameters) -> None:
    checks = (
        ("threshold_hu", parameters.threshold_hu, math.isfinite(parameters.threshold_hu)),
        (
            "minimum_lesion_area_mm2",
            parameters.minimum_lesion_area_mm2,
            parameters.minimum_lesion_area_mm2 >= 0,
        ),
        (
            "minimum_lesion_volume_mm3",
            parameters.minimum_lesion_volume_mm3,
            parameters.minimum_lesion_volume_mm3 >= 0,
        ),
        (
            "reference_increment_mm",
            parameters.reference_increment_mm,
            parameters.reference_increment_mm > 0,
        ),
        (
            "mass_calibration_factor",
            parameters.mass_calibration_factor,
            parameters.mass_calibration_factor > 0,
        ),
    )
    for name, value, valid in checks:
        if not valid:
            raise ValueError(
                f"scoring parameter {name}={value!r} is invalid. Expected a finite "
                "threshold, non-negative minimum sizes, and a positive reference "
                "increment and mass calibration factor."
            )


def _validated_labels(volume: CTVolume, labels: np.ndarray) -> np.ndarray:
    """Check the label map against the volume and return it as an ndarray."""
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise LabelError(
            f"label map has shape {labels.shape} (slices, rows, columns) but series "
            f"{volume.series_instance_uid} has {volume.shape}. Use a label map made "
            "in the geometry of this series."
        )
    if labels.dtype.kind not in "iu":
        raise LabelError(
            f"label map has data type {labels.dtype}, but integer labels are expected: "
            "0 background, 1 LAD, 2 LCX, 3 RCA, 4 non-coronary calcium"
        )
    if labels.size and (labels.min() < 0 or labels.max() > MAX_LABEL_VALUE):
        outside = labels[(labels < 0) | (labels > MAX_LABEL_VALUE)]
        unexpected = np.unique(outside)[:10].tolist()
        raise LabelError(
            f"label map of series {volume.series_instance_uid} contains values "
            f"{unexpected} ({outside.size} voxels), but only 0 background, 1 LAD, "
            "2 LCX, 3 RCA and 4 non-coronary calcium are valid"
        )
    return labels


def _mass_calibration(
    volume: CTVolume, parameters: ScoringParameters
) -> tuple[float, bool, tuple[ProtocolFlag, ...]]:
    """Return the mass calibration factor, whether it is the series' own, and flags."""
    series_factor = volume.mass_calibration_factor
    if series_factor is not None and math.isfinite(series_factor) and series_factor > 0:
        return float(series_factor), True, ()

    default = float(parameters.mass_calibration_factor)
    if series_factor is None:
        reason = "the series carries no Calcium Scoring Mass Factor Device (0018,9352)"
    else:
        reason = (
            f"the series' Calcium Scoring Mass Factor Device (0018,9352) is "
            f"{series_factor!r}, which is not a positive number"
        )
    flag = ProtocolFlag(
        code="MASS_UNCALIBRATED",
        message=(
            f"Calcium mass uses the default calibration factor {default:g} mg HA/cm³ "
            f"per HU because {reason}. Compare masses only between scans of the same "
            "scanner and protocol."
        ),
    )
    return default, False, (flag,)


def _merge_flags(
    volume_flags: tuple[ProtocolFlag, ...], scoring_flags: tuple[ProtocolFlag, ...]
) -> tuple[ProtocolFlag, ...]:
    """Return the volume's flags followed by scoring flags whose code is not already there."""
    codes = {flag.code for flag in volume_flags}
    return tuple(volume_flags) + tuple(flag for flag in scoring_flags if flag.code not in codes)


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Return the smallest box that contains every True voxel, or None when there is none."""
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=other_axes))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]
