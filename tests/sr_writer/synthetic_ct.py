"""Small synthetic CT series and matching CTVolume objects for the writer tests.

The series are built in memory with pydicom: CT Image Storage headers with a
known geometry and HU values, so each test knows which voxel sits on which
source instance and where.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from scoring.result import ARTERIES, ScoringResult
from scoring.volume import CTVolume, ProtocolFlag

#: Test UID root (the pydicom UID root plus a suffix); never used by a real node.
TEST_UID_ROOT = "1.2.826.0.1.3680043.8.498.77"


@dataclass(frozen=True)
class SyntheticSeries:
    """A CT series in file order and its volume in volume order."""

    datasets: list[Dataset]
    volume: CTVolume


def make_series(
    *,
    slices: int = 6,
    rows: int = 32,
    columns: int = 40,
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    increment: float = 3.0,
    first_z: float = -100.0,
    reverse_file_order: bool = False,
    patient_name: str = "Doe^Jane",
    character_set: str | None = "ISO_IR 100",
    slice_thickness: str = "3.0",
    study_id: str = "4711",
    series_number: int | None = 7,
    hu: np.ndarray | None = None,
) -> SyntheticSeries:
    """Build a single-frame axial CT series.

    Slice k of the volume (volume order, increasing z) sits at z = first_z +
    k × increment. With `reverse_file_order`, `datasets` lists the slices
    from the highest z down, as many scanners write them, and InstanceNumber
    follows the file order. The volume's HU default to 0 (water) with a −1000
    HU border, and `hu` replaces them when given.
    """
    study_uid = generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    if hu is None:
        hu = np.zeros((slices, rows, columns), dtype=np.float32)
        hu[:, :2, :] = -1000.0
    hu = hu.astype(np.float32)

    origin_x, origin_y = -10.0, -20.0
    volume_datasets: list[Dataset] = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if character_set is not None:
            ds.SpecificCharacterSet = character_set
        ds.SOPClassUID = CTImageStorage
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.PatientName = patient_name
        ds.PatientID = "CACS-TEST-1"
        ds.IssuerOfPatientID = "TEST-HOSPITAL"
        qualifier = Dataset()
        qualifier.UniversalEntityID = "1.2.3.4.5"
        qualifier.UniversalEntityIDType = "ISO"
        ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
        ds.PatientBirthDate = "19580317"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20260105"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "ACC-0042"
        ds.StudyID = study_id
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.Manufacturer = "SYNTHETIC"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.KVP = "120"
        ds.SliceThickness = slice_thickness
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin_x, origin_y, first_z + k * increment]
        ds.PixelSpacing = [pixel_spacing[0], pixel_spacing[1]]
        ds.Rows = rows
        ds.Columns = columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.AcquisitionNumber = 1
        volume_datasets.append(ds)

    file_order = list(reversed(volume_datasets)) if reverse_file_order else list(volume_datasets)
    for number, ds in enumerate(file_order, start=1):
        ds.InstanceNumber = number

    positions = np.array([[origin_x, origin_y, first_z + k * increment] for k in range(slices)])
    volume = CTVolume(
        hu=hu,
        padding_mask=np.zeros(hu.shape, dtype=bool),
        origin=positions[0].copy(),
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        slice_direction=np.array([0.0, 0.0, 1.0]),
        pixel_spacing=pixel_spacing,
        slice_increment=increment,
        slice_thickness=float(slice_thickness) if slice_thickness else None,
        kvp=120.0,
        positions=positions,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        frame_of_reference_uid=frame_uid,
        sop_class_uid=CTImageStorage,
        sop_instance_uids=tuple(ds.SOPInstanceUID for ds in volume_datasets),
        headers=tuple(volume_datasets),
    )
    return SyntheticSeries(datasets=file_order, volume=volume)


def make_result(
    volume: CTVolume,
    agatston: dict[str, float],
    volume_mm3: dict[str, float] | None = None,
    mass_mg: dict[str, float] | None = None,
    *,
    flags: tuple[ProtocolFlag, ...] = (),
    mass_calibrated: bool = True,
) -> ScoringResult:
    """Build a ScoringResult with the given per-artery scores; totals are their sums.

    Volume defaults to the Agatston score in mm³ and mass to a tenth of it,
    so each value in an output can be traced to its input. The risk category
    and CAC-DRS follow the definitions in scoring/result.py.
    """
    volume_mm3 = volume_mm3 or dict(agatston)
    mass_mg = mass_mg or {artery: value / 10 for artery, value in agatston.items()}

    def with_total(scores: dict[str, float]) -> dict[str, float]:
        full = {artery: float(scores.get(artery, 0.0)) for artery in ARTERIES}
        full["total"] = sum(full.values())
        return full

    agatston_full = with_total(agatston)
    total = agatston_full["total"]
    if total == 0:
        risk, grade = "I", "A0"
    else:
        risk = "II" if total < 100 else "III" if total < 300 else "IV"
        a_grade = "A1" if total < 100 else "A2" if total < 300 else "A3"
        vessels = sum(1 for artery in ARTERIES if agatston_full[artery] > 0)
        grade = f"{a_grade}/N{vessels}"
    return ScoringResult(
        series_instance_uid=volume.series_instance_uid,
        normalization_factor=volume.slice_increment / 3.0,
        agatston=agatston_full,
        volume_mm3=with_total(volume_mm3),
        mass_mg=with_total(mass_mg),
        risk_category=risk,
        cac_drs=grade,
        lesions=(),
        mass_calibration_factor=0.743,
        mass_calibrated=mass_calibrated,
        flags=flags,
    )
