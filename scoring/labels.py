"""Read and write CAC label maps in the geometry of a CT series: NRRD, NIfTI and DICOM SEG.

Label values follow scoring.result: 0 background, 1 LAD (with the left main),
2 LCX, 3 RCA, 4 non-coronary calcium. NRRD and NIfTI files are read with
SimpleITK and must lie on the series' voxel grid. Their axes may be stored
in another order or direction (for example slices in decreasing z), and the
array is reoriented into volume order: increasing position along the slice
normal, then rows, then columns. A DICOM SEG (PS3.3 A.51) is read with
highdicom. Its segments map to arteries by anatomic region code, segmented
property type code or segment label. A segment of the aorta, the aortic or
mitral valve, or one labelled "other" or "non-coronary", becomes label 4.
Its frames map to slices by referenced SOP instance or, failing that, by
plane position.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
import SimpleITK as sitk
from pydicom.uid import UID

from scoring.errors import LabelError
from scoring.fileio import atomic_path
from scoring.result import LAD, LCX, OTHER_CALCIUM, RCA
from scoring.volume import CTVolume

logger = logging.getLogger(__name__)

#: File name endings that SimpleITK reads and writes as NRRD or NIfTI.
IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz")

#: Segmentation Storage SOP Class UID (PS3.4 B.5).
SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")

#: Largest allowed deviation of a label map's voxel positions from the
#: series', as a fraction of the smallest voxel edge. A tenth of a voxel
#: tolerates float rounding in file headers (NIfTI stores float32) and still
#: rejects a map made for another reconstruction.
POSITION_TOLERANCE_VOXELS = 0.1

#: Largest allowed 1 − |cos| between a label map axis and the series axis it
#: maps to, about 0.08° of rotation.
DIRECTION_TOLERANCE = 1e-6

#: SNOMED CT code of the segment category "Anatomical Structure" (CID 7150),
#: which region SEGs use; calcium segments are "Morphologically Abnormal Structure".
ANATOMICAL_STRUCTURE_CODE = "123037004"

#: SNOMED CT anatomic region codes (as in pydicom's code dictionary) → label.
#: The left main (LM) belongs to the LAD subtree. Calcium of the aorta and the
#: aortic and mitral valves is non-coronary calcium (OTHER_CALCIUM).
ANATOMIC_REGION_LABELS: dict[str, int] = {
    "59438005": LAD,  # Left anterior descending coronary artery
    "3227004": LAD,  # Left main coronary artery
    "57396003": LCX,  # Circumflex coronary artery
    "13647002": RCA,  # Right coronary artery
    "15825003": OTHER_CALCIUM,  # Aorta
    "113262008": OTHER_CALCIUM,  # Thoracic aorta
    "34202007": OTHER_CALCIUM,  # Aortic valve
    "91134007": OTHER_CALCIUM,  # Mitral valve
}

#: Segment label patterns → label, tried in order when no code matches.
SEGMENT_LABEL_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"\b(LAD|LM|left anterior descending|left main)\b", re.IGNORECASE), LAD),
    (re.compile(r"\b(LCX|LCx|CX|circumflex)\b", re.IGNORECASE), LCX),
    (re.compile(r"\b(RCA|right coronary)\b", re.IGNORECASE), RCA),
    (re.compile(r"\b(other|non-coronary|extra-coronary)\b", re.IGNORECASE), OTHER_CALCIUM),
)


def write_label_map(path: str | Path, labels: np.ndarray, volume: CTVolume) -> Path:
    """Write `labels` as an NRRD or NIfTI file with the voxel grid of `volume`.

    The file's x, y and z axes are the columns, rows and slices of the volume.
    Spacing is (column spacing, row spacing, slice increment), the origin is
    the first slice's ImagePositionPatient and the direction matrix contains the
    row, column and slice directions as columns. The file is written under a
    temporary name, flushed to disk and renamed.

    Parameters:
        path: target file ending in .nrrd, .nhdr, .nii or .nii.gz.
        labels: integer array of `volume.shape` with values 0–255.
        volume: the series the labels belong to.

    Returns:
        The path written.

    Raises:
        LabelError: the shape, type or values of `labels` do not fit, or the
            file name has another ending.
    """
    path = Path(path)
    _check_suffix(path)
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise LabelError(
            f"cannot write a label map of shape {labels.shape} for series "
            f"{volume.series_instance_uid} of shape {volume.shape} (slices, rows, columns)"
        )
    if labels.dtype.kind not in "iub":
        raise LabelError(f"cannot write label map of data type {labels.dtype}. Convert it to integers first.")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise LabelError(
            f"label values {int(labels.min())}..{int(labels.max())} do not fit the "
            "unsigned 8-bit label map. Use values 0–255."
        )

    image = sitk.GetImageFromArray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.SetSpacing(
        (float(volume.pixel_spacing[1]), float(volume.pixel_spacing[0]), float(volume.slice_increment))
    )
    image.SetOrigin(tuple(float(v) for v in volume.positions[0]))
    image.SetDirection(tuple(float(v) for v in _volume_axes_xyz(volume).T.ravel()))

    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)
    logger.info("wrote label map %s for series %s", path, volume.series_instance_uid)
    return path


def read_label_map(path: str | Path, volume: CTVolume, *, calcium: bool = False) -> np.ndarray:
    """Read a label map for `volume` and return it as uint8 in volume order.

    Parameters:
        path: an NRRD or NIfTI file in the series geometry, or a DICOM SEG
            file that references the series.
        volume: the series the labels belong to.
        calcium: the caller needs calcium labels, so a DICOM SEG of coronary
            artery regions (segment category Anatomical Structure, as the
            node's region SEG has) is refused instead of read as calcium.

    Returns:
        uint8 array of `volume.shape`. NRRD and NIfTI values are returned as
        stored (0–255). A SEG gives 1 LAD, 2 LCX, 3 RCA, 4 non-coronary
        calcium and 0 elsewhere.

    Raises:
        LabelError: the file is missing or unreadable, or its geometry,
            references, segments or values do not match the series.
    """
    path = Path(path)
    if path.is_dir():
        raise LabelError(f"label map {path} is a folder. Give the NRRD, NIfTI or DICOM SEG file itself.")
    if not path.is_file():
        raise LabelError(f"label map {path} not found. Give an NRRD, NIfTI or DICOM SEG file.")
    if _is_dicom_file(path):
        return _read_seg(path, volume, calcium)
    _check_suffix(path)
    return _read_image(path, volume)


def _check_suffix(path: Path) -> None:
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise LabelError(
            f"label map {path} has an unknown file type. Expected a name ending in "
            f"{', '.join(IMAGE_SUFFIXES)}, or a DICOM SEG file"
        )


def _is_dicom_file(path: Path) -> bool:
    """Return whether the file has the DICOM preamble and prefix (PS3.10 7.1) or a .dcm ending."""
    with open(path, "rb") as stream:
        header = stream.read(132)
    return header[128:132] == b"DICM" or path.suffix.lower() == ".dcm"


def _volume_axes_xyz(volume: CTVolume) -> np.ndarray:
    """Return the unit directions of the column, row and slice axes as rows of a 3 × 3 array."""
    return np.array(
        [volume.row_direction, volume.column_direction, volume.slice_direction], dtype=np.float64
    )


def _position_tolerance(volume: CTVolume) -> float:
    smallest_edge = min(volume.pixel_spacing[0], volume.pixel_spacing[1], volume.slice_increment)
    return POSITION_TOLERANCE_VOXELS * float(smallest_edge)


# NRRD and NIfTI


def _read_image(path: Path, volume: CTVolume) -> np.ndarray:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise LabelError(f"cannot read label map {path}: {error}") from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise LabelError(
            f"label map {path} has {image.GetDimension()} dimensions and "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel, but a "
            "3D scalar label map is expected"
        )

    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    size = np.array(image.GetSize())
    origin = np.array(image.GetOrigin(), dtype=np.float64)

    # For each volume array axis (slice, row, column): the image axis along it and its sign.
    volume_axes = (volume.slice_direction, volume.column_direction, volume.row_direction)
    volume_spacings = (volume.slice_increment, volume.pixel_spacing[0], volume.pixel_spacing[1])
    image_axes: list[int] = []
    signs: list[int] = []
    for axis_name, axis_direction in zip(("slice", "row", "column"), volume_axes):
        cosines = direction.T @ np.asarray(axis_direction, dtype=np.float64)
        matches = np.flatnonzero(np.abs(cosines) >= 1.0 - DIRECTION_TOLERANCE)
        if matches.size != 1:
            raise LabelError(
                f"label map {path} has direction matrix {direction.round(6).tolist()}, and no "
                f"axis runs along the series' {axis_name} direction "
                f"{np.round(axis_direction, 6).tolist()}. Resample the labels onto the series grid."
            )
        image_axes.append(int(matches[0]))
        signs.append(1 if cosines[matches[0]] > 0 else -1)
    if len(set(image_axes)) != 3:
        raise LabelError(f"label map {path} has a degenerate direction matrix {direction.tolist()}")

    mapped_size = tuple(int(size[j]) for j in image_axes)
    if mapped_size != volume.shape:
        raise LabelError(
            f"label map {path} has {mapped_size} (slices, rows, columns) voxels but series "
            f"{volume.series_instance_uid} has {volume.shape}. Use a label map in the series geometry."
        )
    for axis_name, j, expected in zip(("slice", "row", "column"), image_axes, volume_spacings):
        if axis_name != "slice" and not np.isclose(spacing[j], expected, rtol=1e-4, atol=1e-6):
            raise LabelError(
                f"label map {path} has {axis_name} spacing {spacing[j]:g} mm but series "
                f"{volume.series_instance_uid} has {expected:g} mm"
            )

    # Positions: every slice origin and the far corner of the first slice.
    def image_point(slice_index: int, row: int, column: int) -> np.ndarray:
        index = np.zeros(3)
        for value, j, sign in zip((slice_index, row, column), image_axes, signs):
            index[j] = value if sign > 0 else size[j] - 1 - value
        return origin + direction @ (spacing * index)

    tolerance = _position_tolerance(volume)
    checks = [(k, 0, 0) for k in range(volume.shape[0])]
    checks.append((0, volume.shape[1] - 1, volume.shape[2] - 1))
    for slice_index, row, column in checks:
        found = image_point(slice_index, row, column)
        expected = volume.index_to_patient(np.array([slice_index, row, column], dtype=np.float64))
        deviation = float(np.linalg.norm(found - expected))
        if deviation > tolerance:
            raise LabelError(
                f"label map {path} puts voxel (slice {slice_index}, row {row}, column {column}) at "
                f"{np.round(found, 3).tolist()} mm but series {volume.series_instance_uid} has it "
                f"at {np.round(expected, 3).tolist()} mm ({deviation:.3f} mm apart, tolerance "
                f"{tolerance:.3f} mm). Use a label map made on this series."
            )

    # SimpleITK arrays are indexed (z, y, x): image axis j is array axis 2 - j.
    array = sitk.GetArrayFromImage(image)
    array = np.transpose(array, [2 - j for j in image_axes])
    for axis, sign in enumerate(signs):
        if sign < 0:
            array = np.flip(array, axis=axis)
    return _as_label_values(array, path)


def _as_label_values(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise LabelError(f"label map {path} contains non-integer values, but labels must be integers")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise LabelError(
            f"label map {path} contains values {array.min():g}..{array.max():g}, outside 0–255"
        )
    return np.ascontiguousarray(array, dtype=np.uint8)


# DICOM SEG


def _read_seg(path: Path, volume: CTVolume, calcium: bool = False) -> np.ndarray:
    import highdicom as hd

    try:
        dataset = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as error:
        raise LabelError(f"cannot read DICOM file {path}: {error}") from error
    if dataset.get("SOPClassUID") != SEGMENTATION_STORAGE:
        raise LabelError(
            f"{path} has SOP Class {dataset.get('SOPClassUID', 'missing')}, but a DICOM SEG "
            f"({SEGMENTATION_STORAGE}) or an NRRD or NIfTI label map is expected"
        )
    _check_seg_references(dataset, path, volume)
    try:
        segmentation = hd.seg.Segmentation.from_dataset(dataset, copy=False)
    except (ValueError, AttributeError, KeyError, TypeError) as error:
        raise LabelError(f"DICOM SEG {path} is invalid: {error}") from error

    if calcium:
        _reject_region_segments(segmentation, path)
    segment_labels = _segment_artery_labels(segmentation, path)
    segment_numbers = list(segment_labels)
    try:
        masks = _seg_masks_by_reference(segmentation, segment_numbers, volume)
    except (ValueError, RuntimeError, KeyError, AttributeError) as error:
        logger.info(
            "DICOM SEG %s: frames cannot be matched by source reference (%s), so matching by plane position",
            path,
            error,
        )
        masks = _seg_masks_by_position(dataset, segment_numbers, volume, path)

    labels = np.zeros(volume.shape, dtype=np.uint8)
    for position, number in enumerate(segment_numbers):
        mask = masks[..., position] > 0.5
        label = segment_labels[number]
        conflict = mask & (labels != 0) & (labels != label)
        if conflict.any():
            raise LabelError(
                f"DICOM SEG {path}: segment {number} overlaps another artery's segment in "
                f"{int(conflict.sum())} voxels, but each voxel may belong to one artery only"
            )
        labels[mask] = label
    logger.info(
        "read DICOM SEG %s for series %s: segments %s",
        path,
        volume.series_instance_uid,
        {number: int(label) for number, label in segment_labels.items()},
    )
    return labels


def _check_seg_references(dataset: pydicom.Dataset, path: Path, volume: CTVolume) -> None:
    if dataset.get("Rows") != volume.shape[1] or dataset.get("Columns") != volume.shape[2]:
        raise LabelError(
            f"DICOM SEG {path} has {dataset.get('Rows')} × {dataset.get('Columns')} pixels but "
            f"series {volume.series_instance_uid} has {volume.shape[1]} × {volume.shape[2]}"
        )
    frame_of_reference = dataset.get("FrameOfReferenceUID")
    if frame_of_reference and frame_of_reference != volume.frame_of_reference_uid:
        raise LabelError(
            f"DICOM SEG {path} has FrameOfReferenceUID {frame_of_reference} but series "
            f"{volume.series_instance_uid} has {volume.frame_of_reference_uid}"
        )
    referenced_series = [item.get("SeriesInstanceUID") for item in dataset.get("ReferencedSeriesSequence", [])]
    if referenced_series and volume.series_instance_uid not in referenced_series:
        raise LabelError(
            f"DICOM SEG {path} references series {', '.join(map(str, referenced_series))}, not "
            f"{volume.series_instance_uid}. Use the SEG made for this series."
        )
    known = set(volume.sop_instance_uids)
    unknown = [
        instance.ReferencedSOPInstanceUID
        for series in dataset.get("ReferencedSeriesSequence", [])
        if series.get("SeriesInstanceUID") == volume.series_instance_uid
        for instance in series.get("ReferencedInstanceSequence", [])
        if instance.ReferencedSOPInstanceUID not in known
    ]
    if unknown:
        raise LabelError(
            f"DICOM SEG {path} references {len(unknown)} instances that series "
            f"{volume.series_instance_uid} does not contain, for example {unknown[0]}. "
            "The series may be incomplete."
        )


def _reject_region_segments(segmentation, path: Path) -> None:
    """Raise LabelError when a segment of the SEG is an anatomical structure, not calcium."""
    for number in segmentation.segment_numbers:
        description = segmentation.get_segment_description(number)
        category = description.segmented_property_category
        if category.value == ANATOMICAL_STRUCTURE_CODE and category.scheme_designator in ("SCT", "SRT"):
            raise LabelError(
                f"DICOM SEG {path} segments anatomy, not calcium: segment {number} "
                f"({description.segment_label!r}) has category {category.meaning!r}. Give the "
                "calcium SEG, whose segments are calcifications"
            )


def _segment_artery_labels(segmentation, path: Path) -> dict[int, int]:
    """Return segment number → artery label for every segment of the SEG."""
    mapping: dict[int, int] = {}
    for number in segmentation.segment_numbers:
        description = segmentation.get_segment_description(number)
        label = _label_from_codes(description.anatomic_regions)
        if label is None:
            label = _label_from_codes([description.segmented_property_type])
        if label is None:
            label = _label_from_segment_label(description.segment_label)
        if label is None:
            raise LabelError(
                f"DICOM SEG {path}: segment {number} ({description.segment_label!r}) names no "
                "coronary artery. Expected anatomic region SCT 59438005 (LAD), 3227004 (LM), "
                "57396003 (LCX) or 13647002 (RCA), or a segment label with LAD, LM, LCX or RCA, "
                "or \"other\" for non-coronary calcium"
            )
        mapping[number] = label
    if not mapping:
        raise LabelError(f"DICOM SEG {path} contains no segments")
    return mapping


def _label_from_codes(codes: Sequence) -> int | None:
    for code in codes:
        if code is not None and code.scheme_designator in ("SCT", "SRT") and code.value in ANATOMIC_REGION_LABELS:
            return ANATOMIC_REGION_LABELS[code.value]
    return None


def _label_from_segment_label(segment_label: str) -> int | None:
    for pattern, label in SEGMENT_LABEL_PATTERNS:
        if pattern.search(segment_label or ""):
            return label
    return None


def _seg_masks_by_reference(segmentation, segment_numbers: list[int], volume: CTVolume) -> np.ndarray:
    """Return (slices, rows, columns, segments) masks matched by referenced SOP instance or frame."""
    options = dict(
        segment_numbers=segment_numbers,
        assert_missing_frames_are_empty=True,
        rescale_fractional=True,
        skip_overlap_checks=True,
    )
    if volume.frame_numbers is None:
        return segmentation.get_pixels_by_source_instance(
            source_sop_instance_uids=list(volume.sop_instance_uids), **options
        )
    return segmentation.get_pixels_by_source_frame(
        source_sop_instance_uid=volume.sop_instance_uids[0],
        source_frame_numbers=list(volume.frame_numbers),
        **options,
    )


def _seg_masks_by_position(
    dataset: pydicom.Dataset, segment_numbers: list[int], volume: CTVolume, path: Path
) -> np.ndarray:
    """Return (slices, rows, columns, segments) masks matched by each frame's ImagePositionPatient."""
    frames = dataset.pixel_array
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    frames = frames.astype(np.float32)
    if dataset.get("SegmentationType") == "FRACTIONAL":
        frames /= float(dataset.get("MaximumFractionalValue", 255))

    shared = dataset.get("SharedFunctionalGroupsSequence", [None])[0]
    shared_orientation = _functional_group_value(shared, "PlaneOrientationSequence", "ImageOrientationPatient")
    shared_segment_number = _functional_group_value(
        shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber"
    )
    expected_orientation = np.concatenate([volume.row_direction, volume.column_direction])
    tolerance = _position_tolerance(volume)
    masks = np.zeros(volume.shape + (len(segment_numbers),), dtype=np.float32)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != len(frames):
        raise LabelError(
            f"DICOM SEG {path} has {len(frames)} frames but {len(per_frame)} per-frame functional groups"
        )
    for frame_index, group in enumerate(per_frame):
        orientation = _functional_group_value(group, "PlaneOrientationSequence", "ImageOrientationPatient")
        orientation = orientation if orientation is not None else shared_orientation
        if orientation is not None and not np.allclose(
            np.asarray(orientation, dtype=np.float64), expected_orientation, atol=1e-4
        ):
            raise LabelError(
                f"DICOM SEG {path} frame {frame_index + 1} has orientation {list(orientation)} but "
                f"series {volume.series_instance_uid} has {expected_orientation.round(6).tolist()}"
            )
        position = _functional_group_value(group, "PlanePositionSequence", "ImagePositionPatient")
        number = _functional_group_value(group, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        if number is None:
            number = shared_segment_number
        if position is None or number is None:
            raise LabelError(
                f"DICOM SEG {path} frame {frame_index + 1} has neither a source image reference nor "
                "a plane position and segment number, so it cannot be placed on the series"
            )
        if number not in segment_numbers:
            continue
        slice_index = _slice_index_of(np.asarray(position, dtype=np.float64), volume, tolerance)
        if slice_index is None:
            raise LabelError(
                f"DICOM SEG {path} frame {frame_index + 1} lies at {list(position)} mm, which is no "
                f"slice position of series {volume.series_instance_uid} (tolerance {tolerance:.3f} mm)"
            )
        masks[slice_index, :, :, segment_numbers.index(number)] = frames[frame_index]
    return masks


def _functional_group_value(group, sequence_keyword: str, keyword: str):
    if group is None or sequence_keyword not in group or not group[sequence_keyword].value:
        return None
    return group[sequence_keyword].value[0].get(keyword)


def _slice_index_of(position: np.ndarray, volume: CTVolume, tolerance: float) -> int | None:
    deviations = np.linalg.norm(volume.positions - position, axis=1)
    nearest = int(np.argmin(deviations))
    return nearest if deviations[nearest] <= tolerance else None
