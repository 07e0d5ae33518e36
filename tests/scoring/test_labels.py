"""Tests of reading and writing label maps: NRRD/NIfTI geometry and DICOM SEG segments and frames."""

from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from scoring.errors import LabelError
from scoring.labels import read_label_map, write_label_map
from scoring.result import LAD, LCX, OTHER_CALCIUM, RCA
from scoring.volume import CTVolume
from tests.factories import blank_hu, make_ct_datasets

SLICES, ROWS, COLUMNS = 4, 16, 20


def volume_from_datasets(datasets) -> CTVolume:
    """Build a CTVolume from single-frame CT datasets, sorted along the slice normal."""
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_direction, column_direction = orientation[:3], orientation[3:]
    slice_direction = np.cross(row_direction, column_direction)
    ordered = sorted(datasets, key=lambda ds: float(np.dot(ds.ImagePositionPatient, slice_direction)))
    positions = np.array([ds.ImagePositionPatient for ds in ordered], dtype=np.float64)
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ordered])
    increment = float(np.linalg.norm(positions[1] - positions[0])) if len(positions) > 1 else 3.0
    return CTVolume(
        hu=hu.astype(np.float32),
        padding_mask=np.zeros(hu.shape, dtype=bool),
        origin=positions[0],
        row_direction=row_direction,
        column_direction=column_direction,
        slice_direction=slice_direction,
        pixel_spacing=(float(ordered[0].PixelSpacing[0]), float(ordered[0].PixelSpacing[1])),
        slice_increment=increment,
        slice_thickness=3.0,
        kvp=120.0,
        positions=positions,
        series_instance_uid=ordered[0].SeriesInstanceUID,
        study_instance_uid=ordered[0].StudyInstanceUID,
        frame_of_reference_uid=ordered[0].FrameOfReferenceUID,
        sop_class_uid=ordered[0].SOPClassUID,
        sop_instance_uids=tuple(ds.SOPInstanceUID for ds in ordered),
        headers=tuple(ordered),
    )


def series(orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), pixel_spacing=(0.5, 0.7), origin=(-12.0, 30.0, 100.0)):
    """Return the CT datasets and volume of a small series with the given geometry."""
    datasets = make_ct_datasets(
        blank_hu(SLICES, ROWS, COLUMNS),
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        origin=origin,
        slice_increment=3.0,
        uid_seed="test-labels",
    )
    return datasets, volume_from_datasets(datasets)


def sample_labels() -> np.ndarray:
    """Return an asymmetric label map, so any flip or transpose changes it."""
    labels = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    labels[0, 1:3, 2:5] = LAD
    labels[1, 5, 7:9] = LCX
    labels[3, 10:14, 15] = RCA
    labels[2, 0, 0] = OTHER_CALCIUM
    return labels


@pytest.mark.parametrize("name", ["labels.nrrd", "labels.nii.gz"])
def test_label_map_round_trip_is_identical(tmp_path: Path, name: str) -> None:
    _, volume = series()
    labels = sample_labels()

    written = write_label_map(tmp_path / name, labels, volume)
    loaded = read_label_map(written, volume)

    assert loaded.dtype == np.uint8
    assert np.array_equal(loaded, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_label_map_written_geometry_matches_series(tmp_path: Path) -> None:
    _, volume = series()

    write_label_map(tmp_path / "labels.nrrd", sample_labels(), volume)
    image = sitk.ReadImage(str(tmp_path / "labels.nrrd"))

    # x = columns (0.7 mm), y = rows (0.5 mm), z = slices (3 mm increment).
    assert image.GetSize() == (COLUMNS, ROWS, SLICES)
    assert image.GetSpacing() == pytest.approx((0.7, 0.5, 3.0))
    assert image.GetOrigin() == pytest.approx((-12.0, 30.0, 100.0))


def test_label_map_reversed_z_series_round_trip(tmp_path: Path) -> None:
    # Column direction (0, -1, 0) makes the slice normal row × column = (0, 0, -1),
    # so volume order runs towards decreasing z.
    _, volume = series(orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    assert volume.slice_direction.tolist() == [0.0, 0.0, -1.0]
    assert volume.positions[1][2] == volume.positions[0][2] - 3.0
    labels = sample_labels()

    write_label_map(tmp_path / "labels.nrrd", labels, volume)
    loaded = read_label_map(tmp_path / "labels.nrrd", volume)

    assert np.array_equal(loaded, labels)


def test_label_map_stored_with_flipped_z_reorients(tmp_path: Path) -> None:
    _, volume = series()
    labels = sample_labels()
    write_label_map(tmp_path / "labels.nrrd", labels, volume)
    # Flipping the z axis keeps physical positions: origin moves to the last
    # slice and the z direction becomes negative, as a tool sorting slices by
    # decreasing z would store it.
    flipped = sitk.Flip(sitk.ReadImage(str(tmp_path / "labels.nrrd")), [False, False, True])
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nrrd"))
    assert flipped.GetDirection()[8] == -1.0

    loaded = read_label_map(tmp_path / "flipped.nrrd", volume)

    assert np.array_equal(loaded, labels)


def test_label_map_stored_with_permuted_axes_reorients(tmp_path: Path) -> None:
    _, volume = series()
    labels = sample_labels()
    write_label_map(tmp_path / "labels.nrrd", labels, volume)
    permuted = sitk.PermuteAxes(sitk.ReadImage(str(tmp_path / "labels.nrrd")), [2, 0, 1])
    sitk.WriteImage(permuted, str(tmp_path / "permuted.nii.gz"))

    loaded = read_label_map(tmp_path / "permuted.nii.gz", volume)

    assert np.array_equal(loaded, labels)


def test_label_map_shifted_origin_raises(tmp_path: Path) -> None:
    _, volume = series()
    write_label_map(tmp_path / "labels.nrrd", sample_labels(), volume)
    image = sitk.ReadImage(str(tmp_path / "labels.nrrd"))
    image.SetOrigin((-12.0, 31.0, 100.0))
    sitk.WriteImage(image, str(tmp_path / "shifted.nrrd"))

    # Tolerance is a tenth of the smallest voxel edge: 0.1 × 0.5 mm = 0.05 mm; the shift is 1 mm.
    with pytest.raises(LabelError, match=r"1\.000 mm apart, tolerance 0\.050 mm"):
        read_label_map(tmp_path / "shifted.nrrd", volume)


def test_label_map_wrong_size_raises(tmp_path: Path) -> None:
    _, volume = series()
    image = sitk.GetImageFromArray(np.zeros((SLICES, ROWS, COLUMNS + 1), dtype=np.uint8))
    sitk.WriteImage(image, str(tmp_path / "wide.nrrd"))

    with pytest.raises(LabelError, match=r"has \(4, 16, 21\) \(slices, rows, columns\) voxels .* has \(4, 16, 20\)"):
        read_label_map(tmp_path / "wide.nrrd", volume)


def test_label_map_wrong_spacing_raises(tmp_path: Path) -> None:
    _, volume = series()
    write_label_map(tmp_path / "labels.nrrd", sample_labels(), volume)
    image = sitk.ReadImage(str(tmp_path / "labels.nrrd"))
    image.SetSpacing((0.5, 0.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "square.nrrd"))

    with pytest.raises(LabelError, match=r"column spacing 0\.5 mm but series .* has 0\.7 mm"):
        read_label_map(tmp_path / "square.nrrd", volume)


def test_label_map_oblique_direction_raises(tmp_path: Path) -> None:
    _, volume = series()
    write_label_map(tmp_path / "labels.nrrd", sample_labels(), volume)
    image = sitk.ReadImage(str(tmp_path / "labels.nrrd"))
    angle = np.deg2rad(10.0)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "rotated.nrrd"))

    with pytest.raises(LabelError, match="no axis runs along the series' row direction"):
        read_label_map(tmp_path / "rotated.nrrd", volume)


def test_label_map_missing_file_raises(tmp_path: Path) -> None:
    _, volume = series()

    with pytest.raises(LabelError, match="missing.nrrd not found"):
        read_label_map(tmp_path / "missing.nrrd", volume)


def test_label_map_unknown_suffix_raises(tmp_path: Path) -> None:
    _, volume = series()
    (tmp_path / "labels.png").write_bytes(b"not an image")

    with pytest.raises(LabelError, match="unknown file type"):
        read_label_map(tmp_path / "labels.png", volume)


def test_write_label_map_shape_mismatch_raises(tmp_path: Path) -> None:
    _, volume = series()

    with pytest.raises(LabelError, match=r"shape \(4, 16, 19\) for series .* of shape \(4, 16, 20\)"):
        write_label_map(tmp_path / "labels.nrrd", np.zeros((4, 16, 19), dtype=np.uint8), volume)


# DICOM SEG


def artery_segment(number: int, label: str, region) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.CalcifiedAtheromatousPlaque,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        anatomic_regions=[region] if region is not None else None,
    )


def write_seg(path: Path, datasets, volume: CTVolume, masks: np.ndarray, descriptions) -> Path:
    """Write a BINARY SEG whose frames reference `datasets` (given in volume order)."""
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    source_images = [by_uid[uid] for uid in volume.sop_instance_uids]
    segmentation = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="cacs-node tests",
        manufacturer_model_name="test_labels",
        software_versions="1",
        device_serial_number="1",
    )
    segmentation.save_as(path)
    return path


def test_read_seg_maps_segments_by_anatomic_region(tmp_path: Path) -> None:
    datasets, volume = series()
    masks = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    masks[0, 1:3, 2:5] = 1
    masks[1, 5, 7:9] = 2
    masks[3, 10:14, 15] = 3
    masks[2, 4, 4] = 4
    descriptions = [
        artery_segment(1, "Calcium 1", codes.SCT.LeftAnteriorDescendingCoronaryArtery),
        artery_segment(2, "Calcium 2", codes.SCT.CircumflexCoronaryArtery),
        artery_segment(3, "Calcium 3", codes.SCT.RightCoronaryArtery),
        artery_segment(4, "Calcium 4", codes.SCT.LeftMainCoronaryArtery),
    ]
    random.Random(3).shuffle(datasets)
    write_seg(tmp_path / "seg.dcm", datasets, volume, masks, descriptions)

    labels = read_label_map(tmp_path / "seg.dcm", volume)

    expected = np.zeros_like(masks)
    expected[masks == 1] = LAD
    expected[masks == 2] = LCX
    expected[masks == 3] = RCA
    expected[masks == 4] = LAD  # left main belongs to the LAD
    assert np.array_equal(labels, expected)


def test_read_seg_maps_segments_by_label_text(tmp_path: Path) -> None:
    datasets, volume = series()
    masks = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    masks[2, 3:5, 3:5] = 1
    masks[2, 8:10, 8:10] = 2
    descriptions = [artery_segment(1, "RCA calcium", None), artery_segment(2, "Circumflex", None)]
    write_seg(tmp_path / "seg.dcm", datasets, volume, masks, descriptions)

    labels = read_label_map(tmp_path / "seg.dcm", volume)

    assert np.count_nonzero(labels == RCA) == 4
    assert np.count_nonzero(labels == LCX) == 4
    assert labels[2, 3, 3] == RCA
    assert labels[2, 8, 8] == LCX


def test_read_seg_frames_by_position_without_references(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    datasets, volume = series()
    masks = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    masks[3, 2:4, 6] = 1
    descriptions = [artery_segment(1, "LAD", codes.SCT.LeftAnteriorDescendingCoronaryArtery)]
    path = write_seg(tmp_path / "seg.dcm", datasets, volume, masks, descriptions)
    seg = hd.seg.segread(path)
    for group in seg.PerFrameFunctionalGroupsSequence:
        del group.DerivationImageSequence
    seg.save_as(path)

    with caplog.at_level("INFO", logger="scoring.labels"):
        labels = read_label_map(path, volume)

    assert "matching by plane position" in caplog.text
    assert np.count_nonzero(labels) == 2
    assert labels[3, 2, 6] == LAD
    assert labels[3, 3, 6] == LAD


def test_read_seg_other_series_raises(tmp_path: Path) -> None:
    datasets, volume = series()
    other_volume = volume_from_datasets(make_ct_datasets(blank_hu(SLICES, ROWS, COLUMNS), pixel_spacing=(0.5, 0.7)))
    masks = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    masks[0, 0, 0] = 1
    descriptions = [artery_segment(1, "LAD", codes.SCT.LeftAnteriorDescendingCoronaryArtery)]
    write_seg(tmp_path / "seg.dcm", datasets, volume, masks, descriptions)

    with pytest.raises(LabelError, match="FrameOfReferenceUID"):
        read_label_map(tmp_path / "seg.dcm", other_volume)


def test_read_seg_unknown_segment_raises(tmp_path: Path) -> None:
    datasets, volume = series()
    masks = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    masks[0, 0, 0] = 1
    descriptions = [artery_segment(1, "Liver", codes.SCT.Liver)]
    write_seg(tmp_path / "seg.dcm", datasets, volume, masks, descriptions)

    with pytest.raises(LabelError, match=r"segment 1 \('Liver'\) names no coronary artery"):
        read_label_map(tmp_path / "seg.dcm", volume)


def test_read_dicom_that_is_not_seg_raises(tmp_path: Path) -> None:
    datasets, volume = series()
    datasets[0].save_as(tmp_path / "ct.dcm", enforce_file_format=True)

    with pytest.raises(LabelError, match=r"has SOP Class 1\.2\.840\.10008\.5\.1\.4\.1\.1\.2, but a DICOM SEG"):
        read_label_map(tmp_path / "ct.dcm", volume)


def test_read_seg_overlapping_arteries_raise(tmp_path: Path) -> None:
    datasets, volume = series()
    masks = np.zeros((SLICES, ROWS, COLUMNS, 2), dtype=np.uint8)
    masks[1, 4:6, 4:6, 0] = 1
    masks[1, 5:7, 5:7, 1] = 1
    descriptions = [
        artery_segment(1, "LAD", codes.SCT.LeftAnteriorDescendingCoronaryArtery),
        artery_segment(2, "RCA", codes.SCT.RightCoronaryArtery),
    ]
    write_seg(tmp_path / "seg.dcm", datasets, volume, masks, descriptions)

    # The 2 × 2 squares share the single pixel (row 5, column 5).
    with pytest.raises(LabelError, match="segment 2 overlaps another artery's segment in 1 voxels"):
        read_label_map(tmp_path / "seg.dcm", volume)


def test_read_seg_aortic_valve_segment_is_other_calcium(tmp_path: Path) -> None:
    datasets, volume = series()
    masks = np.zeros((SLICES, ROWS, COLUMNS), dtype=np.uint8)
    masks[1, 2:4, 2:4] = 1
    masks[2, 6:8, 6:8] = 2
    descriptions = [
        artery_segment(1, "Valve calcium", codes.SCT.AorticValve),
        artery_segment(2, "Other calcium", None),
    ]
    write_seg(tmp_path / "seg.dcm", datasets, volume, masks, descriptions)

    labels = read_label_map(tmp_path / "seg.dcm", volume)

    assert np.count_nonzero(labels == OTHER_CALCIUM) == 8
    assert labels[1, 2, 2] == OTHER_CALCIUM
    assert labels[2, 7, 7] == OTHER_CALCIUM


def test_read_seg_of_enhanced_ct_maps_source_frames(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from scoring.ct_builder import build_enhanced_ct_dataset
    from scoring.series import load_series

    # Frame 1 holds slice 2, frame 2 slice 0, frame 3 slice 3, frame 4 slice 1.
    frame_order = [2, 0, 3, 1]
    enhanced = build_enhanced_ct_dataset(
        blank_hu(SLICES, ROWS, COLUMNS), frame_order=frame_order, pixel_spacing=(0.5, 0.7), uid_seed="enhanced"
    )
    volume = load_series([enhanced])
    assert volume.frame_numbers == (2, 4, 1, 3)
    expected = np.zeros(volume.shape, dtype=np.uint8)
    expected[0, 1:3, 2:5] = LAD
    expected[3, 10:12, 4] = LAD
    segmentation = hd.seg.Segmentation(
        source_images=[enhanced],
        pixel_array=(expected[frame_order] > 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[artery_segment(1, "LAD", codes.SCT.LeftAnteriorDescendingCoronaryArtery)],
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="cacs-node tests",
        manufacturer_model_name="test_labels",
        software_versions="1",
        device_serial_number="1",
    )
    segmentation.save_as(tmp_path / "seg.dcm")

    with caplog.at_level("INFO", logger="scoring.labels"):
        labels = read_label_map(tmp_path / "seg.dcm", volume)

    assert "matching by plane position" not in caplog.text
    assert np.array_equal(labels, expected)


def test_label_map_folder_raises(tmp_path: Path) -> None:
    _, volume = series()

    with pytest.raises(LabelError, match="is a folder. Give the NRRD, NIfTI or DICOM SEG file itself"):
        read_label_map(tmp_path, volume)
