"""Tests of Agatston, volume and mass scoring on small volumes with hand-computed scores."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.agatston import (
    cac_drs_grade,
    density_weight,
    normalization_factor,
    risk_category,
    score_volume,
    scored_voxel_labels,
)
from scoring.config import ScoringParameters
from scoring.errors import LabelError, SliceSpacingError
from scoring.result import LAD, LCX, OTHER_CALCIUM, RCA
from scoring.volume import PADDING_HU, CTVolume, ProtocolFlag

BLOOD_HU = 40.0


def make_volume(
    hu: np.ndarray,
    *,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    slice_increment: float = 3.0,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    padding_mask: np.ndarray | None = None,
    mass_calibration_factor: float | None = None,
    flags: tuple[ProtocolFlag, ...] = (),
) -> CTVolume:
    """Build an axial CTVolume (identity orientation) around `hu` without DICOM files."""
    hu = np.asarray(hu, dtype=np.float32)
    slices = hu.shape[0]
    positions = np.array([[origin[0], origin[1], origin[2] + i * slice_increment] for i in range(slices)])
    if padding_mask is None:
        padding_mask = np.zeros(hu.shape, dtype=bool)
    return CTVolume(
        hu=hu,
        padding_mask=padding_mask,
        origin=np.array(origin, dtype=np.float64),
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        slice_direction=np.array([0.0, 0.0, 1.0]),
        pixel_spacing=pixel_spacing,
        slice_increment=slice_increment,
        slice_thickness=3.0,
        kvp=120.0,
        positions=positions,
        series_instance_uid="1.2.826.0.1.3680043.8.498.1",
        study_instance_uid="1.2.826.0.1.3680043.8.498.2",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.8.498.10.{i}" for i in range(slices)),
        headers=(),
        mass_calibration_factor=mass_calibration_factor,
        flags=flags,
    )


def blank(slices: int = 3, rows: int = 12, columns: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Return a blood-pool HU array and an all-background label map of the same shape."""
    hu = np.full((slices, rows, columns), BLOOD_HU, dtype=np.float32)
    return hu, np.zeros(hu.shape, dtype=np.uint8)


def three_slice_lesion() -> tuple[np.ndarray, np.ndarray]:
    """One LAD lesion over three slices: 4 pixels at 180 HU, 6 at 450 HU, 3 at 210 HU."""
    hu, labels = blank()
    hu[0, 2:4, 2:4] = 180.0
    hu[1, 2:4, 2:5] = 450.0
    hu[2, 2:5, 2] = 210.0
    labels[hu >= 130] = LAD
    return hu, labels


def test_score_volume_single_lesion_weight_one_scores_four() -> None:
    hu, labels = blank(slices=1)
    hu[0, 5:7, 5:7] = 180.0
    labels[0, 5:7, 5:7] = LAD

    result = score_volume(make_volume(hu), labels)

    # 4 pixels × 1 mm² = 4 mm², peak 180 HU → weight 1, factor 3/3 = 1: 4 × 1 = 4.
    assert result.agatston["LAD"] == 4.0
    assert result.agatston["total"] == 4.0
    assert result.normalization_factor == 1.0


def test_score_volume_three_slices_weights_each_slice() -> None:
    hu, labels = three_slice_lesion()

    result = score_volume(make_volume(hu), labels)

    # 4 mm² × 1 (180 HU) + 6 mm² × 4 (450 HU) + 3 mm² × 2 (210 HU) = 4 + 24 + 6 = 34.
    # Weighting the 3D object once by its 450 HU peak would give 13 × 4 = 52.
    assert result.agatston["LAD"] == 34.0
    assert result.agatston["total"] == 34.0


def test_score_volume_three_slice_lesion_volume_and_mass() -> None:
    hu, labels = three_slice_lesion()

    result = score_volume(make_volume(hu), labels)

    # 13 voxels × 1 mm² × 3 mm = 39 mm³.
    assert result.volume_mm3["LAD"] == 39.0
    # HU sum 4 × 180 + 6 × 450 + 3 × 210 = 4050; × 3 mm³ / 1000 = 12.15 HU·cm³;
    # × default factor 0.743 mg/cm³/HU = 9.02745 mg.
    assert result.mass_mg["LAD"] == pytest.approx(9.02745, rel=1e-12)
    assert result.mass_calibrated is False
    assert result.mass_calibration_factor == 0.743
    assert [flag.code for flag in result.flags] == ["MASS_UNCALIBRATED"]


def test_score_volume_series_mass_factor_is_calibrated() -> None:
    hu, labels = three_slice_lesion()
    volume = make_volume(hu, mass_calibration_factor=0.8)

    result = score_volume(volume, labels)

    # 12.15 HU·cm³ (see the test above) × 0.8 mg/cm³/HU = 9.72 mg.
    assert result.mass_mg["total"] == pytest.approx(9.72, rel=1e-12)
    assert result.mass_calibrated is True
    assert result.mass_calibration_factor == 0.8
    assert result.flags == ()


def test_score_volume_invalid_series_mass_factor_flags_default() -> None:
    hu, labels = three_slice_lesion()
    volume = make_volume(hu, mass_calibration_factor=0.0)

    result = score_volume(volume, labels)

    assert result.mass_calibrated is False
    assert result.mass_calibration_factor == 0.743
    assert "0.0, which is not a positive number" in result.flags[0].message


def test_score_volume_corner_touching_pixels_form_one_lesion() -> None:
    hu, labels = blank(slices=1)
    hu[0, 4, 4] = 180.0
    hu[0, 5, 5] = 450.0
    labels[0, 4, 4] = LAD
    labels[0, 5, 5] = LAD

    result = score_volume(make_volume(hu), labels)

    # One 8-connected lesion: 2 mm² × weight 4 (peak 450) = 8.
    # Two 4-connected lesions would give 1 × 1 + 1 × 4 = 5.
    assert result.agatston["LAD"] == 8.0


def test_score_volume_area_of_one_mm2_counts() -> None:
    hu, labels = blank(slices=1)
    hu[0, 4:6, 4:6] = 250.0
    labels[0, 4:6, 4:6] = RCA

    result = score_volume(make_volume(hu, pixel_spacing=(0.5, 0.5)), labels)

    # 4 pixels × 0.25 mm² = 1.0 mm², inclusive minimum; peak 250 → weight 2: 1.0 × 2 = 2.
    assert result.agatston["RCA"] == 2.0


def test_score_volume_area_below_one_mm2_is_dropped() -> None:
    hu, labels = blank(slices=1)
    hu[0, 4, 4] = 900.0
    labels[0, 4, 4] = RCA

    result = score_volume(make_volume(hu, pixel_spacing=(0.9, 1.1)), labels)

    # 1 pixel × 0.9 mm × 1.1 mm = 0.99 mm² < 1.0 mm²: no lesion, so no volume or mass either.
    assert result.agatston["RCA"] == 0.0
    assert result.volume_mm3["RCA"] == 0.0
    assert result.mass_mg["RCA"] == 0.0
    assert result.lesions == ()


def test_score_volume_anisotropic_spacing_uses_row_then_column() -> None:
    hu, labels = blank(slices=1)
    hu[0, 4, 2:5] = 300.0
    labels[0, 4, 2:5] = LCX
    volume = make_volume(hu, pixel_spacing=(0.5, 0.7), origin=(-10.0, 20.0, 5.0))

    result = score_volume(volume, labels)

    # 3 pixels × 0.5 × 0.7 = 1.05 mm² ≥ 1.0; peak 300 → weight 3: 3.15.
    assert result.agatston["LCX"] == pytest.approx(3.15, rel=1e-12)
    # Centroid at row 4, column 3: x = -10 + 3 × 0.7 (column spacing) = -7.9,
    # y = 20 + 4 × 0.5 (row spacing) = 22.0. Swapped spacings would give x = -8.5, y = 22.8.
    x, y, z = result.lesions[0].centroid_mm
    assert x == pytest.approx(-7.9, abs=1e-9)
    assert y == pytest.approx(22.0, abs=1e-9)
    assert z == pytest.approx(5.0, abs=1e-9)


def test_score_volume_half_overlapping_slices_factor_half() -> None:
    hu, labels = blank(slices=1)
    hu[0, 5:7, 5:7] = 180.0
    labels[0, 5:7, 5:7] = LAD

    result = score_volume(make_volume(hu, slice_increment=1.5), labels)

    # 3 mm slices reconstructed 1.5 mm apart: factor 1.5 / 3 = 0.5; 4 mm² × 1 × 0.5 = 2.
    assert result.normalization_factor == 0.5
    assert result.agatston["LAD"] == 2.0


def test_score_volume_contiguous_2_5_mm_factor() -> None:
    hu, labels = blank(slices=1)
    hu[0, 5:7, 5:7] = 180.0
    labels[0, 5:7, 5:7] = LAD

    result = score_volume(make_volume(hu, slice_increment=2.5), labels)

    # 2.5 / 3 = 0.8333…; 4 mm² × 1 × 0.8333… = 3.3333…
    assert result.normalization_factor == pytest.approx(0.833333, abs=1e-6)
    assert result.agatston["LAD"] == pytest.approx(10.0 / 3.0, rel=1e-12)
    # Volume uses the increment too: 4 voxels × 1 mm² × 2.5 mm = 10 mm³.
    assert result.volume_mm3["LAD"] == 10.0


def test_score_volume_threshold_is_inclusive() -> None:
    hu, labels = blank(slices=1)
    hu[0, 2:4, 2:4] = 130.0
    hu[0, 8:10, 8:10] = 129.99
    labels[0, 2:4, 2:4] = LAD
    labels[0, 8:10, 8:10] = LCX

    result = score_volume(make_volume(hu), labels)

    # 130.0 HU is calcium: 4 mm² × 1 = 4. 129.99 HU is not.
    assert result.agatston["LAD"] == 4.0
    assert result.agatston["LCX"] == 0.0


def test_density_weight_boundaries() -> None:
    peaks = [130.0, 199.99, 200.0, 299.99, 300.0, 399.99, 400.0, 1500.0]

    assert density_weight(peaks).tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


def test_score_volume_adjacent_arteries_scored_separately() -> None:
    hu, labels = blank(slices=1)
    hu[0, 5, 4] = 180.0
    hu[0, 5, 5] = 450.0
    labels[0, 5, 4] = LAD
    labels[0, 5, 5] = LCX

    result = score_volume(make_volume(hu), labels)

    # Each artery gets its own 1 mm² lesion: LAD 1 × 1, LCX 1 × 4.
    assert result.agatston["LAD"] == 1.0
    assert result.agatston["LCX"] == 4.0
    assert result.agatston["total"] == 5.0
    assert result.cac_drs == "A1/N2"


def test_score_volume_other_calcium_and_padding_ignored() -> None:
    hu, labels = blank(slices=1)
    hu[0, 2:6, 2:6] = 800.0
    labels[0, 2:6, 2:6] = OTHER_CALCIUM
    padding = np.zeros(hu.shape, dtype=bool)
    padding[0, 8:10, 8:10] = True
    hu[0, 8:10, 8:10] = 500.0
    labels[0, 8:10, 8:10] = LAD

    result = score_volume(make_volume(hu, padding_mask=padding), labels)

    assert result.agatston["total"] == 0.0
    assert result.volume_mm3["total"] == 0.0
    assert result.mass_mg["total"] == 0.0
    assert result.risk_category == "I"
    assert result.cac_drs == "A0"


def test_score_volume_zero_calcium_gives_category_one() -> None:
    hu, labels = blank()
    hu[1, 3:5, 3:5] = PADDING_HU

    result = score_volume(make_volume(hu), labels)

    assert result.agatston == {"LAD": 0.0, "LCX": 0.0, "RCA": 0.0, "total": 0.0}
    assert result.volume_mm3 == {"LAD": 0.0, "LCX": 0.0, "RCA": 0.0, "total": 0.0}
    assert result.mass_mg == {"LAD": 0.0, "LCX": 0.0, "RCA": 0.0, "total": 0.0}
    assert result.risk_category == "I"
    assert result.cac_drs == "A0"
    assert result.lesions == ()


@pytest.mark.parametrize(
    ("total", "category"),
    [(0.0, "I"), (0.5, "II"), (99.9, "II"), (100.0, "III"), (299.9, "III"), (300.0, "IV"), (2500.0, "IV")],
)
def test_risk_category_boundaries(total: float, category: str) -> None:
    assert risk_category(total) == category


@pytest.mark.parametrize(
    ("total", "arteries", "grade"),
    [(0.0, 0, "A0"), (4.0, 1, "A1/N1"), (99.9, 2, "A1/N2"), (100.0, 3, "A2/N3"), (300.0, 1, "A3/N1")],
)
def test_cac_drs_grade_ranges(total: float, arteries: int, grade: str) -> None:
    assert cac_drs_grade(total, arteries) == grade


def test_score_volume_exactly_100_is_category_three() -> None:
    hu, labels = blank(slices=1)
    hu[0, 1:6, 1:6] = 400.0
    labels[0, 1:6, 1:6] = RCA

    result = score_volume(make_volume(hu), labels)

    # 25 mm² × weight 4 = 100, the lower bound of category III and CAC-DRS A2.
    assert result.agatston["total"] == 100.0
    assert result.risk_category == "III"
    assert result.cac_drs == "A2/N1"


def test_score_volume_three_arteries_count_in_cac_drs() -> None:
    hu, labels = blank(slices=1)
    for label, column in ((LAD, 1), (LCX, 5), (RCA, 9)):
        hu[0, 1:11, column : column + 2] = 450.0
        labels[0, 1:11, column : column + 2] = label

    result = score_volume(make_volume(hu), labels)

    # Each artery: 20 mm² × weight 4 = 80; total 240 → category III, A2, three arteries.
    assert result.agatston == {"LAD": 80.0, "LCX": 80.0, "RCA": 80.0, "total": 240.0}
    assert result.risk_category == "III"
    assert result.cac_drs == "A2/N3"


def test_score_volume_lesions_use_face_connectivity() -> None:
    hu, labels = blank(slices=2)
    hu[0, 2:4, 2:4] = 250.0
    hu[1, 4:6, 4:6] = 250.0
    labels[hu >= 130] = LAD

    result = score_volume(make_volume(hu), labels)

    # The two 4-voxel blocks touch only diagonally across slices, so 6-connectivity
    # keeps them apart: two lesions of 4 voxels × 3 mm³ = 12 mm³, each 4 mm² × 2 = 8.
    assert len(result.lesions) == 2
    assert [lesion.voxel_count for lesion in result.lesions] == [4, 4]
    assert [lesion.volume_mm3 for lesion in result.lesions] == [12.0, 12.0]
    assert [lesion.agatston for lesion in result.lesions] == [8.0, 8.0]
    assert [lesion.peak_hu for lesion in result.lesions] == [250.0, 250.0]


def test_score_volume_lesion_shares_add_up_to_artery() -> None:
    hu, labels = three_slice_lesion()
    hu[1, 8:10, 8:10] = 320.0
    labels[1, 8:10, 8:10] = LAD

    result = score_volume(make_volume(hu), labels)

    # Second lesion: 4 mm² × 3 = 12; artery 34 + 12 = 46.
    assert result.agatston["LAD"] == 46.0
    assert sorted(lesion.agatston for lesion in result.lesions) == [12.0, 34.0]
    assert sum(lesion.mass_mg for lesion in result.lesions) == pytest.approx(result.mass_mg["LAD"])
    assert sum(lesion.volume_mm3 for lesion in result.lesions) == result.volume_mm3["LAD"]


def test_score_volume_lesion_under_minimum_volume_not_listed() -> None:
    hu, labels = blank(slices=1)
    hu[0, 5, 5] = 450.0
    labels[0, 5, 5] = LAD

    result = score_volume(make_volume(hu, slice_increment=0.5), labels)

    # 1 mm² passes the area minimum: 1 × 4 × (0.5 / 3) = 0.6667 Agatston and
    # 0.5 mm³ of volume, but 0.5 mm³ < 1.5 mm³ keeps it out of the lesion list.
    assert result.agatston["LAD"] == pytest.approx(4.0 / 6.0, rel=1e-12)
    assert result.volume_mm3["LAD"] == 0.5
    assert result.lesions == ()


def test_score_volume_keeps_volume_flags_first() -> None:
    hu, labels = blank(slices=1)
    kvp_flag = ProtocolFlag("KVP", "KVP is 100 kV; calcium scoring expects 120 kV.")

    result = score_volume(make_volume(hu, flags=(kvp_flag,)), labels)

    assert [flag.code for flag in result.flags] == ["KVP", "MASS_UNCALIBRATED"]


def test_score_volume_json_has_public_keys() -> None:
    hu, labels = three_slice_lesion()

    document = score_volume(make_volume(hu), labels).to_json()

    for key in ("series_instance_uid", "normalization_factor", "flags", "agatston",
                "volume_mm3", "mass_mg", "risk_category", "cac_drs", "lesions"):
        assert key in document
    assert document["agatston"] == {"LAD": 34.0, "LCX": 0.0, "RCA": 0.0, "total": 34.0}
    assert document["series_instance_uid"] == "1.2.826.0.1.3680043.8.498.1"


def test_score_volume_shape_mismatch_raises() -> None:
    hu, _ = blank()

    with pytest.raises(LabelError, match=r"shape \(3, 12, 10\).*has \(3, 12, 12\)"):
        score_volume(make_volume(hu), np.zeros((3, 12, 10), dtype=np.uint8))


def test_score_volume_unknown_label_value_raises() -> None:
    hu, labels = blank()
    labels[0, 0, 0] = 7

    with pytest.raises(LabelError, match=r"contains values \[7\] \(1 voxels\)"):
        score_volume(make_volume(hu), labels)


def test_score_volume_float_labels_raise() -> None:
    hu, labels = blank()

    with pytest.raises(LabelError, match="data type float64"):
        score_volume(make_volume(hu), labels.astype(np.float64))


def test_normalization_factor_zero_increment_raises() -> None:
    with pytest.raises(SliceSpacingError, match=r"slice increment 0\.0 mm is not a positive number"):
        normalization_factor(0.0)


def test_score_volume_negative_minimum_area_raises() -> None:
    hu, labels = blank()

    with pytest.raises(ValueError, match=r"minimum_lesion_area_mm2=-1\.0 is invalid"):
        score_volume(make_volume(hu), labels, ScoringParameters(minimum_lesion_area_mm2=-1.0))


# Real scan: QRM thorax phantom with the Cardiac Calcification Insert (Toshiba Aquilion ONE, 120 kVp, 3 mm).

#: Box (slices, rows, columns) around the insert's nine hydroxyapatite cylinders,
#: excluding the calibration rod (slices 30 and up) and the phantom shell.
QRM_INSERT_BOX = (slice(15, 30), slice(130, 310), slice(160, 320))

#: Inserts of the reference CSV ("inserts" column, size suffix) in decreasing
#: order of thresholded volume: 5 mm high/medium/low density, then 3 mm.
QRM_INSERTS_BY_VOLUME = (
    ("High Density", "large"),
    ("Medium Density", "large"),
    ("Low Density", "large"),
    ("High Density", "medium"),
    ("Medium Density", "medium"),
    ("Low Density", "medium"),
)


def test_score_volume_qrm_inserts_match_reference_scorer(qrm_dicom_dir) -> None:
    import csv

    from scoring.series import load_series

    volume = load_series(qrm_dicom_dir)
    with open(qrm_dicom_dir.parent / "reference-agatston-molloilab.csv", newline="") as stream:
        reference = {row["inserts"]: row for row in csv.DictReader(stream)}
    # The reference CSV's factor is in mg/mm³/HU; ScoringParameters takes mg/cm³/HU.
    factor = float(reference["High Density"]["mass_cal_factor"]) * 1000.0
    labels = np.zeros(volume.shape, dtype=np.uint8)
    box = np.zeros(volume.shape, dtype=bool)
    box[QRM_INSERT_BOX] = True
    labels[box & (volume.hu >= 130)] = LAD

    result = score_volume(volume, labels, ScoringParameters(mass_calibration_factor=factor))

    inserts = sorted(result.lesions, key=lambda lesion: lesion.volume_mm3, reverse=True)[:6]
    for lesion, (density, size) in zip(inserts, QRM_INSERTS_BY_VOLUME):
        expected_agatston = float(reference[density][f"calculated_agat_{size}"])
        expected_mass = float(reference[density][f"calculated_mass_{size}"])
        # An independent threshold scorer (MolloiLab) on the same scan: the per-insert
        # Agatston scores and masses measured here agree within 4 %, so 5 % is the bound.
        assert lesion.agatston == pytest.approx(expected_agatston, rel=0.05), (density, size)
        assert lesion.mass_mg == pytest.approx(expected_mass, rel=0.05), (density, size)


def test_score_volume_boolean_labels_raise() -> None:
    hu, labels = blank()

    # A boolean mask names no artery, so it is rejected rather than read as LAD.
    with pytest.raises(LabelError, match="data type bool"):
        score_volume(make_volume(hu), labels > 0)


def test_scored_voxel_labels_small_lesion_and_padding_excluded() -> None:
    hu, labels = blank(slices=2)
    hu[0, 2:4, 2:4] = 450.0  # LAD, 4 pixels = 4 mm²: scored
    labels[0, 2:4, 2:4] = LAD
    hu[0, 8, 8] = 450.0  # RCA, 1 pixel = 1 mm²: scored at the default 1 mm² minimum
    labels[0, 8, 8] = RCA
    hu[1, 5, 5:7] = 300.0  # LCX, 2 pixels = 0.5 mm² at 0.5 mm spacing below: dropped there
    labels[1, 5, 5:7] = LCX
    hu[1, 9, 9] = 500.0  # OTHER_CALCIUM: never an artery voxel
    labels[1, 9, 9] = OTHER_CALCIUM
    hu[1, 0, 0] = 600.0  # LAD on padding: never scored
    labels[1, 0, 0] = LAD
    padding = np.zeros(hu.shape, dtype=bool)
    padding[1, 0, 0] = True

    scored = scored_voxel_labels(make_volume(hu, padding_mask=padding), labels)
    assert scored.dtype == np.uint8
    assert np.count_nonzero(scored == LAD) == 4
    assert np.count_nonzero(scored == LCX) == 2
    assert np.count_nonzero(scored == RCA) == 1
    assert np.count_nonzero(scored == OTHER_CALCIUM) == 0
    assert scored[1, 0, 0] == 0

    # At 0.5 × 0.5 mm pixels the 1-pixel RCA (0.25 mm²) and 2-pixel LCX (0.5 mm²) lesions
    # fall below 1 mm²; the 4-pixel LAD lesion is 4 × 0.25 = 1.0 mm², kept (inclusive).
    fine = scored_voxel_labels(make_volume(hu, pixel_spacing=(0.5, 0.5), padding_mask=padding), labels)
    assert np.count_nonzero(fine == LAD) == 4
    assert np.count_nonzero(fine == LCX) == 0
    assert np.count_nonzero(fine == RCA) == 0


def test_scored_voxel_labels_matches_volume_score() -> None:
    hu, labels = three_slice_lesion()
    volume = make_volume(hu)

    scored = scored_voxel_labels(volume, labels)
    result = score_volume(volume, labels)

    # 13 scored voxels × 1 mm² × 3 mm = 39 mm³, the LAD volume score.
    assert np.count_nonzero(scored == LAD) == 13
    assert np.count_nonzero(scored) * volume.voxel_volume_mm3 == result.volume_mm3["LAD"]
