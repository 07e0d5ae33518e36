"""Small CT series with known calcium for the writer tests, built, loaded and scored in memory.

A case is built with scoring.ct_builder, loaded with scoring.series.load_series
and scored with scoring.agatston.score_volume, so the writers see exactly what
the node would give them. Lesions are squares of constant HU, so each test
can tell which voxel sits on which source instance and at which position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from scoring.agatston import score_volume
from scoring.ct_builder import build_ct_datasets, build_enhanced_ct_dataset
from scoring.result import ARTERY_LABELS, OTHER_CALCIUM, ScoringResult
from scoring.series import load_series
from scoring.volume import CTVolume

#: Test UID root under the pydicom root (1.2.826.0.1.3680043.8.498); never a real node's.
TEST_UID_ROOT = "1.2.826.0.1.3680043.8.498.77"

#: HU of the soft tissue around the lesions (blood pool), below the 130 HU threshold.
BLOOD_HU = 40.0


@dataclass(frozen=True)
class Lesion:
    """A square lesion: `size` × `size` pixels at (row, column) on one slice, in volume order."""

    artery: str
    slice_index: int
    row: int
    column: int
    size: int = 5
    hu: float = 400.0


@dataclass(frozen=True)
class Case:
    """A scored synthetic series: datasets in file order, volume, labels and result."""

    datasets: list[Dataset]
    volume: CTVolume
    labels: np.ndarray
    result: ScoringResult
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)


def default_lesions() -> tuple[Lesion, ...]:
    """One lesion per artery on different slices, plus LAD calcium over two slices."""
    return (
        Lesion("LAD", slice_index=2, row=10, column=8),
        Lesion("LAD", slice_index=3, row=10, column=8, size=3),
        Lesion("LCX", slice_index=4, row=25, column=20, hu=250.0),
        Lesion("RCA", slice_index=5, row=30, column=5, hu=700.0),
    )


def make_case(
    lesions: tuple[Lesion, ...] | None = None,
    *,
    slices: int = 8,
    rows: int = 40,
    columns: int = 36,
    pixel_spacing: tuple[float, float] = (0.4, 0.7),
    reverse_file_order: bool = False,
    other_calcium: bool = False,
    patient_name: str = "Doe^Jane",
    specific_character_set: str | None = "ISO_IR 100",
    slice_thickness: float | None = 3.0,
    study_id: str = "4711",
    enhanced: bool = False,
) -> Case:
    """Build, load and score a series with the given lesions (default_lesions() when None).

    With `reverse_file_order`, the datasets list the slices from the highest
    z down and InstanceNumber follows that order, as many scanners write it.
    With `other_calcium`, a 4 × 4 block of 900 HU labelled OTHER_CALCIUM sits
    on slice 1. With `enhanced`, the series is one Enhanced CT instance whose
    frames are stored in reverse slice order.
    """
    lesions = default_lesions() if lesions is None else lesions
    hu = np.full((slices, rows, columns), BLOOD_HU, dtype=np.float32)
    hu[:, :2, :] = -1000.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    for lesion in lesions:
        region = (
            lesion.slice_index,
            slice(lesion.row, lesion.row + lesion.size),
            slice(lesion.column, lesion.column + lesion.size),
        )
        hu[region] = lesion.hu
        labels[region] = ARTERY_LABELS[lesion.artery]
    if other_calcium:
        hu[1, 5:9, 20:24] = 900.0
        labels[1, 5:9, 20:24] = OTHER_CALCIUM

    options = dict(
        pixel_spacing=pixel_spacing,
        origin=(-20.0, -30.0, 100.0),
        slice_increment=3.0,
        slice_thickness=slice_thickness,
        patient_name=patient_name,
        patient_id="CACS-TEST-1",
        patient_birth_date="19580317",
        patient_sex="F",
        specific_character_set=specific_character_set,
        study_date="20260105",
        study_time="101500",
        study_id=study_id,
        accession_number="ACC-0042",
        series_number=7,
    )
    if enhanced:
        enhanced_dataset = build_enhanced_ct_dataset(hu, frame_order=list(reversed(range(slices))), **options)
        _add_patient_details(enhanced_dataset)
        datasets = [enhanced_dataset]
    else:
        datasets = build_ct_datasets(hu, **options)
        for dataset in datasets:
            _add_patient_details(dataset)
        if reverse_file_order:
            datasets = list(reversed(datasets))
            for number, dataset in enumerate(datasets, start=1):
                dataset.InstanceNumber = number

    volume = load_series(datasets)
    return Case(
        datasets=datasets,
        volume=volume,
        labels=labels,
        result=score_volume(volume, labels),
        lesions=lesions,
    )


def _add_patient_details(dataset: Dataset) -> None:
    """Add the issuer of the patient ID with qualifiers and a referring physician."""
    dataset.IssuerOfPatientID = "TEST-HOSPITAL"
    qualifier = Dataset()
    qualifier.UniversalEntityID = "1.2.3.4.5"
    qualifier.UniversalEntityIDType = "ISO"
    dataset.IssuerOfPatientIDQualifiersSequence = [qualifier]
    dataset.ReferringPhysicianName = "Referrer^Rita"
