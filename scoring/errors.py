"""Exceptions raised when a CT series cannot be loaded or scored.

Every message names the offending values and states what to do, because the
node shows it verbatim on a refused job.
"""

from pathlib import Path


class SeriesError(ValueError):
    """Base class: the input cannot be turned into a scoreable CT volume."""


class NoEligibleSeriesError(SeriesError):
    """No CT Image Storage series with axial slices was found in the input."""


class AmbiguousSeriesError(SeriesError):
    """Several eligible series were found and no selection rule picks one."""


class InconsistentGeometryError(SeriesError):
    """Slices disagree on rows, columns, orientation or pixel spacing."""


class SliceSpacingError(SeriesError):
    """Slice positions have a gap, are duplicated, or step off the slice normal (gantry tilt)."""


class PixelDataError(SeriesError):
    """Pixel data is missing, cannot be decoded, lacks rescale values, or is lossy compressed."""


class UndecodablePixelDataError(PixelDataError):
    """Uncompressed pixel data that fails to decode, as in a file cut short."""


class ProtocolRefusedError(SeriesError):
    """The acquisition breaks a protocol rule whose policy is "refuse" (contrast, kVp, thickness)."""


class LabelError(ValueError):
    """A label map or SEG does not match the series it should describe."""


class MissingUIDError(SeriesError):
    """The series lacks SeriesInstanceUID or SOPInstanceUIDs, so derived objects cannot reference it."""


class DamagedInstanceError(SeriesError):
    """A DICOM file of the input cannot be read completely, so a slice may be missing unnoticed.

    paths: the damaged files, so that the node can name the stored instances
        to set aside; empty when the input was a Dataset in memory.
    """

    def __init__(self, message: str, path: Path | None = None, *, paths: tuple[Path, ...] = ()) -> None:
        super().__init__(message)
        self.paths = (path, *paths) if path is not None else paths


class InconsistentIdentityError(SeriesError):
    """Instances of one series disagree on PatientID, PatientName, StudyInstanceUID or FrameOfReferenceUID.

    Such a series may mix two patients or two scans, so it is never scored.
    The message names SOPInstanceUIDs and value counts, never the patient values.
    """


class FieldOfViewError(SeriesError):
    """The images cover too small an area to hold a heart, so the model cannot segment them."""
