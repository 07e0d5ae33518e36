"""Tests of the summary Secondary Capture: pixels, annotations, chosen slices and validity."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from scoring.errors import LabelError
from sr_writer import AlgorithmIdentification, build_notice_image, build_summary_image
from sr_writer.seg import ARTERY_COLORS
from scoring.volume import ProtocolFlag
from sr_writer import summary as summary_module
from sr_writer.seg import scored_labels
from sr_writer.summary import PAGE_SIZE, PANEL_BOTTOM, PANEL_HEIGHT, crop_window, slices_with_most_calcium
from tests.dicom_validation import assert_dciodvfy_clean
from tests.sr_writer.synthetic_ct import TEST_UID_ROOT, Lesion, make_case

ALGORITHM = AlgorithmIdentification(name="cacs-node", version="1.0.0", model_version="unet-test-3")
SERIAL = "node-test-1"

#: Rows of the page that hold the slice panels (figure y is measured from the bottom).
PANEL_ROWS = slice(int(PAGE_SIZE[1] * (1 - PANEL_BOTTOM - PANEL_HEIGHT)) + 2, int(PAGE_SIZE[1] * (1 - PANEL_BOTTOM)) - 2)


def _build(case):
    return build_summary_image(
        case.volume, case.labels, case.result, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL
    )


def _overlay_pixels(pixels: np.ndarray, artery: str) -> int:
    """Count panel pixels within 40 of the artery colour blended at 85 % over grey."""
    panel = pixels[PANEL_ROWS].astype(int)
    colour = np.array(ARTERY_COLORS[artery])
    distance = np.abs(panel - colour).max(axis=-1)
    return int((distance <= 40).sum())


def test_build_summary_image_rgb_burned_in(tmp_path):
    case = make_case()
    image = _build(case)
    path = tmp_path / f"{image.SOPInstanceUID}.dcm"
    image.save_as(path, enforce_file_format=True)
    read_back = pydicom.dcmread(path)

    assert read_back.SOPClassUID == SecondaryCaptureImageStorage
    assert read_back.PhotometricInterpretation == "RGB"
    assert read_back.SamplesPerPixel == 3
    assert read_back.BitsAllocated == 8
    assert (read_back.Rows, read_back.Columns) == (960, 1280)
    assert read_back.BurnedInAnnotation == "YES"
    assert read_back.ConversionType == "WSD"
    assert "not verified" in read_back.ImageComments
    assert read_back.SeriesNumber == 704
    assert read_back.SeriesDescription == "CAC summary (cacs-node 1.0)"
    assert read_back.pixel_array.shape == (960, 1280, 3)
    # highdicom reads the file back with the same pixels.
    assert np.array_equal(hd.imread(path).get_frame(1), image.pixel_array)
    assert_dciodvfy_clean(path)


def test_build_summary_image_overlay_colours_per_artery():
    case = make_case()
    pixels = _build(case).pixel_array

    # Each artery's 5 × 5 lesion is drawn in its SEG colour on its slice panel.
    for artery in ("LAD", "LCX", "RCA"):
        assert _overlay_pixels(pixels, artery) > 50, artery


def test_build_summary_image_source_slices_referenced():
    case = make_case()
    image = _build(case)

    # Voxels ≥ 130 HU per slice: LAD 25 on slice 2 and 9 on slice 3, LCX 25 on
    # slice 4, RCA 25 on slice 5. The three largest are slices 2, 4 and 5.
    referenced = [item.ReferencedSOPInstanceUID for item in image.SourceImageSequence]
    assert referenced == [case.volume.sop_instance_uids[index] for index in (2, 4, 5)]


def test_build_summary_image_zero_calcium_no_overlay(tmp_path):
    case = make_case(())
    image = _build(case)
    path = tmp_path / "zero.dcm"
    image.save_as(path, enforce_file_format=True)

    assert "SourceImageSequence" not in image
    for artery in ("LAD", "LCX", "RCA"):
        assert _overlay_pixels(image.pixel_array, artery) == 0, artery
    assert_dciodvfy_clean(path)


def test_build_summary_image_utf8_name_valid(tmp_path):
    case = make_case(patient_name="Ørsted^Zoë Ágnes", specific_character_set="ISO_IR 192")
    image = _build(case)
    path = tmp_path / "utf8.dcm"
    image.save_as(path, enforce_file_format=True)

    read_back = pydicom.dcmread(path)
    assert read_back.SpecificCharacterSet == "ISO_IR 192"
    assert str(read_back.PatientName) == "Ørsted^Zoë Ágnes"
    assert_dciodvfy_clean(path)


def test_build_summary_image_cjk_name_no_glyph_warning(recwarn):
    case = make_case(patient_name="山田^太郎", specific_character_set="ISO_IR 192")
    image = _build(case)

    # matplotlib's default font lacks CJK glyphs. The page draws "□" instead,
    # so no warning quotes a character of the name; the attribute keeps it.
    glyph_warnings = [str(warning.message) for warning in recwarn if "Glyph" in str(warning.message)]
    assert glyph_warnings == []
    assert str(image.PatientName) == "山田^太郎"


def test_build_summary_image_many_flags_counted(monkeypatch):
    case = make_case()
    flags = tuple(
        ProtocolFlag(code, f"flag {number}: " + "a long explanation of the deviation " * 3)
        for number, code in enumerate(("KVP", "SLICE_THICKNESS", "SLICE_INCREMENT", "CONTRAST", "BODY_PART"))
    )
    result = type(case.result)(**{**case.result.__dict__, "flags": flags})
    drawn: list[str] = []
    original = summary_module._draw_line

    def record(figure, y, text, size, weight, color):
        drawn.append(text)
        assert y >= summary_module.FINDINGS_BOTTOM, text
        return original(figure, y, text, size, weight, color)

    monkeypatch.setattr(summary_module, "_draw_line", record)
    build_summary_image(
        case.volume, case.labels, result, algorithm=ALGORITHM, uid_root=TEST_UID_ROOT, device_serial_number=SERIAL
    )

    # Flag lines start at y = 0.693 of the page (the lines above take 0.147).
    # Each flag wraps to 2 lines of 20/960 = 0.0208, and a flag is drawn only
    # when it and one overflow line end above 0.53: flags 0, 1 and 2 fit. The
    # other 3 (flags 3 and 4, and the uncalibrated mass) are counted.
    bullets = [text for text in drawn if text.startswith("• ")]
    assert [text[:10] for text in bullets] == ["• flag 0: ", "• flag 1: ", "• flag 2: "]
    assert drawn[-1] == "… 3 more flag(s), coded in the SR"


def test_slices_with_most_calcium_ranks_coronary_voxels():
    case = make_case(
        (
            Lesion("LAD", slice_index=1, row=10, column=8, size=2),
            Lesion("LCX", slice_index=3, row=10, column=8, size=6),
            Lesion("RCA", slice_index=6, row=10, column=8, size=4),
            Lesion("RCA", slice_index=7, row=10, column=8, size=3),
        ),
        other_calcium=True,
    )
    # Coronary voxels per slice: 4, 36, 16 and 9 on slices 1, 3, 6 and 7. The
    # 16 OTHER_CALCIUM voxels on slice 1 do not count.
    assert slices_with_most_calcium(scored_labels(case.volume, case.labels, case.result)) == [3, 6, 7]


def test_slices_with_most_calcium_below_threshold_ignored():
    case = make_case((Lesion("LAD", slice_index=2, row=10, column=8, hu=120.0),))
    assert slices_with_most_calcium(scored_labels(case.volume, case.labels, case.result)) == []


def test_build_summary_image_label_shape_mismatch_raises():
    case = make_case()
    with pytest.raises(LabelError, match=r"CAC label volume has shape \(8, 40, 35\)"):
        build_summary_image(
            case.volume,
            case.labels[..., 1:],
            case.result,
            algorithm=ALGORITHM,
            uid_root=TEST_UID_ROOT,
            device_serial_number=SERIAL,
        )


def test_crop_window_centres_on_calcium():
    case = make_case(
        (
            Lesion("LAD", slice_index=2, row=10, column=8),
            Lesion("RCA", slice_index=5, row=30, column=25),
        ),
        rows=400,
        columns=400,
        pixel_spacing=(0.5, 0.5),
    )
    # Calcium spans rows 10-34 and columns 8-29 (12.5 × 11 mm), less than the
    # 120 mm minimum field, so the field is 120 mm = 240 pixels around the
    # box centre (row 22.5, column 19), clipped at 0 on the top and left.
    assert crop_window(case.volume, scored_labels(case.volume, case.labels, case.result)) == ((0, 143), (0, 139))


def test_crop_window_without_calcium_whole_image():
    case = make_case(())
    assert crop_window(case.volume, scored_labels(case.volume, case.labels, case.result)) == ((0, 40), (0, 36))


def test_patient_line_keeps_id():
    from pydicom.dataset import Dataset

    from sr_writer.summary import _patient_line

    header = Dataset()
    header.PatientName = "Wolfeschlegelsteinhausenbergerdorff^Hubert Blaine Ångström^Max"
    header.PatientID = "CACS-0042"
    header.PatientBirthDate = "19500102"
    header.PatientSex = "M"
    line = _patient_line(header)
    assert line.endswith("   ID CACS-0042   born 1950-01-02   sex M")
    assert line.startswith("Wolfeschlegelstein…   ID")
    assert len(line) == 60
    header.PatientName = "Short^Name"
    assert _patient_line(header) == "Short, Name   ID CACS-0042   born 1950-01-02   sex M"


CONTRAST_REASON = ("the images show a 48 mm wide region of 180–700 HU (median 488 HU) around slice 42 of 82 "
                   "in position order, as blood enhanced by contrast agent; the header records no agent")


def test_build_notice_image_valid_in_source_study(tmp_path):
    case = make_case(patient_name="Ørsted^Zoë", specific_character_set="ISO_IR 100")
    header = case.volume.headers[0]
    image = build_notice_image(header, CONTRAST_REASON, received_instances=82, algorithm=ALGORITHM,
                               uid_root=TEST_UID_ROOT, device_serial_number=SERIAL)
    path = tmp_path / "notice.dcm"
    image.save_as(path, enforce_file_format=True)
    read_back = pydicom.dcmread(path)

    assert read_back.SOPClassUID == SecondaryCaptureImageStorage
    assert read_back.StudyInstanceUID == header.StudyInstanceUID
    assert read_back.SeriesInstanceUID != header.SeriesInstanceUID
    assert str(read_back.PatientName) == "Ørsted^Zoë"
    assert read_back.SeriesNumber == 705
    assert read_back.SeriesDescription == "CAC not scored (cacs-node 1.0)"
    assert read_back.BurnedInAnnotation == "YES"
    # The comment spells the en dash in ASCII, which the source's ISO_IR 100 can encode.
    assert read_back.ImageComments == f"Calcium score not computed: {CONTRAST_REASON.replace('–', '-')}"
    assert [item.ReferencedSOPInstanceUID for item in read_back.SourceImageSequence] == [header.SOPInstanceUID]
    assert read_back.pixel_array.shape == (960, 1280, 3)
    assert_dciodvfy_clean(path)


def test_build_notice_image_long_reason_fits_page():
    header = make_case().volume.headers[0]
    reason = "word " * 3000
    image = build_notice_image(header, reason, received_instances=3, algorithm=ALGORITHM,
                               uid_root=TEST_UID_ROOT, device_serial_number=SERIAL)

    # ImageComments is LT, at most 10240 characters; the page draws 16 lines at most.
    assert len(image.ImageComments) == 10240
    bottom_rows = image.pixel_array[-100:]
    assert int(np.abs(bottom_rows.astype(int) - bottom_rows[0, 0].astype(int)).max()) == 0


def test_build_notice_image_header_without_study_raises():
    header = make_case().volume.headers[0]
    del header.StudyInstanceUID
    with pytest.raises(ValueError, match="lacks StudyInstanceUID, so a notice cannot join its study"):
        build_notice_image(header, "gap", received_instances=3, algorithm=ALGORITHM,
                           uid_root=TEST_UID_ROOT, device_serial_number=SERIAL)
