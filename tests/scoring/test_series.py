"""Tests of CT series loading: grouping, sorting, spacing, pixel decoding, padding and protocol flags."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from scoring.config import ProtocolPolicy
from scoring.ct_builder import build_ct_datasets, build_enhanced_ct_dataset, write_ct_series
from scoring.errors import (
    AmbiguousSeriesError,
    DamagedInstanceError,
    InconsistentGeometryError,
    InconsistentIdentityError,
    MissingUIDError,
    NoEligibleSeriesError,
    PixelDataError,
    ProtocolRefusedError,
    SliceSpacingError,
)
from scoring.protocol import image_contrast_evidence
from scoring.series import list_series, load_series
from scoring.volume import PADDING_HU
from tests.factories import TEST_PADDING_STORED, blank_hu, circle_padding_mask, make_ct_datasets, make_series_dir


def _tissue_hu(slices: int = 5, rows: int = 32, columns: int = 32, seed: int = 0) -> np.ndarray:
    """Integer HU from −1000 to 1500 with a calcium blob, so every rescale round-trips exactly."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 1500, size=(slices, rows, columns)).astype(np.float64)
    hu[:, 10:13, 10:13] = 450.0
    return hu


# --- builder ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless],
    ids=["explicit", "implicit", "rle", "jpeg-ls", "jpeg2000"],
)
def test_write_ct_series_pass_dciodvfy(tmp_path: Path, transfer_syntax: str) -> None:
    datasets = make_ct_datasets(
        blank_hu(slices=2),
        padding_mask=circle_padding_mask(2, 32, 32),
        padding_value=TEST_PADDING_STORED,
        mass_calibration_factor=0.8,
        specific_character_set="ISO_IR 192",
        patient_name="Müller^Jürgen",
        contrast_bolus_agent="NONE",
        transfer_syntax=transfer_syntax,
    )
    paths = write_ct_series(datasets, tmp_path)
    for path in paths:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"


def test_build_ct_datasets_same_uid_seed_identical_bytes(tmp_path: Path) -> None:
    first = write_ct_series(make_ct_datasets(uid_seed="seed-7"), tmp_path / "first")
    second = write_ct_series(make_ct_datasets(uid_seed="seed-7"), tmp_path / "second")
    assert [p.name for p in first] == [p.name for p in second]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_build_ct_datasets_hu_outside_int16_raises() -> None:
    # (40000 − (−1024)) / 1 = 41024 > 32767, the largest signed 16-bit value.
    with pytest.raises(ValueError, match="outside the signed 16-bit range"):
        build_ct_datasets(blank_hu(value=40000.0))


# --- sorting, grouping, selection -------------------------------------------


def test_load_series_shuffled_file_order_bit_identical(tmp_path: Path) -> None:
    hu = _tissue_hu(slices=6)
    datasets = make_ct_datasets(hu, padding_mask=circle_padding_mask(6, 32, 32), padding_value=TEST_PADDING_STORED)
    shuffled = [datasets[i] for i in (3, 0, 5, 1, 4, 2)]
    for ds in shuffled:
        ds.InstanceNumber = 1  # never used for ordering
    write_ct_series(datasets, tmp_path / "ordered")
    write_ct_series(shuffled, tmp_path / "shuffled")

    ordered_volume = load_series(tmp_path / "ordered")
    shuffled_volume = load_series(tmp_path / "shuffled")
    from_datasets = load_series(shuffled)

    assert ordered_volume.hu.tobytes() == shuffled_volume.hu.tobytes()
    assert ordered_volume.hu.tobytes() == from_datasets.hu.tobytes()
    assert shuffled_volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)
    # Slices start at z = 0 and step 3 mm along the normal (0, 0, 1).
    assert shuffled_volume.positions[:, 2].tolist() == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0]


def test_load_series_descending_positions_sorted_along_normal() -> None:
    # Positions run −3 mm per file; volume order is increasing z, so file 4 comes first.
    datasets = make_ct_datasets(_tissue_hu(slices=4), origin=(0.0, 0.0, 100.0), slice_increment=-3.0)
    volume = load_series(datasets)
    assert volume.positions[:, 2].tolist() == [91.0, 94.0, 97.0, 100.0]
    assert volume.sop_instance_uids[0] == datasets[3].SOPInstanceUID
    assert volume.slice_increment == pytest.approx(3.0, abs=1e-9)


def test_load_series_localizer_in_series_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    datasets = make_series_dir(tmp_path, _tissue_hu(slices=4))
    localizer = build_ct_datasets(
        blank_hu(1),
        orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        study_instance_uid=datasets[0].StudyInstanceUID,
        series_instance_uid=datasets[0].SeriesInstanceUID,
        frame_of_reference_uid=datasets[0].FrameOfReferenceUID,
    )
    write_ct_series(localizer, tmp_path)

    with caplog.at_level(logging.INFO, logger="scoring.series"):
        volume = load_series(tmp_path)

    assert volume.shape == (4, 32, 32)
    assert localizer[0].SOPInstanceUID not in volume.sop_instance_uids
    assert any("localizer" in record.getMessage() for record in caplog.records)


def test_load_series_non_axial_and_non_ct_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    datasets = make_series_dir(tmp_path, _tissue_hu(slices=3))
    coronal = build_ct_datasets(blank_hu(1), orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
                                series_instance_uid=datasets[0].SeriesInstanceUID)
    capture = build_ct_datasets(blank_hu(1), series_instance_uid=datasets[0].SeriesInstanceUID)
    capture[0].SOPClassUID = SecondaryCaptureImageStorage
    capture[0].file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    write_ct_series(coronal + capture, tmp_path)
    (tmp_path / "notes.txt").write_text("not DICOM")

    with caplog.at_level(logging.INFO, logger="scoring.series"):
        volume = load_series(tmp_path)

    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)
    assert "not axial" in messages
    assert "Secondary Capture Image Storage is not a CT image" in messages
    assert "not a DICOM file (no DICM prefix) (for example file " in messages
    assert "notes.txt" in messages


def test_load_series_two_series_picks_3mm_never_mixes(tmp_path: Path) -> None:
    thick = make_series_dir(tmp_path / "a", _tissue_hu(slices=4), slice_thickness=3.0)
    thin = make_series_dir(tmp_path / "b", _tissue_hu(slices=8, seed=1), slice_thickness=1.5, slice_increment=1.5)

    volume = load_series(tmp_path)
    thin_volume = load_series(tmp_path, series_instance_uid=thin[0].SeriesInstanceUID)

    assert volume.series_instance_uid == thick[0].SeriesInstanceUID
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in thick)
    assert thin_volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in thin)
    image_counts = {summary.series_instance_uid: summary.image_count for summary in list_series(tmp_path)}
    assert image_counts == {thick[0].SeriesInstanceUID: 4, thin[0].SeriesInstanceUID: 8}


def test_load_series_two_3mm_series_ambiguous(tmp_path: Path) -> None:
    first = make_series_dir(tmp_path / "a", _tissue_hu(slices=3))
    second = make_series_dir(tmp_path / "b", _tissue_hu(slices=3, seed=2))
    with pytest.raises(AmbiguousSeriesError, match="2 CT series are equally suited") as raised:
        load_series(tmp_path)
    assert first[0].SeriesInstanceUID in str(raised.value)
    assert second[0].SeriesInstanceUID in str(raised.value)


def test_load_series_requested_uid_absent_raises(tmp_path: Path) -> None:
    make_series_dir(tmp_path, _tissue_hu(slices=3))
    with pytest.raises(NoEligibleSeriesError, match="series 1.2.3 is not among the eligible CT series"):
        load_series(tmp_path, series_instance_uid="1.2.3")


def test_load_series_only_non_images_raises(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(NoEligibleSeriesError, match="no axial CT image series with pixel data"):
        load_series(tmp_path)


def test_load_series_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(NoEligibleSeriesError, match="does not exist"):
        load_series(tmp_path / "absent")


def test_load_series_duplicate_file_copy_dropped(tmp_path: Path) -> None:
    datasets = make_series_dir(tmp_path / "series", _tissue_hu(slices=3))
    write_ct_series([datasets[1]], tmp_path / "copy")
    volume = load_series(tmp_path)
    assert volume.shape[0] == 3


@pytest.mark.parametrize(
    ("kept_bytes", "error", "message"),
    [
        # 132 bytes: the 128-byte preamble and "DICM", nothing else.
        (132, DamagedInstanceError, "has a DICOM prefix but no data elements"),
        # 400 bytes end inside the dataset's SOPClassUID, so it differs from the file meta.
        (400, DamagedInstanceError, "has SOPClassUID 1.2.840.1000 but MediaStorageSOPClassUID"),
        # 700 bytes end before (7FE0,0010).
        (700, DamagedInstanceError, "is a CT image without PixelData"),
        # All but the last 500 of 2048 pixel bytes.
        (-500, DamagedInstanceError, r"less than expected \(1548 vs 2048 bytes\).*; check that the file is complete$"),
    ],
    ids=["preamble-only", "inside-header", "before-pixels", "inside-pixels"],
)
def test_load_series_truncated_file_raises(tmp_path: Path, kept_bytes: int, error: type, message: str) -> None:
    # A 3-slice series of 32 x 32 signed 16-bit pixels: 2048 pixel bytes per file.
    make_series_dir(tmp_path, blank_hu(slices=3), uid_seed="truncated")
    damaged = sorted(tmp_path.iterdir())[1]
    damaged.write_bytes(damaged.read_bytes()[:kept_bytes])
    with pytest.raises(error, match=message) as raised:
        load_series(tmp_path)
    # The node looks the file up among its stored instances to offer setting it aside.
    if error is DamagedInstanceError:
        assert raised.value.paths == (damaged,)


def _damaged_error(folder: Path) -> DamagedInstanceError:
    """Return the DamagedInstanceError that loading `folder` raises."""
    with pytest.raises(DamagedInstanceError) as raised:
        load_series(folder)
    return raised.value


def test_load_series_names_every_damaged_file(tmp_path: Path) -> None:
    make_series_dir(tmp_path, blank_hu(slices=4), uid_seed="two-damaged")
    files = sorted(tmp_path.iterdir())
    files[0].write_bytes(b"")
    files[2].write_bytes(files[2].read_bytes()[:132])

    # One refusal names both files, so the operator does not fix them one by one.
    error = _damaged_error(tmp_path)
    message = str(error)
    assert message.startswith("2 instances are damaged: file ")
    assert f"file {files[0]} has a DICOM file name suffix but has only 0 bytes" in message
    assert f"file {files[2]} has a DICOM prefix but no data elements" in message
    assert sorted(error.paths) == [files[0], files[2]]


def test_load_series_invalid_headers_damaged(tmp_path: Path) -> None:
    make_series_dir(tmp_path, blank_hu(slices=4), uid_seed="bad-headers")
    files = sorted(tmp_path.iterdir())
    without_position = pydicom.dcmread(files[0])
    del without_position.ImagePositionPatient
    without_position.save_as(files[0])
    zero_slope = pydicom.dcmread(files[3])
    zero_slope.RescaleSlope = 0
    zero_slope.save_as(files[3])

    # Header faults of single files are damaged instances, so the node can offer to set them aside.
    error = _damaged_error(tmp_path)
    message = str(error)
    assert message.startswith("2 instances are damaged: ")
    assert f"instance {without_position.SOPInstanceUID} has no ImagePositionPatient" in message
    assert f"instance {zero_slope.SOPInstanceUID}" in message
    assert "RescaleSlope 0" in message
    assert sorted(error.paths) == [files[0], files[3]]


@pytest.mark.parametrize("kept_bytes", [0, 100], ids=["empty", "100-bytes"])
def test_load_series_short_dcm_file_raises(tmp_path: Path, kept_bytes: int) -> None:
    make_series_dir(tmp_path, blank_hu(slices=3), uid_seed="short")
    damaged = sorted(tmp_path.iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:kept_bytes])
    # 132 bytes = the 128-byte preamble plus "DICM".
    with pytest.raises(
        DamagedInstanceError,
        match=rf"file .*{damaged.name} has a DICOM file name suffix but has only {kept_bytes} bytes; "
        r"a DICOM file has at least 132 \(preamble and DICM prefix\)",
    ):
        load_series(tmp_path)


def test_load_series_short_uid_file_raises(tmp_path: Path) -> None:
    datasets = make_series_dir(tmp_path / "series", blank_hu(slices=3), uid_seed="short-uid")
    damaged = tmp_path / "series" / f"{datasets[2].SOPInstanceUID}.dcm"
    renamed = damaged.with_suffix("")  # a UID name: its last component "1234" reads as a digits-only suffix
    damaged.rename(renamed)
    renamed.write_bytes(b"")
    message = rf"{renamed.name} sits beside DICOM files but has only 0 bytes"
    with pytest.raises(DamagedInstanceError, match=message) as raised:
        load_series(tmp_path)
    assert raised.value.paths == (renamed,)


def test_load_series_short_non_dicom_files_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_series_dir(tmp_path / "series", blank_hu(slices=3), uid_seed="short-other")
    (tmp_path / "series" / "README.txt").write_bytes(b"")
    (tmp_path / "series" / "DICOMDIR").write_bytes(b"")
    (tmp_path / "notes").write_bytes(b"x" * 10)  # no DICOM file in tmp_path itself
    caplog.set_level(logging.INFO, logger="scoring.series")
    volume = load_series(tmp_path)
    assert volume.shape[0] == 3
    # README.txt, DICOMDIR and notes are logged on one line for their shared reason.
    assert "dropped 3 input(s): not a DICOM file (no DICM prefix)" in caplog.text


# --- patient, study and frame of reference identity ------------------------------


def test_load_series_patient_id_differs_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    datasets = make_series_dir(tmp_path, _tissue_hu(slices=4), uid_seed="identity")
    odd = sorted(tmp_path.iterdir())[2]
    edited = pydicom.dcmread(odd)
    edited.PatientID = "OTHER-PATIENT-4711"
    edited.save_as(odd)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(
        InconsistentIdentityError,
        match=(
            r"has 4 instances with 2 different values \(3, 1 instances\) of PatientID, "
            rf"so it may mix two patients or scans; instances outside the largest group: {edited.SOPInstanceUID}; "
            r"check the series at the scanner or PACS"
        ),
    ) as raised:
        load_series(tmp_path)
    assert "OTHER-PATIENT-4711" not in str(raised.value)
    assert str(datasets[0].PatientID) not in str(raised.value)
    assert "OTHER-PATIENT-4711" not in caplog.text


@pytest.mark.parametrize("keyword", ["PatientName", "StudyInstanceUID", "FrameOfReferenceUID"])
def test_load_series_identity_attribute_differs_raises(keyword: str) -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    setattr(datasets[0], keyword, "1.2.3.4" if keyword != "PatientName" else "Other^Patient")
    with pytest.raises(InconsistentIdentityError, match=rf"2 different values .* of {keyword}") as raised:
        load_series(datasets)
    assert datasets[0].SOPInstanceUID in str(raised.value)
    assert "Other^Patient" not in str(raised.value)


def test_load_series_missing_frame_of_reference_raises() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    frame_of_reference = datasets[0].FrameOfReferenceUID
    del datasets[1].FrameOfReferenceUID
    # UIDs are not patient identifiers, so they are named with their counts: 2 carry it, 1 lacks it.
    with pytest.raises(
        InconsistentIdentityError,
        match=rf"3 instances with 2 different values \({frame_of_reference} in 2, \(missing\) in 1 instances\)",
    ):
        load_series(datasets)


# --- slice spacing and geometry errors ---------------------------------------


def test_load_series_missing_slice_names_positions() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=6))
    del datasets[3]  # z = 9 mm is gone, so 6 mm lies between z = 6 and z = 12
    with pytest.raises(SliceSpacingError, match=r"\[0, 0, 6\] and \[0, 0, 12\] 6.000 mm apart; expected a uniform 3.000 mm"):
        load_series(datasets)


def test_load_series_float_jitter_accepted() -> None:
    # Offsets of ±1e-6 mm; the increment is the mean step (15 − 0) / 5 = 3 mm.
    jitter = np.array([0.0, 1e-6, -1e-6, 1e-6, 0.0, 0.0])
    positions = [(0.0, 0.0, 3.0 * i + jitter[i]) for i in range(6)]
    volume = load_series(make_ct_datasets(_tissue_hu(slices=6), positions=positions))
    assert volume.slice_increment == pytest.approx(3.0, abs=1e-9)
    assert volume.shape[0] == 6


def test_load_series_duplicate_position_names_both() -> None:
    positions = [(0.0, 0.0, 0.0), (0.0, 0.0, 3.0), (0.0, 0.0, 3.0), (0.0, 0.0, 6.0)]
    datasets = make_ct_datasets(_tissue_hu(slices=4), positions=positions)
    with pytest.raises(SliceSpacingError, match=r"two slices at the same position \[0, 0, 3\]") as raised:
        load_series(datasets)
    assert datasets[1].SOPInstanceUID in str(raised.value)
    assert datasets[2].SOPInstanceUID in str(raised.value)


def test_load_series_gantry_tilt_raises() -> None:
    # Each 3 mm step also moves 0.5 mm in y: atan(0.5 / 3) = 9.46° off the normal.
    positions = [(0.0, 0.5 * i, 3.0 * i) for i in range(4)]
    with pytest.raises(SliceSpacingError, match=r"9\.46° off the slice normal .*\(gantry tilt\)"):
        load_series(make_ct_datasets(_tissue_hu(slices=4), positions=positions))


def test_load_series_single_slice_raises() -> None:
    with pytest.raises(SliceSpacingError, match="has 1 slice; at least 2 are needed"):
        load_series(make_ct_datasets(_tissue_hu(slices=1)))


def _with_smaller_slices(count: int, smaller: int) -> tuple[list[Dataset], list[Dataset]]:
    """Return `count` slices of 32 x 32 pixels and, above them in the same series, `smaller` of 16 x 32."""
    datasets = make_ct_datasets(_tissue_hu(slices=count))
    others = build_ct_datasets(
        _tissue_hu(slices=smaller, rows=16),
        origin=(0.0, 0.0, 3.0 * count),
        study_instance_uid=datasets[0].StudyInstanceUID,
        series_instance_uid=datasets[0].SeriesInstanceUID,
        frame_of_reference_uid=datasets[0].FrameOfReferenceUID,
    )
    return datasets, others


def test_load_series_mismatched_rows_raises() -> None:
    datasets, other = _with_smaller_slices(3, 1)
    with pytest.raises(InconsistentGeometryError,
                       match=rf"3 slice\(s\) have 32 x 32 pixels, 1 differs \(instance {other[0].SOPInstanceUID} "
                             r"at \[0, 0, 9\]: 16 x 32\); every slice"):
        load_series(datasets + other)


def test_load_series_many_mismatched_sizes_raises() -> None:
    datasets, others = _with_smaller_slices(7, 6)
    with pytest.raises(InconsistentGeometryError) as raised:
        load_series(datasets + others)

    message = str(raised.value)
    assert "7 slice(s) have 32 x 32 pixels, 6 differ (" in message
    assert [str(dataset.SOPInstanceUID) in message for dataset in others].count(True) == 5
    assert "; and 1 more); every slice of a series must have the same Rows and Columns" in message


def test_load_series_mismatched_pixel_spacing_raises() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    datasets[2].PixelSpacing = [0.6, 0.5]
    with pytest.raises(InconsistentGeometryError, match=r"PixelSpacing \[0.6, 0.5\] mm, slice at \[0, 0, 0\] has \[0.5, 0.5\]"):
        load_series(datasets)


def test_load_series_nan_position_raises() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    datasets[1].ImagePositionPatient = ["nan", "nan", "nan"]
    # Named as a header fault of one instance, before the NaN reaches any contrast or spacing check.
    with pytest.raises(InconsistentGeometryError,
                       match=rf"instance {datasets[1].SOPInstanceUID}: ImagePositionPatient is \[nan, nan, nan\]; "
                             "expected finite numbers"):
        load_series(datasets)


def test_load_series_mismatched_orientation_raises() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    datasets[1].ImageOrientationPatient = [0.9998477, 0.0174524, 0.0, -0.0174524, 0.9998477, 0.0]
    with pytest.raises(InconsistentGeometryError, match="every slice must share one orientation"):
        load_series(datasets)


# --- HU, rescale and padding --------------------------------------------------


def test_load_series_rescale_changes_per_slice_equal_hu() -> None:
    hu = blank_hu(slices=3, value=40.0)
    hu[:, 5:8, 5:8] = 400.0
    datasets = make_ct_datasets(hu, rescale_slope=[1.0, 0.5, 2.0], rescale_intercept=[-1024.0, -1000.0, -2048.0])
    # Stored values differ: 40 HU is 1064, 2080 and 1044 on the three slices.
    assert [int(ds.pixel_array[0, 0]) for ds in datasets] == [1064, 2080, 1044]
    volume = load_series(datasets)
    assert np.array_equal(volume.hu[0], volume.hu[1])
    assert np.array_equal(volume.hu[0], volume.hu[2])
    assert float(volume.hu[2, 6, 6]) == 400.0


def test_load_series_missing_rescale_raises() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    del datasets[1].RescaleSlope
    with pytest.raises(PixelDataError, match="has no RescaleSlope; .* does not assume 1 and 0"):
        load_series(datasets)


def test_load_series_padding_minus2000_never_reaches_hu() -> None:
    hu = _tissue_hu(slices=3)
    mask = circle_padding_mask(3, 32, 32)
    datasets = make_ct_datasets(hu, padding_mask=mask, padding_value=TEST_PADDING_STORED, rescale_intercept=0.0)
    volume = load_series(datasets)
    assert np.array_equal(volume.padding_mask, mask)
    assert np.all(volume.hu[mask] == PADDING_HU)
    assert np.array_equal(volume.hu[~mask], hu[~mask].astype(np.float32))


def test_load_series_padding_range_limit_masks_range() -> None:
    # Stored −2000 … −1500 is padding; with intercept 0 that is the same in HU.
    hu = blank_hu(slices=2, value=40.0)
    hu[:, 0, :4] = [-2000.0, -1800.0, -1500.0, -1499.0]
    datasets = make_ct_datasets(hu, rescale_intercept=0.0, padding_value=-2000, padding_range_limit=-1500)
    volume = load_series(datasets)
    assert volume.padding_mask[:, 0, :4].tolist() == [[True, True, True, False]] * 2
    assert float(volume.hu[0, 0, 3]) == -1499.0


def test_load_series_padding_value_read_as_unsigned_reinterpreted() -> None:
    datasets = make_ct_datasets(
        blank_hu(slices=2), padding_mask=circle_padding_mask(2, 32, 32), padding_value=TEST_PADDING_STORED
    )
    for ds in datasets:
        del ds.PixelPaddingValue
        # −2000 as a 16-bit pattern read as US: 65536 − 2000 = 63536.
        ds.add_new(0x00280120, "US", 63536)
    volume = load_series(datasets)
    assert int(volume.padding_mask.sum()) == int(circle_padding_mask(2, 32, 32).sum())


def test_load_series_unsigned_pixels_padding_zero() -> None:
    # Unsigned 12-bit pixels with intercept −1024: stored 0 is padding, −1024 HU would be air.
    mask = circle_padding_mask(2, 32, 32)
    datasets = make_ct_datasets(
        blank_hu(slices=2), pixel_representation=0, bits_stored=12, padding_mask=mask, padding_value=0
    )
    volume = load_series(datasets)
    assert np.array_equal(volume.padding_mask, mask)
    assert float(volume.hu[0, 16, 16]) == 40.0


def test_load_series_declared_padding_and_minus3024_both_masked() -> None:
    # Declared padding is stored −2000 (HU −2000 with intercept 0); a −3024 HU fill is undeclared.
    hu = blank_hu(slices=2)
    hu[:, 0, 0] = -2000.0
    hu[:, 0, 1] = -3024.0
    hu[:, 0, 2] = -1999.0
    volume = load_series(make_ct_datasets(hu, rescale_intercept=0.0, padding_value=-2000))
    assert volume.padding_mask[0, 0, :3].tolist() == [True, True, False]
    assert float(volume.hu[0, 0, 1]) == PADDING_HU
    assert float(volume.hu[0, 0, 2]) == -1999.0


def test_load_series_undeclared_padding_below_minus2000_masked() -> None:
    hu = blank_hu(slices=2)
    hu[:, 0, 0] = -2048.0
    hu[:, 0, 1] = -1312.0
    volume = load_series(make_ct_datasets(hu))
    assert volume.padding_mask[:, 0, 0].tolist() == [True, True]
    assert volume.padding_mask[:, 0, 1].tolist() == [False, False]
    assert int(volume.padding_mask.sum()) == 2


def test_load_series_dataset_without_file_meta_decoded() -> None:
    hu = _tissue_hu(slices=3)
    datasets = make_ct_datasets(hu)
    for ds in datasets:
        del ds.file_meta
    volume = load_series(datasets)
    assert np.array_equal(volume.hu, hu.astype(np.float32))


def test_load_series_headers_without_pixel_data_sources_unchanged() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    volume = load_series(datasets)
    assert all("PixelData" not in header for header in volume.headers)
    assert all("PixelData" in ds for ds in datasets)
    assert [header.SOPInstanceUID for header in volume.headers] == [ds.SOPInstanceUID for ds in datasets]
    assert str(volume.headers[0].PatientName) == "PHANTOM^CACS"
    volume.headers[0]["PatientName"].value = "CHANGED^NAME"
    assert str(datasets[0].PatientName) == "PHANTOM^CACS"


# --- transfer syntaxes ----------------------------------------------------------


@pytest.mark.parametrize(
    "transfer_syntax",
    [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless],
    ids=["implicit", "deflated", "rle", "jpeg-ls", "jpeg2000"],
)
def test_load_series_lossless_syntax_same_hu_as_uncompressed(tmp_path: Path, transfer_syntax: str) -> None:
    hu = _tissue_hu(slices=3)
    common = {"padding_mask": circle_padding_mask(3, 32, 32), "padding_value": TEST_PADDING_STORED}
    reference = load_series(make_ct_datasets(hu, **common))
    write_ct_series(make_ct_datasets(hu, transfer_syntax=transfer_syntax, **common), tmp_path)
    assert pydicom.dcmread(next(tmp_path.iterdir())).file_meta.TransferSyntaxUID == transfer_syntax
    compressed = load_series(tmp_path)
    assert compressed.hu.tobytes() == reference.hu.tobytes()
    assert np.array_equal(compressed.padding_mask, reference.padding_mask)


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmcjpeg (DCMTK) is not installed")
@pytest.mark.parametrize(("option", "syntax"), [("+e1", "1.2.840.10008.1.2.4.70"), ("+el", "1.2.840.10008.1.2.4.57")])
def test_load_series_jpeg_lossless_same_hu_as_uncompressed(tmp_path: Path, option: str, syntax: str) -> None:
    hu = _tissue_hu(slices=2)
    reference = load_series(make_ct_datasets(hu))
    paths = write_ct_series(make_ct_datasets(hu), tmp_path / "native")
    (tmp_path / "jpeg").mkdir()
    for path in paths:
        subprocess.run(["dcmcjpeg", option, str(path), str(tmp_path / "jpeg" / path.name)], check=True)
    assert pydicom.dcmread(next((tmp_path / "jpeg").iterdir())).file_meta.TransferSyntaxUID == syntax
    assert load_series(tmp_path / "jpeg").hu.tobytes() == reference.hu.tobytes()


def test_load_series_lossy_jpeg2000_rejected() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=2), transfer_syntax=JPEG2000, compression_options={"j2k_cr": [20]})
    with pytest.raises(PixelDataError, match="LossyImageCompression 01 .* send the original uncompressed"):
        load_series(datasets)


def test_load_series_lossy_syntax_without_flag_rejected() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=2), transfer_syntax=JPEGLSNearLossless, compression_options={"jls_error": 2})
    for ds in datasets:
        del ds.LossyImageCompression
    with pytest.raises(PixelDataError, match=r"JPEG-LS Lossy \(Near-Lossless\) .* allows lossy compression"):
        load_series(datasets)


def test_load_series_jpeg_baseline_rejected_before_decoding() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=2), transfer_syntax=JPEG2000Lossless)
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    with pytest.raises(PixelDataError, match=r"JPEG Baseline \(Process 1\) \(1.2.840.10008.1.2.4.50\), which allows lossy"):
        load_series(datasets)


# --- Enhanced CT ----------------------------------------------------------------


def test_load_series_enhanced_ct_shuffled_frames_sorted(tmp_path: Path) -> None:
    hu = _tissue_hu(slices=5)
    reference = load_series(make_ct_datasets(hu))
    enhanced = build_enhanced_ct_dataset(
        hu, frame_order=[3, 0, 4, 1, 2], rescale_slope=[1.0, 0.5, 1.0, 0.25, 1.0], rescale_intercept=-1024.0
    )
    write_ct_series([enhanced], tmp_path)
    volume = load_series(tmp_path)
    assert volume.hu.tobytes() == reference.hu.tobytes()
    # Slice k (z = 3k mm) was stored as frame frame_order.index(k) + 1.
    assert volume.frame_numbers == (2, 4, 5, 1, 3)
    assert volume.sop_instance_uids == (enhanced.SOPInstanceUID,) * 5
    assert len(volume.headers) == 1
    assert volume.kvp == 120.0


def test_load_series_legacy_converted_enhanced_ct_read() -> None:
    hu = _tissue_hu(slices=3)
    legacy = build_enhanced_ct_dataset(hu, frame_order=[2, 1, 0])
    legacy.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.2"  # Legacy Converted Enhanced CT Image Storage
    legacy.file_meta.MediaStorageSOPClassUID = legacy.SOPClassUID
    volume = load_series([legacy])
    assert np.array_equal(volume.hu, hu.astype(np.float32))
    assert volume.frame_numbers == (3, 2, 1)


def _legacy_converted(datasets: list[Dataset]) -> Dataset:
    """Convert CT Image Storage datasets with highdicom's Legacy Converted Enhanced CT builder."""
    import highdicom as hd

    return hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )


def test_load_series_legacy_kvp_read() -> None:
    legacy = _legacy_converted(make_ct_datasets(_tissue_hu(slices=3), kvp=120.0))
    # highdicom 0.28 moves KVP into Shared > UnassignedSharedConvertedAttributesSequence.
    assert "KVP" not in legacy
    volume = load_series([legacy])
    assert volume.kvp == 120.0
    assert volume.flags == ()


def test_load_series_legacy_kvp_100_flagged() -> None:
    volume = load_series([_legacy_converted(make_ct_datasets(_tissue_hu(slices=3), kvp=100.0))])
    assert [flag.code for flag in volume.flags] == ["KVP"]
    assert volume.flags[0].message.startswith("acquired at 100 kVp")


def test_load_series_legacy_contrast_rejected() -> None:
    legacy = _legacy_converted(make_ct_datasets(_tissue_hu(slices=3)))
    unassigned = legacy.SharedFunctionalGroupsSequence[0].UnassignedSharedConvertedAttributesSequence[0]
    unassigned.ContrastBolusAgent = "Iopromide 370"
    with pytest.raises(ProtocolRefusedError, match=r"contrast agent recorded \(ContrastBolusAgent 'Iopromide 370'\)"):
        load_series([legacy])


def test_load_series_enhanced_frame_kvp_differs_flagged() -> None:
    enhanced = build_enhanced_ct_dataset(_tissue_hu(slices=3))
    enhanced.SharedFunctionalGroupsSequence[0].CTXRayDetailsSequence[0].KVP = 120
    details = Dataset()
    details.KVP = 100
    enhanced.PerFrameFunctionalGroupsSequence[2].CTXRayDetailsSequence = DicomSequence([details])
    volume = load_series([enhanced])
    assert [flag.code for flag in volume.flags] == ["KVP"]
    assert "kVp differs between slices (100, 120)" in volume.flags[0].message


def test_load_series_legacy_body_part_flagged() -> None:
    legacy = _legacy_converted(make_ct_datasets(_tissue_hu(slices=3), body_part_examined=None))
    unassigned = legacy.SharedFunctionalGroupsSequence[0].UnassignedSharedConvertedAttributesSequence[0]
    unassigned.BodyPartExamined = "ABDOMEN"
    volume = load_series([legacy])
    assert [flag.code for flag in volume.flags] == ["BODY_PART"]
    assert volume.flags[0].message == "BodyPartExamined is ABDOMEN; calcium scoring expects CHEST or HEART"


def test_load_series_single_frame_enhanced_class_raises() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    datasets[1].SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    datasets[1].file_meta.MediaStorageSOPClassUID = datasets[1].SOPClassUID
    with pytest.raises(
        DamagedInstanceError,
        match=rf"instance {datasets[1].SOPInstanceUID} has SOP class Enhanced CT Image Storage but no "
        r"PerFrameFunctionalGroupsSequence \(NumberOfFrames missing\)",
    ):
        load_series(datasets)


def test_load_series_enhanced_ct_mass_factor_in_functional_group() -> None:
    enhanced = build_enhanced_ct_dataset(_tissue_hu(slices=3))
    exposure = Dataset()
    exposure.CalciumScoringMassFactorDevice = [0.75, 0.75, 0.75]  # 0.75 is exact in float32
    enhanced.SharedFunctionalGroupsSequence[0].CTExposureSequence = DicomSequence([exposure])
    assert load_series([enhanced]).mass_calibration_factor == 0.75


def test_load_series_enhanced_ct_missing_rescale_names_frame() -> None:
    enhanced = build_enhanced_ct_dataset(_tissue_hu(slices=3))
    del enhanced.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence
    with pytest.raises(PixelDataError, match="frame 2 has no RescaleSlope and no RescaleIntercept"):
        load_series([enhanced])


# --- protocol flags -------------------------------------------------------------


def test_load_series_conforming_series_no_flags() -> None:
    volume = load_series(make_ct_datasets(_tissue_hu(slices=3)))
    assert volume.flags == ()
    assert volume.kvp == 120.0
    assert volume.slice_thickness == 3.0
    assert volume.mass_calibration_factor is None


def test_load_series_protocol_deviations_flagged() -> None:
    datasets = make_ct_datasets(
        _tissue_hu(slices=3), kvp=100.0, slice_thickness=5.0, slice_increment=5.0, body_part_examined="ABDOMEN"
    )
    volume = load_series(datasets)
    assert [flag.code for flag in volume.flags] == ["KVP", "SLICE_THICKNESS", "SLICE_INCREMENT", "BODY_PART"]
    assert "100 kVp" in volume.flags[0].message


def test_load_series_kvp_differs_between_slices_flagged() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    datasets[2].KVP = "100"
    volume = load_series(datasets)
    assert [flag.code for flag in volume.flags] == ["KVP"]
    assert "kVp differs between slices (100, 120)" in volume.flags[0].message


def test_load_series_kvp_refuse_policy_raises() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3), kvp=140.0)
    with pytest.raises(ProtocolRefusedError, match="acquired at 140 kVp"):
        load_series(datasets, ProtocolPolicy(kvp="refuse"))


def test_load_series_contrast_agent_rejected_by_default() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3), contrast_bolus_agent="Iomeprol 400")
    with pytest.raises(ProtocolRefusedError, match="contrast agent recorded \\(ContrastBolusAgent 'Iomeprol 400'\\)"):
        load_series(datasets)
    flagged = load_series(datasets, ProtocolPolicy(contrast="flag"))
    assert [flag.code for flag in flagged.flags] == ["CONTRAST"]


def test_load_series_contrast_with_gap_rejected_for_contrast() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=5), contrast_bolus_agent="Iomeprol 400")
    del datasets[2]  # a 6 mm gap between z = 3 and z = 9
    # Re-sending would not cure a contrast scan, so contrast is reported, not the gap.
    with pytest.raises(
        ProtocolRefusedError,
        match=r"is not a calcium-scoring acquisition: contrast agent recorded \(ContrastBolusAgent 'Iomeprol 400'\); "
        r"calcium scoring needs a non-contrast scan\. Send a non-contrast",
    ):
        load_series(datasets)
    with pytest.raises(SliceSpacingError, match="6.000 mm apart"):
        load_series(datasets, ProtocolPolicy(contrast="flag"))


def test_load_series_contrast_agent_none_text_not_flagged() -> None:
    volume = load_series(make_ct_datasets(_tissue_hu(slices=3), contrast_bolus_agent="NONE"))
    assert volume.flags == ()


def _sphere_hu(radius_mm: float, value: float, noise_hu: float = 0.0) -> np.ndarray:
    """40 HU slices of 1 mm pixels, 3 mm apart, with a sphere of `value` HU at the centre and Gaussian noise."""
    slices, side = 31, 100
    z, y, x = np.meshgrid(
        (np.arange(slices) - slices // 2) * 3.0, np.arange(side) - side / 2, np.arange(side) - side / 2, indexing="ij"
    )
    noise = np.random.default_rng(0).normal(0.0, noise_hu, z.shape) if noise_hu else 0.0
    return np.where(z**2 + y**2 + x**2 <= radius_mm**2, value, 40.0) + noise


def test_contrast_evidence_survives_noise() -> None:
    # A weak enhancement (260 HU) with low-dose noise: 9 % of the voxels fall below 180 HU.
    hu = _sphere_hu(30.0, 260.0, noise_hu=60.0)
    assert np.mean(hu[15, 40:60, 40:60] < 180.0) > 0.05
    evidence = image_contrast_evidence(hu, (3.0, 1.0, 1.0))
    assert evidence is not None
    assert "(median 260 HU) around slice 16 of 31" in evidence


@pytest.mark.parametrize(
    ("radius_mm", "value", "expected"),
    [
        (30.0, 450.0, "a 59 mm wide region of 180–700 HU (median 450 HU) around slice 16 of 31 in position order"),
        (14.0, 450.0, None),  # as thick as a vertebral body
        (30.0, 1200.0, None),  # cortical bone, dense calcium or metal
        (30.0, 120.0, None),  # soft tissue above unenhanced blood but below the range
    ],
)
def test_contrast_evidence_needs_thick_region(
    radius_mm: float, value: float, expected: str | None
) -> None:
    evidence = image_contrast_evidence(_sphere_hu(radius_mm, value), (3.0, 1.0, 1.0))
    if expected is None:
        assert evidence is None
    else:
        assert evidence is not None
        assert evidence.startswith(f"the images show {expected}, as blood enhanced")


def test_cta_without_agent_refused(chest_cta_hu: np.ndarray) -> None:
    # A real CT angiogram whose header records no contrast agent (the builder writes none).
    datasets = make_ct_datasets(chest_cta_hu, pixel_spacing=(1.5, 1.5), origin=(0.0, 0.0, 540.0))
    assert "ContrastBolusAgent" not in datasets[0]
    message = (
        "the images show a 48 mm wide region of 180–700 HU (median 488 HU) around slice 42 of 82 in position "
        "order, as blood enhanced by contrast agent; the header records no agent; calcium scoring needs a "
        "non-contrast scan"
    )
    with pytest.raises(ProtocolRefusedError, match=re.escape(message)):
        load_series(datasets)
    flagged = load_series(datasets, ProtocolPolicy(contrast="flag"))
    assert [(flag.code, flag.message) for flag in flagged.flags] == [("CONTRAST", message)]


def test_load_series_body_part_missing_not_flagged() -> None:
    volume = load_series(make_ct_datasets(_tissue_hu(slices=3), body_part_examined=None))
    assert volume.flags == ()


def test_load_series_mass_factor_read_from_device_attribute() -> None:
    volume = load_series(make_ct_datasets(_tissue_hu(slices=3), mass_calibration_factor=0.81))
    # FL is float32: 0.81 is stored as 0.8100000023841858.
    assert volume.mass_calibration_factor == pytest.approx(0.81, abs=1e-6)


def test_load_series_invalid_policy_value_raises() -> None:
    with pytest.raises(ValueError, match="ProtocolPolicy.kvp is 'ignore'; expected 'flag' or 'refuse'"):
        load_series(make_ct_datasets(_tissue_hu(slices=3)), ProtocolPolicy(kvp="ignore"))  # type: ignore[arg-type]


def test_load_series_no_series_uid_raises_after_checks() -> None:
    datasets = make_ct_datasets(_tissue_hu(slices=3))
    for ds in datasets:
        del ds.SeriesInstanceUID
    with pytest.raises(MissingUIDError, match=r"has no SeriesInstanceUID and 0 images without SOPInstanceUID"):
        load_series(datasets)


# --- real scans -------------------------------------------------------------------


def test_load_series_qrm_scan_padding_masked(qrm_dicom_dir: Path) -> None:
    volume = load_series(qrm_dicom_dir)
    assert volume.shape == (47, 512, 512)
    assert volume.slice_increment == pytest.approx(3.0, abs=1e-4)
    assert volume.slice_thickness == 3.0
    assert volume.kvp == 120.0
    assert volume.flags == ()
    assert volume.pixel_spacing == (0.488, 0.488)
    # 2 933 337 voxels are stored as −2048 (counted with numpy over the 47 files).
    # The scan declares no PixelPaddingValue, so the HU ≤ −2000 rule masks them.
    assert int(volume.padding_mask.sum()) == 2_933_337
    assert float(volume.hu[~volume.padding_mask].min()) == -1312.0
    assert float(volume.hu.max()) == 1275.0
    assert len(set(volume.sop_instance_uids)) == 47
    # The lowest ImagePositionPatient z is 534.875 mm (InstanceNumber 47); 46 steps of 3 mm reach 672.875.
    assert volume.positions[0, 2] == 534.875
    assert volume.positions[-1, 2] == 672.875


def test_load_series_abdomen_decoded_then_rejected_for_contrast(abdomen_dicom_dir: Path) -> None:
    with pytest.raises(ProtocolRefusedError, match="ContrastBolusAgent 'APPLIED'"):
        load_series(abdomen_dicom_dir)
    # With contrast only flagged, the JPEG 2000 slices decode and the missing UIDs stop the load.
    with pytest.raises(MissingUIDError, match=r"\(20 images, .*\) has no SeriesInstanceUID and 20 images without"):
        load_series(abdomen_dicom_dir, ProtocolPolicy(contrast="flag"))
