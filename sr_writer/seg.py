"""DICOM SEG of the scored calcium per artery and of the predicted coronary artery regions.

Both are BINARY Segmentation Storage instances (1.2.840.10008.5.1.4.1.1.66.4)
built by highdicom: the LABELMAP SOP class is too new for most viewers and
PACS. Frames are in the CT's own geometry: each frame references its source
CT instance (and frame, for Enhanced CT) and carries that instance's
ImagePositionPatient as its PlanePositionSequence.

Empty frames are omitted (highdicom's omit_empty_frames=True): a calcium SEG
of a 47-slice series then contains a few frames per segment instead of 47.
Every frame still names its source instance and position, so viewers place
it correctly, and ReferencedSeriesSequence lists every scored instance.
"""

from __future__ import annotations

import logging
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from scoring.agatston import scored_voxel_labels
from scoring.config import ScoringParameters
from scoring.errors import LabelError
from scoring.result import ARTERIES, ARTERY_LABELS, OTHER_CALCIUM, ScoringResult
from scoring.volume import CTVolume
from sr_writer import codes
from sr_writer.identity import (
    AlgorithmIdentification,
    copy_patient_and_study,
    highdicom_source,
    new_uid,
    replace_element,
    series_description,
    series_number,
)

logger = logging.getLogger(__name__)

#: Display colour of each artery as sRGB, shared by the SEGs and the summary image.
ARTERY_COLORS: dict[str, tuple[int, int, int]] = {
    "LAD": (230, 57, 70),
    "LCX": (46, 180, 75),
    "RCA": (40, 120, 235),
}

#: Values of the coronary artery region (CAR) map; 0 is OTHER_CAR.
REGION_LABELS: dict[str, int] = {"LAD": 1, "LCX": 2, "RCA": 3}

_MANUFACTURER = "cacs-node"


def build_seg(
    volume: CTVolume,
    labels: np.ndarray,
    result: ScoringResult,
    *,
    algorithm: AlgorithmIdentification,
    uid_root: str,
    device_serial_number: str,
    parameters: ScoringParameters | None = None,
) -> hd.seg.Segmentation | None:
    """Build the calcium SEG: one segment per artery with calcium, in LAD, LCX, RCA order.

    A segment contains exactly the voxels that scored its artery (see
    `scored_labels`), so its voxel count × voxel volume is the artery's
    volume score. Arteries that the result scores as zero get no segment,
    and OTHER_CALCIUM (label 4) is never written. Segment numbers count from
    1 over the arteries present, so `segment_numbers(seg)` maps them back to
    artery names.

    Args:
        volume: the scored CT series.
        labels: uint8 CAC label volume of `volume.shape` (0–4).
        result: the scoring result of `volume` and `labels`.
        algorithm: name and versions written as algorithm identification.
        uid_root: UID root for the new series and instance UIDs.
        device_serial_number: Device Serial Number of the node.
        parameters: the scoring parameters of `result`; default
            ScoringParameters(). Their minimum lesion area decides which
            voxels were scored.

    Returns:
        The SEG dataset, or None when no artery has calcium.

    Raises:
        LabelError: `labels` does not match the volume's shape or contains
            values other than 0–4, or has no scored voxel of an artery that
            the result gives calcium.
        ValueError: `uid_root` is invalid, or `parameters` has another
            threshold than `result`.
    """
    check_label_volume(labels, volume, name="CAC label volume", max_label=OTHER_CALCIUM)
    scored = scored_labels(volume, labels, result, parameters)
    masks: list[np.ndarray] = []
    descriptions: list[hd.seg.SegmentDescription] = []
    for artery in result.arteries_with_calcium:
        mask = scored == ARTERY_LABELS[artery]
        if not mask.any():
            raise LabelError(
                f"series {volume.series_instance_uid}: the scoring result gives {artery} "
                f"calcium but the label volume has no scored {artery} voxel at or above "
                f"{result.threshold_hu:g} HU; pass the label volume that was scored"
            )
        _check_volume_score(volume, artery, mask, result)
        masks.append(mask)
        descriptions.append(
            _artery_segment(
                artery,
                len(descriptions) + 1,
                "calcium",
                codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
                codes.PATHOLOGIC_CALCIFICATION,
                algorithm,
                uid_root,
            )
        )
    if not masks:
        return None
    return _build(
        volume,
        np.stack(masks, axis=-1),
        descriptions,
        kind="seg",
        content_label="CALCIUM",
        content_description="Coronary artery calcium per artery, automatic",
        algorithm=algorithm,
        uid_root=uid_root,
        device_serial_number=device_serial_number,
    )


def build_region_seg(
    volume: CTVolume,
    regions: np.ndarray,
    *,
    algorithm: AlgorithmIdentification,
    uid_root: str,
    device_serial_number: str,
) -> hd.seg.Segmentation | None:
    """Build the SEG of the predicted coronary artery regions (CAR), for review and correction.

    One segment per artery region present in `regions` (1 LAD, 2 LCX, 3 RCA);
    OTHER_CAR (0) is the background.

    Returns:
        The SEG dataset, or None when `regions` has no artery region.

    Raises:
        LabelError: `regions` does not match the volume's shape or contains
            values other than 0–3.
        ValueError: `uid_root` is invalid.
    """
    check_label_volume(regions, volume, name="coronary artery region map", max_label=3)
    masks: list[np.ndarray] = []
    descriptions: list[hd.seg.SegmentDescription] = []
    for artery in ARTERIES:
        mask = regions == REGION_LABELS[artery]
        if not mask.any():
            continue
        masks.append(mask)
        descriptions.append(
            _artery_segment(
                artery,
                len(descriptions) + 1,
                "region",
                codes.ANATOMICAL_STRUCTURE,
                codes.ARTERY_REGIONS[artery][0],
                algorithm,
                uid_root,
            )
        )
    if not masks:
        return None
    return _build(
        volume,
        np.stack(masks, axis=-1),
        descriptions,
        kind="region_seg",
        content_label="REGIONS",
        content_description="Predicted coronary artery regions, automatic",
        algorithm=algorithm,
        uid_root=uid_root,
        device_serial_number=device_serial_number,
    )


def segment_numbers(seg: Dataset) -> dict[str, int]:
    """Map artery names to segment numbers of a SEG written by `build_seg`.

    Reads the SegmentLabel of each item of SegmentSequence ("LAD calcium", ...).
    """
    numbers: dict[str, int] = {}
    for item in seg.SegmentSequence:
        artery = str(item.SegmentLabel).split(" ")[0]
        if artery in ARTERY_LABELS:
            numbers[artery] = int(item.SegmentNumber)
    return numbers


def scored_labels(
    volume: CTVolume,
    labels: np.ndarray,
    result: ScoringResult,
    parameters: ScoringParameters | None = None,
) -> np.ndarray:
    """Return the label volume restricted to the voxels that the scoring counted.

    Artery voxels come from scoring.agatston.scored_voxel_labels with
    `parameters` (default ScoringParameters()), so they are the voxels behind
    the result's volume and mass scores. OTHER_CALCIUM voxels at or above
    the threshold and outside padding stay, for display; scoring ignores them.

    Raises:
        ValueError: `parameters.threshold_hu` differs from `result.threshold_hu`.
    """
    parameters = parameters or ScoringParameters()
    if parameters.threshold_hu != result.threshold_hu:
        raise ValueError(
            f"scoring parameters have threshold {parameters.threshold_hu:g} HU but the result "
            f"was scored at {result.threshold_hu:g} HU; pass the parameters used for the result"
        )
    labels = np.asarray(labels)
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    scored = scored_voxel_labels(volume, labels, parameters)
    other_calcium = (labels == OTHER_CALCIUM) & (volume.hu >= result.threshold_hu) & ~volume.padding_mask
    scored[other_calcium] = OTHER_CALCIUM
    return scored


def _artery_segment(
    artery: str,
    segment_number: int,
    content: str,
    category: hd.sr.CodedConcept,
    property_type: hd.sr.CodedConcept,
    algorithm: AlgorithmIdentification,
    uid_root: str,
) -> hd.seg.SegmentDescription:
    """Describe one automatic segment of an artery, labelled and tracked as "<artery> <content>".

    The anatomic region and display colour are the artery's, and the
    tracking UID is new, so calcium and region segments of one artery differ.
    """
    return hd.seg.SegmentDescription(
        segment_number=segment_number,
        segment_label=f"{artery} {content}",
        segmented_property_category=category,
        segmented_property_type=property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm_sequence(algorithm),
        tracking_uid=new_uid(uid_root),
        tracking_id=f"{artery} {content}",
        anatomic_regions=list(codes.ARTERY_REGIONS[artery]),
        display_color=hd.color.CIELabColor.from_rgb(*ARTERY_COLORS[artery]),
    )


def _check_volume_score(volume: CTVolume, artery: str, mask: np.ndarray, result: ScoringResult) -> None:
    """Log a warning when a segment's volume differs from the artery's volume score.

    A difference means the labels or scoring parameters passed here are not
    those of the result, so the SEG and the SR disagree.
    """
    segment_volume = float(np.count_nonzero(mask)) * volume.voxel_volume_mm3
    expected = result.volume_mm3[artery]
    if not np.isclose(segment_volume, expected, rtol=1e-6, atol=1e-6):
        logger.warning(
            "series %s: %s segment covers %.3f mm³ but the volume score is %.3f mm³; "
            "the labels or scoring parameters differ from those of the scoring result",
            volume.series_instance_uid,
            artery,
            segment_volume,
            expected,
        )


def check_label_volume(labels: np.ndarray, volume: CTVolume, *, name: str, max_label: int) -> None:
    """Check that a label volume has the CT's shape, an integer type and values 0 to `max_label`.

    Raises:
        LabelError: with the shape, type or values found and those expected.
    """
    if not isinstance(labels, np.ndarray):
        raise LabelError(
            f"{name} is a {type(labels).__name__}; expected a numpy array of shape "
            f"{volume.shape} (slices, rows, columns)"
        )
    if labels.shape != volume.shape:
        raise LabelError(
            f"{name} has shape {labels.shape}; expected {volume.shape} (slices, rows, "
            f"columns) of series {volume.series_instance_uid}; resample or re-run the "
            "segmentation on this series"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise LabelError(f"{name} has dtype {labels.dtype}; expected an unsigned integer type such as uint8")
    found = np.unique(labels)
    invalid = found[(found < 0) | (found > max_label)]
    if invalid.size:
        raise LabelError(
            f"{name} contains values {invalid.tolist()}; expected only 0 to {max_label}"
        )


def _algorithm_sequence(algorithm: AlgorithmIdentification) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=algorithm.version,
        source=_MANUFACTURER,
        parameters={
            "model_version": algorithm.model_version,
            **({"model_caution": algorithm.model_caution} if algorithm.model_caution else {}),
        },
    )


def _build(
    volume: CTVolume,
    stacked_masks: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    *,
    kind: str,
    content_label: str,
    content_description: str,
    algorithm: AlgorithmIdentification,
    uid_root: str,
    device_serial_number: str,
) -> hd.seg.Segmentation:
    """Build a BINARY SEG from masks of shape (slices, rows, columns, segments) in volume order."""
    # highdicom copies the pixel measures of the first source image and
    # rejects an empty SliceThickness (Type 1C in the Pixel Measures macro).
    # Without a nominal thickness the measured slice increment is used instead.
    thickness = volume.slice_thickness if volume.slice_thickness else volume.slice_increment
    source_images, pixel_array = _source_images_and_frames(
        volume, stacked_masks.astype(np.uint8), slice_thickness=float(thickness)
    )
    first_header = volume.headers[0]

    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=new_uid(uid_root),
        series_number=series_number(first_header, kind),
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=device_serial_number,
        content_label=content_label,
        content_description=content_description,
        omit_empty_frames=True,
    )

    # Patient and Study modules verbatim from the source, and deterministic naming.
    copy_patient_and_study(first_header, seg)
    seg.SeriesDescription = series_description(kind, algorithm)
    logger.info(
        "built %s %s for series %s: %d segment(s), %d frame(s)",
        kind,
        seg.SOPInstanceUID,
        volume.series_instance_uid,
        len(descriptions),
        int(seg.NumberOfFrames),
    )
    return seg


def _source_images_and_frames(
    volume: CTVolume, masks: np.ndarray, *, slice_thickness: float
) -> tuple[list[Dataset], np.ndarray]:
    """Return highdicom's source images and the masks in their frame order.

    A single-frame series keeps volume order, one source image per slice. An
    Enhanced CT instance gets its masks placed at the frame numbers that the
    volume records, with empty frames where a frame was not scored.
    """
    if volume.frame_numbers is None:
        if len(volume.headers) != volume.shape[0]:
            raise LabelError(
                f"series {volume.series_instance_uid} has {volume.shape[0]} slices but "
                f"{len(volume.headers)} source headers; expected one header per slice"
            )
        return [_highdicom_source(header, volume.sop_class_uid, slice_thickness) for header in volume.headers], masks

    # TODO(#4): an Enhanced CT volume assembled from several multi-frame
    # instances is not written; load_series yields one instance per volume.
    instance_uids = set(volume.sop_instance_uids)
    if len(volume.headers) != 1 or len(instance_uids) != 1:
        raise LabelError(
            f"series {volume.series_instance_uid} mixes {len(instance_uids)} multi-frame "
            "instances; the SEG writer handles one Enhanced CT instance per volume"
        )
    header = volume.headers[0]
    frame_count = int(header.NumberOfFrames)
    frames = np.zeros((frame_count,) + masks.shape[1:], dtype=masks.dtype)
    for volume_index, frame_number in enumerate(volume.frame_numbers):
        if not 1 <= frame_number <= frame_count:
            raise LabelError(
                f"slice {volume_index} of series {volume.series_instance_uid} names frame "
                f"{frame_number}; expected 1 to NumberOfFrames {frame_count}"
            )
        frames[frame_number - 1] = masks[volume_index]
    return [_highdicom_source(header, volume.sop_class_uid, slice_thickness)], frames


def _highdicom_source(header: Dataset, sop_class_uid: str, slice_thickness: float) -> Dataset:
    """Return `highdicom_source(header, sop_class_uid)` with SliceThickness set when a single-frame source lacks it."""
    source = highdicom_source(header, sop_class_uid)
    if "NumberOfFrames" not in source and not source.get("SliceThickness"):
        replace_element(source, "SliceThickness", slice_thickness)
    return source
