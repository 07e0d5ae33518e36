"""Tests of the TID 1500 Comprehensive 3D SR: values, references, codes, predecessor and validity."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from scoring.result import ARTERIES
from scoring.volume import ProtocolFlag
from sr_writer import AlgorithmIdentification, build_seg, build_sr
from sr_writer import codes
from sr_writer.seg import segment_numbers
from sr_writer.sr import find_measurement
from tests.dicom_validation import assert_dciodvfy_clean
from tests.sr_writer.synthetic_ct import TEST_UID_ROOT, Lesion, make_case

ALGORITHM = AlgorithmIdentification(name="cacs-node", version="1.0.0", model_version="unet-test-3")
SERIAL = "node-test-1"
ARTERY_SITES = {"LAD": codes.LAD_ARTERY, "LCX": codes.LCX_ARTERY, "RCA": codes.RCA_ARTERY}


def _seg_and_sr(case, **options):
    seg = build_seg(
        case.volume, case.labels, case.result, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL
    )
    sr = build_sr(
        case.volume,
        options.pop("result", case.result),
        seg,
        algorithm=ALGORITHM,
        uid_root=TEST_UID_ROOT,
        device_serial_number=SERIAL,
        **options,
    )
    return seg, sr


def _save(dataset, folder: Path) -> Path:
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _content_items(item):
    """Yield every content item of an SR tree, depth first."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from _content_items(child)


def _coded_values(sr, concept_name: str) -> list[str]:
    """CodeValue of every CODE item whose concept name has the code value `concept_name`."""
    return [
        item.ConceptCodeSequence[0].get("CodeValue")
        for item in _content_items(sr)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].get("CodeValue") == concept_name
    ]


def test_build_sr_values_equal_scoring_result(tmp_path):
    case = make_case(reverse_file_order=True)
    _, sr = _seg_and_sr(case)
    path = _save(sr, tmp_path)
    read_back = pydicom.dcmread(path)

    # Golden values from the synthetic lesions (0.4 × 0.7 mm pixels, 0.28 mm²,
    # 3 mm slices so the normalisation factor is 1): LAD 25 px at 400 HU
    # (weight 4) on one slice and 9 px at 400 HU on the next, 4 × 7.0 + 4 × 2.52
    # = 38.08; LCX 25 px at 250 HU (weight 2), 2 × 7.0 = 14.0; RCA 25 px at
    # 700 HU (weight 4), 28.0.
    assert find_measurement(read_back, codes.LAD_ARTERY, codes.CORONARY_ARTERY_CALCIUM_SCORE) == pytest.approx(38.08)
    assert find_measurement(read_back, codes.LCX_ARTERY, codes.CORONARY_ARTERY_CALCIUM_SCORE) == pytest.approx(14.0)
    assert find_measurement(read_back, codes.RCA_ARTERY, codes.CORONARY_ARTERY_CALCIUM_SCORE) == pytest.approx(28.0)
    for artery in ARTERIES:
        site = ARTERY_SITES[artery]
        assert find_measurement(read_back, site, codes.CORONARY_ARTERY_CALCIUM_SCORE) == case.result.agatston[artery]
        assert find_measurement(read_back, site, codes.CALCIUM_VOLUME) == case.result.volume_mm3[artery]
        assert find_measurement(read_back, site, codes.CALCIUM_MASS) == case.result.mass_mg[artery]
    total_site = codes.CORONARY_ARTERY
    assert find_measurement(read_back, total_site, codes.CORONARY_ARTERY_CALCIUM_SCORE) == case.result.agatston["total"]
    assert find_measurement(read_back, total_site, codes.CALCIUM_VOLUME) == case.result.volume_mm3["total"]
    assert find_measurement(read_back, total_site, codes.CALCIUM_MASS) == case.result.mass_mg["total"]
    assert find_measurement(read_back, total_site, codes.AGATSTON_SCORE_THRESHOLD) == 130.0
    assert find_measurement(read_back, total_site, codes.NORMALIZATION_FACTOR) == case.result.normalization_factor
    assert find_measurement(read_back, total_site, codes.MASS_CALIBRATION_FACTOR) == 0.743

    # Total 80.08 is above 0 and below 100: risk category II, CAC-DRS A1 with 3 arteries.
    assert _coded_values(read_back, "RISK") == ["RISK-II"]
    assert _coded_values(read_back, "CACDRS") == ["CACDRS-A1/N3"]
    # The synthetic series has no Calcium Scoring Mass Factor Device, so mass is uncalibrated.
    assert _coded_values(read_back, "PROTDEV") == ["MASS_UNCALIB"]
    assert_dciodvfy_clean(path)


def test_build_sr_document_header(tmp_path):
    case = make_case()
    _, sr = _seg_and_sr(case)

    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.SeriesNumber == 703
    assert sr.SeriesDescription == "CAC SR (cacs-node 1.0)"
    assert sr.SOPInstanceUID.startswith(TEST_UID_ROOT + ".")
    assert sr.SeriesInstanceUID.startswith(TEST_UID_ROOT + ".")
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99CACS"
    procedure = [
        item.ConceptCodeSequence[0]
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert [(code.CodeValue, code.CodingSchemeDesignator) for code in procedure] == [("426005005", "SCT")]
    # Evidence lists every scored CT instance and the SEG.
    evidence = {
        instance.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert set(case.volume.sop_instance_uids) <= evidence


def test_build_sr_groups_reference_seg_segments():
    case = make_case()
    seg, sr = _seg_and_sr(case)
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content

    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    numbers = segment_numbers(seg)
    for group in groups:
        artery = {site.value: name for name, site in ARTERY_SITES.items()}[group.finding_sites[0].value.value]
        segment = group.referenced_segment
        assert segment.referenced_segment_numbers == [numbers[artery]]
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert group.finding_type == codes.PATHOLOGIC_CALCIFICATION
        assert group.get_measurements(name=codes.CORONARY_ARTERY_CALCIUM_SCORE)[0].method == (
            codes.AGATSTON_SCORING_METHOD
        )


def test_build_sr_algorithm_on_every_measurement():
    case = make_case()
    _, sr = _seg_and_sr(case)

    measurements = [item for item in _content_items(sr) if item.ValueType == "NUM"]
    # 3 arteries × 3 scores, 3 totals, threshold, normalisation and mass calibration factors.
    assert len(measurements) == 15
    for measurement in measurements:
        modifiers = {
            child.ConceptNameCodeSequence[0].CodeValue: child.get("TextValue")
            for child in measurement.get("ContentSequence", [])
        }
        assert modifiers["111001"] == "cacs-node"  # Algorithm Name
        assert modifiers["111003"] == "1.0.0"  # Algorithm Version
        assert modifiers["111002"] == "model version unet-test-3"  # Algorithm Parameters


def test_build_sr_zero_calcium_explicit_zeros(tmp_path):
    case = make_case(())
    sr = build_sr(
        case.volume, case.result, None, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL
    )
    path = _save(sr, tmp_path)

    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert report.get_volumetric_roi_measurement_groups() == []
    # Zero scores carry no "Pathologic calcification" finding.
    assert [group.finding_type for group in report.get_image_measurement_groups()] == [None, None, None, None]
    for site in list(ARTERY_SITES.values()) + [codes.CORONARY_ARTERY]:
        assert find_measurement(sr, site, codes.CORONARY_ARTERY_CALCIUM_SCORE) == 0.0
        assert find_measurement(sr, site, codes.CALCIUM_VOLUME) == 0.0
        assert find_measurement(sr, site, codes.CALCIUM_MASS) == 0.0
    assert _coded_values(sr, "RISK") == ["RISK-I"]
    assert _coded_values(sr, "CACDRS") == ["CACDRS-A0"]
    assert_dciodvfy_clean(path)


def test_build_sr_only_rca_one_volumetric_group(tmp_path):
    case = make_case((Lesion("RCA", slice_index=3, row=12, column=12),))
    _, sr = _seg_and_sr(case)
    path = _save(sr, tmp_path)

    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = report.get_volumetric_roi_measurement_groups()
    assert [group.finding_sites[0].value for group in groups] == [codes.RCA_ARTERY]
    assert groups[0].referenced_segment.referenced_segment_numbers == [1]
    # RCA 25 px × 0.28 mm² at 400 HU (weight 4): 28.0; LAD and LCX explicit zeros.
    assert find_measurement(sr, codes.RCA_ARTERY, codes.CORONARY_ARTERY_CALCIUM_SCORE) == pytest.approx(28.0)
    assert find_measurement(sr, codes.LAD_ARTERY, codes.CORONARY_ARTERY_CALCIUM_SCORE) == 0.0
    assert find_measurement(sr, codes.LCX_ARTERY, codes.CORONARY_ARTERY_CALCIUM_SCORE) == 0.0
    assert _coded_values(sr, "CACDRS") == ["CACDRS-A1/N1"]
    assert_dciodvfy_clean(path)


def test_build_sr_protocol_flags_coded():
    case = make_case()
    flags = (
        ProtocolFlag("KVP", "KVP is 100 kV; the Agatston score is defined at 120 kV."),
        ProtocolFlag("SLICE_THICKNESS", "SliceThickness is 1.0 mm; expected 2.5 to 3.0 mm."),
    )
    result = type(case.result)(**{**case.result.__dict__, "flags": flags, "mass_calibrated": False})
    _, sr = _seg_and_sr(case, result=result)

    assert _coded_values(sr, "PROTDEV") == ["KVP", "SLICE_THICKNESS", "MASS_UNCALIB"]


def test_build_sr_predecessor_named(tmp_path):
    case = make_case()
    seg, first = _seg_and_sr(case)
    second = build_sr(
        case.volume,
        case.result,
        seg,
        algorithm=ALGORITHM,
        uid_root=TEST_UID_ROOT,
        device_serial_number=SERIAL,
        predecessor=first,
    )
    path = _save(second, tmp_path)

    assert second.SOPInstanceUID != first.SOPInstanceUID
    item = second.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == case.volume.study_instance_uid
    assert item.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    reference = item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == Comprehensive3DSRStorage
    assert_dciodvfy_clean(path)


def test_build_sr_predecessor_other_study_raises():
    case = make_case()
    other = make_case()
    _, other_sr = _seg_and_sr(other)
    with pytest.raises(ValueError, match="belongs to study .* but the scored series is in study"):
        _seg_and_sr(case, predecessor=other_sr)


def test_build_sr_predecessor_not_sr_raises():
    case = make_case()
    with pytest.raises(ValueError, match="has SOP Class 1.2.840.10008.5.1.4.1.1.2; expected the Comprehensive 3D SR"):
        _seg_and_sr(case, predecessor=case.datasets[0])


def test_build_sr_result_of_other_series_raises():
    case = make_case()
    other = make_case()
    with pytest.raises(ValueError, match="scoring result is for series .* but the volume is series"):
        build_sr(case.volume, other.result, None, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL)


def test_build_sr_calcium_without_seg_raises():
    case = make_case()
    with pytest.raises(ValueError, match="gives LAD calcium but the SEG has no LAD segment"):
        build_sr(case.volume, case.result, None, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL)


@pytest.mark.parametrize(
    ("grade", "code_value"),
    [("A0", "CACDRS-A0"), ("A1/N1", "CACDRS-A1/N1"), ("A3/N3", "CACDRS-A3/N3")],
)
def test_cac_drs_code_valid_grades(grade, code_value):
    code = codes.cac_drs_code(grade)
    assert code.value == code_value
    assert code.scheme_designator == "99CACS"
    assert code.meaning == f"CAC-DRS {grade}"


@pytest.mark.parametrize("grade", ["A4/N1", "A1", "A0/N1", "a1/n2", "A2/N4"])
def test_cac_drs_code_invalid_grade_raises(grade):
    with pytest.raises(ValueError, match=f"CAC-DRS grade '{grade}' is invalid"):
        codes.cac_drs_code(grade)


def test_risk_category_code_invalid_raises():
    with pytest.raises(ValueError, match="risk category 'V' is invalid; expected one of I, II, III, IV"):
        codes.risk_category_code("V")


def test_protocol_flag_code_unknown_raises():
    with pytest.raises(ValueError, match="protocol flag 'NOISE' has no SR code"):
        codes.protocol_flag_code("NOISE")
