"""The HU volume of one CT series with the geometry that scoring and the writers need."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

#: HU written into voxels that the series marks as pixel padding. Far below any
#: tissue, so no threshold or model treats padding as signal; `padding_mask`
#: tells which voxels they are.
PADDING_HU = -2048.0


@dataclass(frozen=True)
class ProtocolFlag:
    """A protocol deviation that travels with the volume and the score.

    code: stable identifier, one of "KVP", "SLICE_THICKNESS", "SLICE_INCREMENT",
        "CONTRAST", "BODY_PART", "MASS_UNCALIBRATED".
    message: sentence for a radiologist, naming the value found and the value expected.
    """

    code: str
    message: str


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT series as a float32 HU array of shape (slices, rows, columns) in volume order.

    Volume order is increasing position along `slice_direction`, the cross
    product of the row and column direction cosines of ImageOrientationPatient.

    hu: float32 HU, padding replaced by PADDING_HU.
    padding_mask: True where the stored value was pixel padding.
    origin: ImagePositionPatient of the first slice, in mm (x, y, z).
    row_direction: first ImageOrientationPatient triplet (direction along a row).
    column_direction: second ImageOrientationPatient triplet (direction down a column).
    slice_direction: unit normal, cross(row_direction, column_direction).
    pixel_spacing: PixelSpacing as (row spacing, column spacing) in mm.
    slice_increment: measured distance between consecutive slice positions in mm.
    slice_thickness: nominal SliceThickness in mm, None when empty or missing.
    kvp: KVP, None when missing.
    positions: ImagePositionPatient of each slice, shape (slices, 3).
    sop_instance_uids: SOPInstanceUID of each slice (for Enhanced CT, the one
        instance repeated), in volume order.
    frame_numbers: 1-based frame number of each slice in a multi-frame instance,
        None for single-frame series.
    headers: one dataset per source instance in volume order, with PixelData
        removed; writers copy the Patient and Study modules from them.
    mass_calibration_factor: Calcium Scoring Mass Factor Device (0018,9352),
        first value, in mg HA per cm³ per HU; None when the series has none.
    flags: protocol deviations found while loading.
    """

    hu: np.ndarray
    padding_mask: np.ndarray
    origin: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    slice_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_increment: float
    slice_thickness: float | None
    kvp: float | None
    positions: np.ndarray
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    headers: tuple[Dataset, ...]
    frame_numbers: tuple[int, ...] | None = None
    mass_calibration_factor: float | None = None
    flags: tuple[ProtocolFlag, ...] = field(default_factory=tuple)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def pixel_area_mm2(self) -> float:
        """Area of one pixel in mm², row spacing × column spacing."""
        return float(self.pixel_spacing[0] * self.pixel_spacing[1])

    @property
    def voxel_volume_mm3(self) -> float:
        """Pixel area × measured slice increment, in mm³."""
        return self.pixel_area_mm2 * float(self.slice_increment)

    def index_to_patient(self, index: np.ndarray) -> np.ndarray:
        """Map (slice, row, column) indices, shape (..., 3), to patient coordinates in mm.

        Uses the measured position of each slice, so it stays exact when the
        increment carries float jitter.
        """
        index = np.asarray(index, dtype=np.float64)
        slice_index = index[..., 0]
        lower = np.clip(np.floor(slice_index).astype(int), 0, len(self.positions) - 1)
        upper = np.clip(lower + 1, 0, len(self.positions) - 1)
        fraction = (slice_index - lower)[..., None]
        slice_origin = self.positions[lower] * (1 - fraction) + self.positions[upper] * fraction
        if len(self.positions) == 1:
            slice_origin = self.positions[lower]
        return (
            slice_origin
            + index[..., 1, None] * self.pixel_spacing[0] * self.column_direction
            + index[..., 2, None] * self.pixel_spacing[1] * self.row_direction
        )
