"""Slice geometry of a CT series: per-slice records, consistency checks, sorting and spacing.

Rules (constants below):
- Slices are sorted by their ImagePositionPatient projected on the slice
  normal, cross(row direction, column direction), in float64. InstanceNumber,
  file names and SliceLocation are never used for ordering.
- Rows, columns, PixelSpacing and ImageOrientationPatient must agree on every
  slice, within ORIENTATION_TOLERANCE and PIXEL_SPACING_TOLERANCE_MM.
- Two slices closer than POSITION_TOLERANCE_MM along the normal are duplicates
  (two acquisitions in one series); the series is rejected, naming both.
- A step that deviates from the median step by more than
  max(POSITION_TOLERANCE_MM, GAP_RELATIVE_TOLERANCE × median) is a gap or an
  irregular spacing. A missing slice in a 3 mm series (a 6 mm step) trips it,
  but 1e-6 mm of float jitter does not.
- A step with a component perpendicular to the normal larger than
  POSITION_TOLERANCE_MM means the slices are sheared (gantry tilt) and the
  series is rejected.
- The slice increment is (last − first position along the normal) / (slices − 1),
  the mean step, so jitter in single positions averages out.
- A single-slice series is rejected, because no increment can be measured and
  Agatston normalisation and volumes need it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from scoring.errors import InconsistentGeometryError, PixelDataError, SliceSpacingError

#: Positions closer than this along the normal are duplicates; a larger step
#: component perpendicular to the normal is gantry tilt. DS values carry at
#: most 16 characters, so positions jitter by about 1e-5 mm at most.
POSITION_TOLERANCE_MM = 0.01

#: Maximum number of slices that a geometry message names one by one.
MAX_NAMED_SLICES = 5

#: A step that deviates from the median step by more than this fraction (or
#: by POSITION_TOLERANCE_MM, whichever is larger) is a gap or irregular spacing.
GAP_RELATIVE_TOLERANCE = 0.10

#: Largest difference between the direction cosines of two slices.
ORIENTATION_TOLERANCE = 1e-4

#: Largest difference between the PixelSpacing of two slices, in mm.
PIXEL_SPACING_TOLERANCE_MM = 1e-4


#: Minimum number of slices in a series, because the slice increment is measured between neighbours.
MIN_SLICES = 2

@dataclass(frozen=True)
class SliceRecord:
    """One image plane of the series: a single-frame instance or one frame of a multi-frame one.

    instance_index: index of the source instance in the series' instance list.
    frame_number: 1-based frame number in a multi-frame instance, None for single-frame.
    position: ImagePositionPatient in mm.
    orientation: ImageOrientationPatient (row cosines, column cosines).
    pixel_spacing: PixelSpacing (row spacing, column spacing) in mm.
    slope, intercept: RescaleSlope and RescaleIntercept of this plane.
    name: how messages name the plane (SOPInstanceUID or file, with frame).
    """

    instance_index: int
    frame_number: int | None
    sop_instance_uid: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    slice_thickness: float | None
    name: str


def _floats(value: object, count: int, attribute: str, name: str) -> np.ndarray:
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError) as error:
        raise InconsistentGeometryError(
            f"{name}: {attribute} is {value!r}; expected {count} numbers; the series header is invalid"
        ) from error
    if numbers.shape != (count,):
        raise InconsistentGeometryError(
            f"{name}: {attribute} has {numbers.size} values {list(numbers)}; expected {count}"
        )
    if not np.isfinite(numbers).all():
        raise InconsistentGeometryError(
            f"{name}: {attribute} is {[float(number) for number in numbers]}; expected finite numbers; "
            "the header of this instance is invalid; remove it or re-send the series"
        )
    return numbers


def optional_float(value: object) -> float | None:
    """Return `value` as a float, or None when it is missing, empty or not a number."""
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _rescale(item: Dataset | None, name: str) -> tuple[float, float]:
    slope = None if item is None else item.get("RescaleSlope")
    intercept = None if item is None else item.get("RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):
        missing = [k for k, v in (("RescaleSlope", slope), ("RescaleIntercept", intercept)) if v in (None, "")]
        raise PixelDataError(
            f"{name} has no {' and no '.join(missing)}; a CT image needs both to convert stored values "
            "to HU, and the loader does not assume 1 and 0; fix the export on the scanner or PACS"
        )
    slope_value, intercept_value = float(slope), float(intercept)
    # NOTE: only a zero slope is rejected. A single slice with an implausible slope
    # (100 where the others have 1) is scored as it stands.
    if slope_value == 0.0:
        raise PixelDataError(f"{name} has RescaleSlope 0, which maps every pixel to one HU value; the header is invalid")
    return slope_value, intercept_value


def single_frame_record(dataset: Dataset, instance_index: int, name: str) -> SliceRecord:
    """Build the SliceRecord of a single-frame CT Image Storage instance.

    Raises InconsistentGeometryError when the Image Plane attributes are
    missing or malformed, and PixelDataError when the rescale is missing.
    """
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if dataset.get(keyword) in (None, ""):
            raise InconsistentGeometryError(
                f"{name} has no {keyword}; a CT image needs it to place the slice; fix the export"
            )
    slope, intercept = _rescale(dataset, name)
    spacing = _floats(dataset.PixelSpacing, 2, "PixelSpacing", name)
    return SliceRecord(
        instance_index=instance_index,
        frame_number=None,
        sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
        position=_floats(dataset.ImagePositionPatient, 3, "ImagePositionPatient", name),
        orientation=_floats(dataset.ImageOrientationPatient, 6, "ImageOrientationPatient", name),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=int(dataset.Rows),
        columns=int(dataset.Columns),
        slope=slope,
        intercept=intercept,
        slice_thickness=optional_float(dataset.get("SliceThickness")),
        name=name,
    )


def functional_group_item(dataset: Dataset, frame_index: int, keyword: str) -> Dataset | None:
    """Return the first item of functional group `keyword` for a frame, per-frame before shared.

    frame_index: 0-based index into PerFrameFunctionalGroupsSequence.
    Returns None when neither the per-frame nor the shared groups contain it.
    """
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        sequence = per_frame[frame_index].get(keyword)
        if sequence:
            return sequence[0]
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        sequence = shared[0].get(keyword)
        if sequence:
            return sequence[0]
    return None


def functional_group_value(dataset: Dataset, frame_index: int, keyword: str) -> object:
    """Return attribute `keyword` from any functional group macro of a frame, per-frame before shared.

    Each group's first item is searched, so the value is found whichever macro
    carries it: CT X-Ray Details for Enhanced CT, or the Unassigned Per-Frame
    and Shared Converted Attributes of Legacy Converted Enhanced CT. Returns
    None when no group contains it.
    """
    containers = []
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        containers.append(per_frame[frame_index])
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        containers.append(shared[0])
    for container in containers:
        for element in container:
            if element.VR == "SQ" and element.value and keyword in element.value[0]:
                return element.value[0].get(keyword)
    return None


def instance_attribute(dataset: Dataset, keyword: str, frame_index: int = 0) -> object:
    """Return attribute `keyword` of an instance: the top-level value, else `functional_group_value`.

    An empty top-level value counts as absent. Returns None when neither place contains a value.
    """
    value = dataset.get(keyword)
    if value not in (None, ""):
        return value
    return functional_group_value(dataset, frame_index, keyword)


def multi_frame_records(dataset: Dataset, instance_index: int, name: str) -> list[SliceRecord]:
    """Build one SliceRecord per frame of an Enhanced (or Legacy Converted Enhanced) CT instance.

    Reads Plane Position (Patient), Plane Orientation (Patient), Pixel Measures
    and Pixel Value Transformation from the per-frame or shared functional
    groups (PS3.3 C.7.6.16). Raises InconsistentGeometryError or
    PixelDataError naming the frame when one is missing.
    """
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != frames:
        found = 0 if per_frame is None else len(per_frame)
        raise InconsistentGeometryError(
            f"{name} has NumberOfFrames {frames} but {found} Per-Frame Functional Groups items; "
            "the multi-frame header is invalid"
        )
    records = []
    for frame_index in range(frames):
        frame_name = f"{name} frame {frame_index + 1}"
        position_item = functional_group_item(dataset, frame_index, "PlanePositionSequence")
        orientation_item = functional_group_item(dataset, frame_index, "PlaneOrientationSequence")
        measures_item = functional_group_item(dataset, frame_index, "PixelMeasuresSequence")
        transformation_item = functional_group_item(dataset, frame_index, "PixelValueTransformationSequence")
        missing = []
        if position_item is None or position_item.get("ImagePositionPatient") in (None, ""):
            missing.append("Plane Position (Patient)")
        if orientation_item is None or orientation_item.get("ImageOrientationPatient") in (None, ""):
            missing.append("Plane Orientation (Patient)")
        if measures_item is None or measures_item.get("PixelSpacing") in (None, ""):
            missing.append("Pixel Measures")
        if missing or position_item is None or orientation_item is None or measures_item is None:
            raise InconsistentGeometryError(
                f"{frame_name} has no {', '.join(missing)} functional group values; "
                "the Enhanced CT header is invalid"
            )
        slope, intercept = _rescale(transformation_item, frame_name)
        spacing = _floats(measures_item.PixelSpacing, 2, "PixelSpacing", frame_name)
        records.append(
            SliceRecord(
                instance_index=instance_index,
                frame_number=frame_index + 1,
                sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
                position=_floats(position_item.ImagePositionPatient, 3, "ImagePositionPatient", frame_name),
                orientation=_floats(orientation_item.ImageOrientationPatient, 6, "ImageOrientationPatient", frame_name),
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                rows=int(dataset.Rows),
                columns=int(dataset.Columns),
                slope=slope,
                intercept=intercept,
                slice_thickness=optional_float(measures_item.get("SliceThickness")),
                name=frame_name,
            )
        )
    return records


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Return the unit normal cross(row direction, column direction) of an ImageOrientationPatient."""
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise InconsistentGeometryError(
            f"ImageOrientationPatient {list(orientation)} has parallel row and column directions; the header is invalid"
        )
    return normal / length


def check_consistent(records: Sequence[SliceRecord], series: str) -> None:
    """Raise InconsistentGeometryError unless rows, columns, orientation and spacing agree on every slice."""
    _check_matrix_sizes(records, series)
    first = records[0]
    for record in records[1:]:
        if np.max(np.abs(record.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise InconsistentGeometryError(
                f"series {series}: slice at {_position_text(record)} has ImageOrientationPatient "
                f"{_numbers_text(record.orientation)}, slice at {_position_text(first)} has "
                f"{_numbers_text(first.orientation)}; every slice must share one orientation"
            )
        if max(abs(a - b) for a, b in zip(record.pixel_spacing, first.pixel_spacing)) > PIXEL_SPACING_TOLERANCE_MM:
            raise InconsistentGeometryError(
                f"series {series}: slice at {_position_text(record)} has PixelSpacing "
                f"{_numbers_text(record.pixel_spacing)} mm, slice at {_position_text(first)} has "
                f"{_numbers_text(first.pixel_spacing)} mm; every slice must share one pixel spacing"
            )


def _check_matrix_sizes(records: Sequence[SliceRecord], series: str) -> None:
    """Raise InconsistentGeometryError naming the slices outside the most common Rows x Columns."""
    sizes = Counter((record.rows, record.columns) for record in records)
    if len(sizes) == 1:
        return
    (rows, columns), count = sizes.most_common(1)[0]
    others = [record for record in records if (record.rows, record.columns) != (rows, columns)]
    named = "; ".join(
        f"{record.name} at {_position_text(record)}: {record.rows} x {record.columns}"
        for record in others[:MAX_NAMED_SLICES]
    )
    more = f"; and {len(others) - MAX_NAMED_SLICES} more" if len(others) > MAX_NAMED_SLICES else ""
    verb = "differs" if len(others) == 1 else "differ"
    raise InconsistentGeometryError(
        f"series {series}: {count} slice(s) have {rows} x {columns} pixels, {len(others)} {verb} ({named}{more}); "
        "every slice of a series must have the same Rows and Columns; re-send one reconstruction"
    )


def sort_and_measure(records: Sequence[SliceRecord], series: str) -> tuple[list[SliceRecord], float]:
    """Sort slices along the normal and measure the slice increment; reject gaps, duplicates and tilt.

    Returns the records in volume order and the increment in mm. Raises
    SliceSpacingError naming the positions involved (see the module rules).
    """
    if len(records) < MIN_SLICES:
        raise SliceSpacingError(
            f"series {series} has {len(records)} slice; at least {MIN_SLICES} are needed to measure the slice "
            "increment; send the whole calcium-scoring series"
        )
    normal = slice_normal(records[0].orientation)
    distances = np.array([float(np.dot(record.position, normal)) for record in records])
    order = np.argsort(distances, kind="stable")
    ordered = [records[i] for i in order]
    distances = distances[order]
    positions = np.array([record.position for record in ordered])
    steps = np.diff(distances)

    for index, step in enumerate(steps):
        if step < POSITION_TOLERANCE_MM:
            raise SliceSpacingError(
                f"series {series} has two slices at the same position {_position_text(ordered[index])} "
                f"({step:.4f} mm apart along the normal): {ordered[index].name} and {ordered[index + 1].name}; "
                "the series mixes two acquisitions; send one acquisition per series"
            )

    median = float(np.median(steps))
    tolerance = max(POSITION_TOLERANCE_MM, GAP_RELATIVE_TOLERANCE * median)
    for index, step in enumerate(steps):
        if abs(step - median) > tolerance:
            raise SliceSpacingError(
                f"series {series} has slices at {_position_text(ordered[index])} and "
                f"{_position_text(ordered[index + 1])} {step:.3f} mm apart; expected a uniform "
                f"{median:.3f} mm spacing (tolerance {tolerance:.3f} mm); a slice is missing or the "
                "spacing is irregular; re-send the series or reconstruct it without gaps"
            )

    displacement = np.diff(positions, axis=0)
    off_normal = displacement - np.outer(displacement @ normal, normal)
    off_normal_length = np.linalg.norm(off_normal, axis=1)
    worst = int(np.argmax(off_normal_length))
    if off_normal_length[worst] > POSITION_TOLERANCE_MM:
        angle = np.degrees(np.arctan2(off_normal_length[worst], steps[worst]))
        raise SliceSpacingError(
            f"series {series}: the step from {_position_text(ordered[worst])} to "
            f"{_position_text(ordered[worst + 1])} is {angle:.2f}° off the slice normal "
            f"{_numbers_text(normal)} ({off_normal_length[worst]:.3f} mm sideways); the slices are sheared "
            "(gantry tilt); reconstruct the series without tilt or with tilt correction"
        )

    increment = float((distances[-1] - distances[0]) / (len(ordered) - 1))
    return ordered, increment


def _numbers_text(values: Sequence[float] | np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


def _position_text(record: SliceRecord) -> str:
    return _numbers_text(record.position)
