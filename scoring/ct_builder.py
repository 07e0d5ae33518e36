"""Build CT Image Storage datasets from an HU or stored-value array, for the phantom and tests.

The datasets carry the modules of the CT Image IOD (PS3.3 A.3): Patient,
General Study, General Series, Frame of Reference, General Equipment, General
Image, Image Plane, Image Pixel, CT Image, SOP Common, and Contrast/Bolus when
an agent is given. `write_ct_series` writes them as DICOM files with file meta
information (PS3.10). Every UID that is not passed in is generated, so a call
is deterministic only when the caller passes the UIDs or a `uid_seed`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEGLSNearLossless,
    generate_uid,
)

logger = logging.getLogger(__name__)

#: Transfer syntaxes written without compression.
NATIVE_TRANSFER_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})

#: Axial ImageOrientationPatient of a supine patient: rows run toward patient left, columns toward posterior.
AXIAL_ORIENTATION: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _per_slice(value: float | Sequence[float], count: int, name: str) -> list[float]:
    if isinstance(value, (int, float, np.integer, np.floating)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values; expected one number or {count} (one per slice)")
    return values


def _slice_positions(
    count: int,
    positions: np.ndarray | Sequence[Sequence[float]] | None,
    origin: Sequence[float],
    slice_increment: float,
    orientation: Sequence[float],
) -> np.ndarray:
    if positions is not None:
        array = np.asarray(positions, dtype=np.float64)
        if array.shape != (count, 3):
            raise ValueError(f"positions has shape {array.shape}; expected ({count}, 3)")
        return array
    row = np.asarray(orientation[:3], dtype=np.float64)
    column = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row, column)
    start = np.asarray(origin, dtype=np.float64)
    return start + np.arange(count)[:, None] * float(slice_increment) * normal


def _lossy_method(transfer_syntax: str, options: dict[str, Any]) -> str | None:
    """Return the LossyImageCompressionMethod (CID 7030) for lossy options, None when lossless."""
    if transfer_syntax == JPEG2000 and (options.get("j2k_cr") or options.get("j2k_psnr")):
        return "ISO_15444_1"
    if transfer_syntax == JPEGLSNearLossless and options.get("jls_error", 0):
        return "ISO_14495_1"
    return None


def _stored_values(
    values: np.ndarray,
    values_are_stored: bool,
    slopes: list[float],
    intercepts: list[float],
    signed: bool,
) -> np.ndarray:
    if values_are_stored:
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"stored values must be an integer array; got dtype {values.dtype}")
        stored = values.astype(np.int64)
    else:
        slope = np.asarray(slopes, dtype=np.float64)[:, None, None]
        intercept = np.asarray(intercepts, dtype=np.float64)[:, None, None]
        stored = np.rint((values.astype(np.float64) - intercept) / slope).astype(np.int64)

    info = np.iinfo(np.int16 if signed else np.uint16)
    low, high = int(stored.min()), int(stored.max())
    if low < info.min or high > info.max:
        kind = "signed" if signed else "unsigned"
        raise ValueError(
            f"stored values span {low}..{high}, outside the {kind} 16-bit range "
            f"{info.min}..{info.max}; change rescale_intercept/rescale_slope or pixel_representation"
        )
    return stored.astype(np.int16 if signed else np.uint16)


def build_ct_datasets(
    values: np.ndarray,
    *,
    values_are_stored: bool = False,
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    positions: np.ndarray | Sequence[Sequence[float]] | None = None,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    slice_increment: float = 3.0,
    orientation: Sequence[float] = AXIAL_ORIENTATION,
    rescale_slope: float | Sequence[float] = 1.0,
    rescale_intercept: float | Sequence[float] = -1024.0,
    pixel_representation: int = 1,
    bits_stored: int = 16,
    padding_mask: np.ndarray | None = None,
    padding_value: int | None = None,
    padding_range_limit: int | None = None,
    kvp: float | None = 120.0,
    slice_thickness: float | None = 3.0,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    sop_instance_uids: Sequence[str] | None = None,
    uid_prefix: str = PYDICOM_ROOT_UID,
    uid_seed: str | None = None,
    patient_name: str = "PHANTOM^CACS",
    patient_id: str = "CACS-PHANTOM",
    patient_birth_date: str = "",
    patient_sex: str = "O",
    specific_character_set: str | None = None,
    study_date: str = "",
    study_time: str = "",
    study_id: str = "",
    accession_number: str = "",
    series_number: int = 1,
    series_description: str = "Calcium score 3.0 mm",
    body_part_examined: str | None = "CHEST",
    patient_position: str = "HFS",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    manufacturer: str = "cacs-node",
    convolution_kernel: str | None = None,
    contrast_bolus_agent: str | None = None,
    mass_calibration_factor: float | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    compression_options: dict[str, Any] | None = None,
) -> list[Dataset]:
    """Build one CT Image Storage dataset per slice of `values`.

    values: array of shape (slices, rows, columns). HU by default; integer
        stored values when `values_are_stored` is True.
    pixel_spacing: PixelSpacing (row spacing, column spacing) in mm.
    positions: ImagePositionPatient of each slice, shape (slices, 3). When
        None, slices start at `origin` and step `slice_increment` mm along the
        normal of `orientation`.
    orientation: ImageOrientationPatient (row cosines, then column cosines).
    rescale_slope, rescale_intercept: one value or one per slice. HU input is
        converted with stored = round((HU − intercept) / slope).
    pixel_representation: 1 for signed (SS) pixels, 0 for unsigned (US).
    padding_mask: True where a pixel is padding; those pixels are stored
        as `padding_value` (required with the mask).
    padding_value, padding_range_limit: PixelPaddingValue and
        PixelPaddingRangeLimit, in stored-value units.
    kvp, slice_thickness, body_part_examined: written empty (type 2) when None,
        body part left out when None.
    sop_instance_uids: one per slice; other UIDs default to generated ones.
    uid_seed: when given, generated UIDs are derived from it (same seed, same UIDs).
    contrast_bolus_agent: writes the Contrast/Bolus module with this agent.
    mass_calibration_factor: written three times into Calcium Scoring Mass
        Factor Device (0018,9352).
    transfer_syntax: ExplicitVRLittleEndian (default), ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian, or a syntax that `Dataset.compress`
        can encode (RLE, JPEG-LS, JPEG 2000).
    compression_options: keyword arguments for `Dataset.compress`, for example
        {"j2k_cr": [20]} for a lossy JPEG 2000 test series.

    Returns the datasets in the order of `values`, each with file_meta set.
    Raises ValueError when shapes, value ranges or per-slice lists do not fit.
    """
    values = np.asarray(values)
    if values.ndim != 3:
        raise ValueError(f"values has shape {values.shape}; expected (slices, rows, columns)")
    count, rows, columns = values.shape
    if pixel_representation not in (0, 1):
        raise ValueError(f"pixel_representation is {pixel_representation}; expected 0 (unsigned) or 1 (signed)")
    if len(orientation) != 6:
        raise ValueError(f"orientation has {len(orientation)} values; expected 6")
    if padding_mask is not None:
        if padding_value is None:
            raise ValueError("padding_mask was given without padding_value; pass the stored padding value")
        if padding_mask.shape != values.shape:
            raise ValueError(f"padding_mask has shape {padding_mask.shape}; expected {values.shape}")
    if sop_instance_uids is not None and len(sop_instance_uids) != count:
        raise ValueError(f"{len(sop_instance_uids)} sop_instance_uids for {count} slices")

    slopes = _per_slice(rescale_slope, count, "rescale_slope")
    intercepts = _per_slice(rescale_intercept, count, "rescale_intercept")
    signed = pixel_representation == 1
    stored = _stored_values(values, values_are_stored, slopes, intercepts, signed)
    if padding_mask is not None:
        stored = stored.copy()
        stored[padding_mask] = padding_value
    slice_positions = _slice_positions(count, positions, origin, slice_increment, orientation)

    def new_uid(purpose: str) -> UID:
        if uid_seed is None:
            return generate_uid(prefix=uid_prefix)
        return generate_uid(prefix=uid_prefix, entropy_srcs=[uid_seed, purpose])

    study_uid = study_instance_uid or new_uid("study")
    series_uid = series_instance_uid or new_uid("series")
    frame_uid = frame_of_reference_uid or new_uid("frame-of-reference")
    instance_uids = list(sop_instance_uids or [new_uid(f"instance-{i}") for i in range(count)])

    datasets = []
    for index in range(count):
        ds = Dataset()

        # SOP Common
        if specific_character_set:
            ds.SpecificCharacterSet = specific_character_set
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = instance_uids[index]

        # Patient
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = patient_birth_date
        ds.PatientSex = patient_sex

        # General Study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = study_date
        ds.StudyTime = study_time
        ds.ReferringPhysicianName = ""
        ds.StudyID = study_id
        ds.AccessionNumber = accession_number

        # General Series
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.PatientPosition = patient_position
        if body_part_examined is not None:
            ds.BodyPartExamined = body_part_examined

        # Frame of Reference
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""

        # General Equipment
        ds.Manufacturer = manufacturer
        if padding_value is not None:
            ds.add_new(0x00280120, "SS" if signed else "US", int(padding_value))

        # General Image
        ds.InstanceNumber = index + 1
        ds.ImageType = list(image_type)
        ds.ContentDate = study_date
        ds.ContentTime = study_time

        # Image Plane
        ds.PixelSpacing = [f"{pixel_spacing[0]:.10g}", f"{pixel_spacing[1]:.10g}"]
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in slice_positions[index]]
        ds.SliceThickness = "" if slice_thickness is None else f"{slice_thickness:.10g}"
        ds.SliceLocation = f"{float(np.dot(slice_positions[index], np.cross(orientation[:3], orientation[3:]))):.10g}"

        # Contrast/Bolus
        if contrast_bolus_agent is not None:
            ds.ContrastBolusAgent = contrast_bolus_agent

        # Image Pixel and CT Image
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = pixel_representation
        if padding_range_limit is not None:
            ds.add_new(0x00280121, "SS" if signed else "US", int(padding_range_limit))
        ds.RescaleIntercept = f"{intercepts[index]:.10g}"
        ds.RescaleSlope = f"{slopes[index]:.10g}"
        ds.RescaleType = "HU"
        ds.KVP = "" if kvp is None else f"{kvp:.10g}"
        ds.AcquisitionNumber = 1
        if convolution_kernel is not None:
            ds.ConvolutionKernel = convolution_kernel
        if mass_calibration_factor is not None:
            ds.CalciumScoringMassFactorDevice = [float(mass_calibration_factor)] * 3
        ds.PixelData = stored[index].tobytes()

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_original_encoding(False, True)
        if transfer_syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.set_original_encoding(True, True)
        elif transfer_syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        elif transfer_syntax not in NATIVE_TRANSFER_SYNTAXES:
            ds.compress(
                transfer_syntax,
                stored[index],
                generate_instance_uid=False,
                **(compression_options or {}),
            )
            lossy_method = _lossy_method(transfer_syntax, compression_options or {})
            if lossy_method:
                ds.LossyImageCompression = "01"
                ds.LossyImageCompressionMethod = lossy_method
        datasets.append(ds)
    return datasets


def write_ct_series(datasets: Sequence[Dataset], folder: str | Path) -> list[Path]:
    """Write each dataset to `folder/<SOPInstanceUID>.dcm` in the DICOM file format.

    The folder is created when missing. Returns the written paths in the order
    of `datasets`. Raises ValueError when a dataset has no SOPInstanceUID or
    no file_meta transfer syntax, and FileExistsError rather than overwrite a file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            raise ValueError("dataset has no SOPInstanceUID; build it with build_ct_datasets")
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            raise ValueError(f"dataset {uid} has no file_meta TransferSyntaxUID")
        path = folder / f"{uid}.dcm"
        if path.exists():
            raise FileExistsError(f"{path} already exists; write each series into an empty folder")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    series_uid = datasets[0].get("SeriesInstanceUID", "") if datasets else ""
    logger.debug("wrote %d CT instances of series %s to %s", len(paths), series_uid, folder)
    return paths


def build_enhanced_ct_dataset(
    values: np.ndarray,
    *,
    frame_order: Sequence[int] | None = None,
    instance_uid: str | None = None,
    **options: Any,
) -> Dataset:
    """Build one Enhanced CT Image Storage dataset whose frames are the slices of `values`.

    values and options: as for `build_ct_datasets` (native transfer syntaxes
        only). Per-slice rescale values go into per-frame Pixel Value
        Transformation items; geometry goes into Plane Position (per frame),
        Plane Orientation and Pixel Measures (shared) functional groups.
    frame_order: the slice index stored as frame 1, 2, ...; default in order.
        Tests use a permutation to check that readers sort by position.
    instance_uid: SOPInstanceUID of the multi-frame instance.

    TODO(#2): the dataset carries the modules that readers of the frame geometry
    need, not every module of the Enhanced CT IOD; dciodvfy reports the rest.
    """
    transfer_syntax = options.get("transfer_syntax", ExplicitVRLittleEndian)
    if transfer_syntax not in NATIVE_TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax {transfer_syntax} is not supported for Enhanced CT; use a native syntax")
    slices = build_ct_datasets(values, **options)
    count = len(slices)
    order = list(range(count)) if frame_order is None else [int(i) for i in frame_order]
    if sorted(order) != list(range(count)):
        raise ValueError(f"frame_order {order} is not a permutation of 0..{count - 1}")

    first = slices[0]
    ds = Dataset()
    for element in first:
        if element.keyword in _PER_SLICE_KEYWORDS:
            continue
        ds.add(element)
    ds.SOPClassUID = EnhancedCTImageStorage
    if instance_uid:
        ds.SOPInstanceUID = instance_uid
    ds.ImageType = list(first.ImageType)[:3] + ["NONE"] * (4 - min(3, len(first.ImageType)))
    ds.NumberOfFrames = count
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionNumber = 1

    # Shared Functional Groups: Pixel Measures, Plane Orientation, CT X-Ray Details
    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    xray = Dataset()
    xray.KVP = first.KVP
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.CTXRayDetailsSequence = DicomSequence([xray])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    # Per-frame Functional Groups: Frame Content, Plane Position, Pixel Value Transformation
    per_frame = []
    for frame_index, slice_index in enumerate(order):
        source = slices[slice_index]
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = slice_index + 1
        content.DimensionIndexValues = [1, slice_index + 1]
        position = Dataset()
        position.ImagePositionPatient = source.ImagePositionPatient
        transformation = Dataset()
        transformation.RescaleIntercept = source.RescaleIntercept
        transformation.RescaleSlope = source.RescaleSlope
        transformation.RescaleType = "HU"
        item = Dataset()
        item.FrameContentSequence = DicomSequence([content])
        item.PlanePositionSequence = DicomSequence([position])
        item.PixelValueTransformationSequence = DicomSequence([transformation])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)

    # Multi-frame Dimension: stack ID and in-stack position
    uid_seed = options.get("uid_seed")
    prefix = options.get("uid_prefix", PYDICOM_ROOT_UID)
    entropy = None if uid_seed is None else [uid_seed, "dimension-organization"]
    dimension_uid = generate_uid(prefix=prefix, entropy_srcs=entropy)
    dimensions = []
    for pointer in (0x00209056, 0x00209057):  # StackID, InStackPositionNumber
        dimension = Dataset()
        dimension.DimensionOrganizationUID = dimension_uid
        dimension.DimensionIndexPointer = pointer
        dimension.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        dimensions.append(dimension)
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_uid
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    ds.DimensionIndexSequence = DicomSequence(dimensions)

    ds.PixelData = b"".join(slices[slice_index].PixelData for slice_index in order)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = first.file_meta.TransferSyntaxUID
    ds.set_original_encoding(transfer_syntax == ImplicitVRLittleEndian, True)
    return ds


#: Attributes that Enhanced CT moves from the top level into functional groups.
_PER_SLICE_KEYWORDS = frozenset(
    {
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SliceLocation",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "KVP",
        "PixelData",
    }
)
