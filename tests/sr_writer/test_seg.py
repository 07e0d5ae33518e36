"""Tests of the calcium and region SEG: frame placement, segments, codes and validity."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from scoring.config import ScoringParameters
from scoring.errors import LabelError
from scoring.labels import read_label_map
from scoring.result import LAD, LCX, RCA
from sr_writer import AlgorithmIdentification, build_region_seg, build_seg
from sr_writer.seg import ARTERY_COLORS, scored_labels, segment_numbers
from tests.dicom_validation import assert_dciodvfy_clean
from tests.sr_writer.synthetic_ct import TEST_UID_ROOT, Lesion, make_case

ALGORITHM = AlgorithmIdentification(name="cacs-node", version="1.0.0", model_version="unet-test-3")
SERIAL = "node-test-1"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _build(case, **overrides):
    return build_seg(
        case.volume,
        case.labels,
        case.result,
        algorithm=ALGORITHM,
        uid_root=TEST_UID_ROOT,
        device_serial_number=SERIAL,
        **overrides,
    )


def _save(dataset, folder: Path) -> Path:
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _frame_segment(seg, frame) -> int:
    identification = frame.get("SegmentIdentificationSequence") or seg.SharedFunctionalGroupsSequence[
        0
    ].SegmentIdentificationSequence
    return int(identification[0].ReferencedSegmentNumber)


def test_build_seg_reversed_file_order(tmp_path):
    case = make_case(reverse_file_order=True, pixel_spacing=(0.4, 0.7))
    # The file order runs from z = 121 down to z = 100; load_series sorts to volume order.
    assert [float(ds.ImagePositionPatient[2]) for ds in case.datasets[:2]] == [121.0, 118.0]

    seg = _build(case)
    path = _save(seg, tmp_path)

    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == case.volume.frame_of_reference_uid
    # PixelSpacing keeps the source's (row, column) order, not (x, y).
    pixel_measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(value) for value in pixel_measures.PixelSpacing] == [0.4, 0.7]

    # Expected frames, empty ones omitted: LAD on slices 2 and 3, LCX on 4, RCA on 5.
    expected = {(1, 2), (1, 3), (2, 4), (3, 5)}
    assert int(seg.NumberOfFrames) == len(expected)
    found = set()
    header_by_uid = {ds.SOPInstanceUID: ds for ds in case.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        slice_index = case.volume.sop_instance_uids.index(source_uid)
        found.add((_frame_segment(seg, frame), slice_index))
        position = [float(value) for value in frame.PlanePositionSequence[0].ImagePositionPatient]
        source_position = [float(value) for value in header_by_uid[source_uid].ImagePositionPatient]
        assert position == pytest.approx(source_position, abs=1e-4)
    assert found == expected

    referenced = {
        item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == set(case.volume.sop_instance_uids)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == case.volume.series_instance_uid
    assert_dciodvfy_clean(path)


def test_build_seg_pixels_match_scored_calcium(tmp_path):
    case = make_case(reverse_file_order=True)
    seg = _build(case)
    path = _save(seg, tmp_path)

    # highdicom reads the file back and rebuilds each segment's mask in source order.
    read_back = hd.seg.segread(path)
    for artery, number in segment_numbers(seg).items():
        mask = read_back.get_pixels_by_source_instance(
            source_sop_instance_uids=list(case.volume.sop_instance_uids),
            segment_numbers=[number],
            ignore_spatial_locations=True,
            skip_overlap_checks=True,
        )[..., 0]
        expected = case.labels == {"LAD": LAD, "LCX": LCX, "RCA": RCA}[artery]
        assert np.array_equal(mask.astype(bool), expected), artery

    # The project's own SEG reader maps the segments back to the label values.
    assert np.array_equal(read_label_map(path, case.volume), case.labels)


def test_build_seg_segments_codes_and_colours():
    case = make_case()
    seg = _build(case)

    assert segment_numbers(seg) == {"LAD": 1, "LCX": 2, "RCA": 3}
    lad = seg.SegmentSequence[0]
    assert lad.SegmentLabel == "LAD calcium"
    assert lad.SegmentAlgorithmType == "AUTOMATIC"
    assert lad.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert lad.SegmentedPropertyTypeCodeSequence[0].CodeValue == "18115005"
    # LAD label includes the left main: anatomic regions LAD (59438005) and LM (3227004).
    assert [item.CodeValue for item in lad.AnatomicRegionSequence] == ["59438005", "3227004"]
    assert seg.SegmentSequence[1].AnatomicRegionSequence[0].CodeValue == "57396003"
    assert seg.SegmentSequence[2].AnatomicRegionSequence[0].CodeValue == "13647002"

    algorithm = lad.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "cacs-node"
    assert algorithm.AlgorithmVersion == "1.0.0"
    assert algorithm.AlgorithmParameters == "model_version=unet-test-3"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodingSchemeDesignator == "DCM"

    colours = [
        hd.color.CIELabColor(*(value / 65535 * scale - offset for value, scale, offset in zip(
            item.RecommendedDisplayCIELabValue, (100, 255, 255), (0, 128, 128)
        ))).to_rgb()
        for item in seg.SegmentSequence
    ]
    assert len(set(colours)) == 3
    for colour, artery in zip(colours, ("LAD", "LCX", "RCA")):
        assert colour == pytest.approx(ARTERY_COLORS[artery], abs=3)


def test_build_seg_only_rca_single_segment(tmp_path):
    case = make_case((Lesion("RCA", slice_index=3, row=12, column=12),))
    seg = _build(case)
    path = _save(seg, tmp_path)

    assert segment_numbers(seg) == {"RCA": 1}
    assert int(seg.NumberOfFrames) == 1
    assert seg.SegmentSequence[0].AnatomicRegionSequence[0].CodeValue == "13647002"
    assert_dciodvfy_clean(path)


def test_build_seg_zero_calcium_returns_none():
    case = make_case(())
    assert case.result.agatston["total"] == 0.0
    assert _build(case) is None


def test_build_seg_other_calcium_never_written():
    case = make_case(other_calcium=True)
    seg = _build(case)

    assert segment_numbers(seg) == {"LAD": 1, "LCX": 2, "RCA": 3}
    # The OTHER_CALCIUM block sits on slice 1, which has no coronary calcium.
    sources = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert case.volume.sop_instance_uids[1] not in sources


def test_build_seg_empty_slice_thickness_valid(tmp_path):
    case = make_case(slice_thickness=None, study_id="")
    assert case.datasets[0].SliceThickness in ("", None)
    seg = _build(case)
    path = _save(seg, tmp_path)

    # The measured 3.0 mm increment replaces the missing nominal thickness.
    pixel_measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(pixel_measures.SliceThickness) == 3.0
    assert seg.StudyID == ""
    warnings = assert_dciodvfy_clean(path)
    assert any("Study ID" in line for line in warnings)


def test_build_seg_enhanced_ct_references_frames(tmp_path):
    case = make_case(enhanced=True)
    # Frames are stored in reverse: slice 0 is frame 8, slice 7 is frame 1.
    assert case.volume.frame_numbers == (8, 7, 6, 5, 4, 3, 2, 1)
    seg = _build(case)
    path = _save(seg, tmp_path)

    expected = {(1, 6), (1, 5), (2, 4), (3, 3)}  # (segment, source frame) from slices 2, 3, 4, 5
    found = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == case.volume.sop_instance_uids[0]
        found.add((_frame_segment(seg, frame), int(source.ReferencedFrameNumber)))
        slice_index = case.volume.frame_numbers.index(int(source.ReferencedFrameNumber))
        position = [float(value) for value in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx(list(case.volume.positions[slice_index]), abs=1e-4)
    assert found == expected
    assert_dciodvfy_clean(path)


def test_build_seg_label_shape_mismatch_raises():
    case = make_case()
    with pytest.raises(LabelError, match=r"has shape \(7, 40, 36\); expected \(8, 40, 36\)"):
        build_seg(
            case.volume,
            case.labels[1:],
            case.result,
            algorithm=ALGORITHM,
            uid_root=TEST_UID_ROOT,
            device_serial_number=SERIAL,
        )


def test_build_seg_label_value_invalid_raises():
    case = make_case()
    labels = case.labels.copy()
    labels[0, 0, 0] = 9
    with pytest.raises(LabelError, match=r"contains values \[9\]; expected only 0 to 4"):
        build_seg(
            case.volume, labels, case.result, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL
        )


def test_build_seg_result_without_labelled_voxels_raises():
    case = make_case()
    labels = case.labels.copy()
    labels[labels == RCA] = 0
    with pytest.raises(LabelError, match="gives RCA calcium but the label volume has no scored RCA voxel"):
        build_seg(
            case.volume, labels, case.result, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL
        )


def test_build_seg_lesion_below_minimum_area_left_out():
    case = make_case(
        (
            Lesion("LAD", slice_index=2, row=10, column=8, size=1),
            Lesion("LCX", slice_index=4, row=25, column=20),
            Lesion("LCX", slice_index=5, row=5, column=5, size=1),
        )
    )
    # A 1-pixel lesion covers 0.28 mm², below the 1 mm² minimum area, so the
    # LAD scores zero and the second LCX lesion adds nothing.
    assert case.result.agatston["LAD"] == 0.0
    scored = scored_labels(case.volume, case.labels, case.result)
    assert np.count_nonzero(scored == LAD) == 0
    assert np.count_nonzero(scored == LCX) == 25

    seg = _build(case)
    assert segment_numbers(seg) == {"LCX": 1}
    assert int(seg.NumberOfFrames) == 1
    # 25 voxels × 0.28 mm² × 3 mm = 21.0 mm³, the LCX volume score.
    assert 25 * case.volume.voxel_volume_mm3 == pytest.approx(case.result.volume_mm3["LCX"])


def test_build_seg_labels_not_scored_logs_warning(caplog):
    case = make_case()
    labels = case.labels.copy()
    labels[6, 30:35, 20:25] = LAD
    case.volume.hu[6, 30:35, 20:25] = 400.0
    seg = build_seg(
        case.volume, labels, case.result, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL
    )

    assert seg is not None
    # The extra 25 LAD voxels add 25 × 0.84 mm³ = 21.0 mm³ to the scored 28.56 mm³.
    assert "LAD segment covers 49.560 mm³ but the volume score is 28.560 mm³" in caplog.text


def test_build_seg_parameters_other_threshold_raises():
    case = make_case()
    with pytest.raises(ValueError, match="scoring parameters have threshold 100 HU but the result was scored at 130 HU"):
        build_seg(
            case.volume,
            case.labels,
            case.result,
            algorithm=ALGORITHM,
            uid_root=TEST_UID_ROOT,
            device_serial_number=SERIAL,
            parameters=ScoringParameters(threshold_hu=100.0),
        )


def test_build_seg_invalid_uid_root_raises():
    case = make_case()
    with pytest.raises(ValueError, match="UID root '1.02.3' is invalid"):
        build_seg(case.volume, case.labels, case.result, algorithm=ALGORITHM, uid_root="1.02.3", device_serial_number=SERIAL)


def test_build_region_seg_one_segment_per_region(tmp_path):
    case = make_case()
    regions = np.zeros(case.volume.shape, dtype=np.uint8)
    regions[2:5, 8:20, 6:16] = 1
    regions[6, 30:36, 2:12] = 3
    seg = build_region_seg(
        case.volume, regions, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL
    )
    path = _save(seg, tmp_path)

    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["LAD region", "RCA region"]
    assert seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "13647002"
    # LAD region on slices 2, 3 and 4, RCA region on slice 6.
    assert int(seg.NumberOfFrames) == 4
    assert seg.SeriesNumber == 702
    assert seg.SeriesDescription == "CAC regions SEG (cacs-node 1.0)"
    assert_dciodvfy_clean(path)
    assert pydicom.dcmread(path).ContentLabel == "REGIONS"
    # Read as a region map it gives the arteries; read as calcium it is refused.
    read_back = read_label_map(path, case.volume)
    assert (int((read_back == LAD).sum()), int((read_back == RCA).sum())) == (360, 60)
    with pytest.raises(LabelError, match="segments anatomy, not calcium: segment 1 \\('LAD region'\\)"):
        read_label_map(path, case.volume, calcium=True)


def test_calcium_seg_reads_as_calcium(tmp_path):
    case = make_case()
    path = _save(_build(case), tmp_path)
    assert np.array_equal(read_label_map(path, case.volume, calcium=True), read_label_map(path, case.volume))


def test_build_region_seg_empty_returns_none():
    case = make_case()
    regions = np.zeros(case.volume.shape, dtype=np.uint8)
    assert (
        build_region_seg(case.volume, regions, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL)
        is None
    )


def test_build_region_seg_label_above_three_raises():
    case = make_case()
    regions = np.full(case.volume.shape, 4, dtype=np.uint8)
    with pytest.raises(LabelError, match=r"coronary artery region map contains values \[4\]; expected only 0 to 3"):
        build_region_seg(case.volume, regions, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL)
