"""Tests of the digital calcium phantom: determinism, exact truth, QRM geometry, labels and scribbles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from scoring.agatston import score_volume
from scoring.config import CALCIUM_THRESHOLD_HU
from scoring.labels import read_label_map
from scoring.phantom import (
    PIXEL_PADDING_VALUE,
    REGION_OTHER_CAR,
    REGION_TRAINING_CLASSES,
    REGION_UNLABELLED,
    generate_phantom,
    make_case,
    reconstruction_circle_padding,
)
from scoring.phantom_anatomy import Grid
from scoring.phantom_calcium import Plaque, clear_of_bone
from scoring.phantom_qrm import CALIBRATION_FACTOR, insert_hu
from scoring.protocol import ENHANCED_POOL_RADIUS_MM, largest_enhanced_region
from scoring.result import LAD, OTHER_CALCIUM, RCA
from scoring.series import load_series
from scoring.volume import PADDING_HU

# Small cases keep the file fast: 128² slices take about 0.05 s, 256² about 0.2 s.
SMALL = {"size": 128, "slices": 10}


def test_make_case_same_seed_identical_arrays() -> None:
    first = make_case(7, **SMALL)
    second = make_case(7, **SMALL)

    assert first.hu.tobytes() == second.hu.tobytes()
    assert first.labels.tobytes() == second.labels.tobytes()
    assert first.regions.tobytes() == second.regions.tobytes()
    assert first.series_instance_uid == second.series_instance_uid
    assert first.sop_instance_uids == second.sop_instance_uids
    assert first.description == second.description


def test_make_case_other_seed_differs() -> None:
    first = make_case(7, **SMALL)
    other = make_case(8, **SMALL)

    assert first.hu.tobytes() != other.hu.tobytes()
    assert first.series_instance_uid != other.series_instance_uid


def test_generate_phantom_same_seed_same_files(tmp_path: Path) -> None:
    options = {"size": 128, "slices": 4, "burden": "severe"}
    first = generate_phantom(tmp_path / "a", 21, **options)
    generate_phantom(tmp_path / "b", 21, **options)

    names_a = sorted(p.name for p in (tmp_path / "a" / "dicom").iterdir())
    names_b = sorted(p.name for p in (tmp_path / "b" / "dicom").iterdir())
    assert names_a == names_b
    assert len(names_a) == 4
    assert names_a[0] == f"{sorted(first.sop_instance_uids)[0]}.dcm"
    for name in names_a:
        assert (tmp_path / "a" / "dicom" / name).read_bytes() == (tmp_path / "b" / "dicom" / name).read_bytes()
    assert (tmp_path / "a" / "truth.json").read_text() == (tmp_path / "b" / "truth.json").read_text()


def test_generate_phantom_loaded_series_scores_equal_truth(tmp_path: Path) -> None:
    # Seed 1 with the severe burden puts LAD and RCA calcium into these 12 slices,
    # so the comparison is not 0 == 0 (the asserts below check that).
    case = generate_phantom(tmp_path, 1, size=256, slices=12, burden="severe")

    volume = load_series(tmp_path / "dicom")
    labels = read_label_map(tmp_path / "labels.nrrd", volume)
    scored = score_volume(volume, labels).to_json()
    truth = json.loads((tmp_path / "truth.json").read_text())
    phantom_description = truth.pop("phantom")

    assert scored == truth
    assert truth["agatston"]["LAD"] > 0
    assert truth["agatston"]["RCA"] > 0
    assert truth["flags"] == []
    assert truth["mass_calibrated"] is True
    assert truth["series_instance_uid"] == case.series_instance_uid
    assert phantom_description["seed"] == 1
    assert np.array_equal(volume.hu, case.hu)
    assert np.array_equal(labels, case.labels)
    assert np.array_equal(read_label_map(tmp_path / "regions.nrrd", volume), case.regions)


@pytest.mark.parametrize("seed", [0, 2000])
def test_phantom_has_no_enhanced_blood(seed: int) -> None:
    # The phantom is unenhanced: its thickest region of 180–700 HU is cancellous
    # bone, well below the sphere that marks a contrast-enhanced blood pool.
    case = make_case(seed)
    region = largest_enhanced_region(case.hu, (case.slice_thickness, *case.pixel_spacing))
    assert region is not None
    assert region.radius_mm < ENHANCED_POOL_RADIUS_MM - 5.0
    assert 180.0 <= region.median_hu <= 700.0


def test_generate_phantom_series_stores_acquisition(tmp_path: Path) -> None:
    case = generate_phantom(tmp_path, 3, size=128, slices=3)
    path = tmp_path / "dicom" / f"{case.sop_instance_uids[0]}.dcm"
    dataset = pydicom.dcmread(path)

    assert dataset.KVP == 120
    assert dataset.SliceThickness == 3
    assert dataset.RescaleIntercept == -1024
    assert dataset.RescaleSlope == 1
    assert dataset.PixelRepresentation == 1
    assert dataset.PixelPaddingValue == PIXEL_PADDING_VALUE
    assert dataset.BodyPartExamined == "HEART"
    assert "ContrastBolusAgent" not in dataset
    # Pixel (0, 0) is a corner, outside the reconstruction circle.
    assert dataset.pixel_array[0, 0] == PIXEL_PADDING_VALUE
    assert dataset.CalciumScoringMassFactorDevice[0] == pytest.approx(0.743, abs=1e-6)


def test_generate_phantom_existing_series_raises(tmp_path: Path) -> None:
    generate_phantom(tmp_path, 3, size=128, slices=2)

    with pytest.raises(FileExistsError, match="already contains files"):
        generate_phantom(tmp_path, 4, size=128, slices=2)


def test_make_case_zero_calcium_scores_zero() -> None:
    case = make_case(5, zero_calcium=True, **SMALL)
    result = score_volume(case.to_volume(), case.labels)

    assert not np.isin(case.labels, [1, 2, 3]).any()
    for key in ("LAD", "LCX", "RCA", "total"):
        assert result.agatston[key] == 0.0
        assert result.volume_mm3[key] == 0.0
        assert result.mass_mg[key] == 0.0
    assert result.risk_category == "I"
    assert result.cac_drs == "A0"
    assert result.lesions == ()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_make_case_labels_only_at_calcium_threshold(seed: int) -> None:
    case = make_case(seed, burden="severe", **SMALL)
    labelled = case.labels > 0

    assert labelled.sum() > 0
    assert case.hu[labelled].min() >= CALCIUM_THRESHOLD_HU
    assert case.labels.max() <= OTHER_CALCIUM


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_make_case_scribbles_avoid_other_artery_calcium(seed: int) -> None:
    case = make_case(seed, burden="severe", size=256, slices=16)
    coronary = (case.labels >= LAD) & (case.labels <= RCA)
    regions_at_calcium = case.regions[coronary]

    assert coronary.sum() > 0
    # A coronary calcium voxel is either unlabelled or scribbled with its own artery.
    allowed = (regions_at_calcium == REGION_UNLABELLED) | (regions_at_calcium == case.labels[coronary])
    assert allowed.all()
    assert not (regions_at_calcium == REGION_OTHER_CAR).any()


def test_make_case_regions_use_documented_values() -> None:
    case = make_case(2, burden="severe", size=256, slices=16)
    values = set(np.unique(case.regions).tolist())

    assert values <= {REGION_UNLABELLED, 1, 2, 3, REGION_OTHER_CAR}
    assert REGION_OTHER_CAR in values
    assert values & {1, 2, 3}
    assert REGION_TRAINING_CLASSES == {1: 1, 2: 2, 3: 3, REGION_OTHER_CAR: 0}
    # Padding is never annotated.
    assert (case.regions[case.padding_mask] == REGION_UNLABELLED).all()


def test_make_case_padding_outside_reconstruction_circle() -> None:
    case = make_case(4, **SMALL)
    circle_padding = reconstruction_circle_padding(128)

    assert np.array_equal(case.padding_mask[0], circle_padding)
    assert (case.hu[case.padding_mask] == PADDING_HU).all()
    # Every slice is padded in its corners and not at its centre.
    assert case.padding_mask[:, 0, 0].all()
    assert not case.padding_mask[:, 64, 64].any()
    inside = case.hu[~case.padding_mask]
    assert inside.min() >= -1024.0
    assert inside.max() <= 3071.0
    assert np.array_equal(inside, np.rint(inside))


def test_make_case_full_size_uses_clinical_spacing() -> None:
    case = make_case(9, size=512, slices=2)

    assert case.shape == (2, 512, 512)
    assert 0.35 <= case.pixel_spacing[0] <= 0.8
    assert case.pixel_spacing[0] == case.pixel_spacing[1]
    assert case.slice_increment == 3.0


def test_make_case_unknown_mode_raises() -> None:
    with pytest.raises(ValueError, match="mode is 'ct'; expected one of patient, qrm"):
        make_case(1, mode="ct")


@pytest.mark.parametrize("slices", [0, 1, 201])
def test_make_case_slices_out_of_range_raises(slices: int) -> None:
    # 2 is scoring.slice_geometry.MIN_SLICES: load_series rejects a 1-slice series.
    with pytest.raises(ValueError, match=f"slices is {slices}; expected 2–200 because the series loader needs"):
        make_case(1, slices=slices)


def test_make_case_negative_seed_raises() -> None:
    with pytest.raises(ValueError, match="seed is -1; expected a non-negative integer"):
        make_case(-1, **SMALL)


def test_make_case_unknown_burden_raises() -> None:
    with pytest.raises(ValueError, match="burden is 'huge'"):
        make_case(1, burden="huge", **SMALL)


def test_make_case_qrm_with_patient_option_raises() -> None:
    with pytest.raises(ValueError, match="zero_calcium apply to the patient mode only"):
        make_case(1, mode="qrm", zero_calcium=True)


def _expected_threshold_scores(density: float, diameter: float, spacing: float, psf_sigma: float
                               ) -> tuple[float, float]:
    """Threshold volume (mm³) and mass (mg) of one insert under a noise-free partial-volume model.

    In-plane, the insert is a disc blurred by the Gaussian point spread function
    and averaged over a pixel, computed on a 0.02 mm grid. Along z, each insert
    starts on a slice boundary, so slice k contains min(3, L − 3k) mm of it
    (fill 1 and 2/3 for the 5 mm insert, 1 for the 3 mm insert). A point counts
    when insert HU × fill × in-plane fraction ≥ 130 HU. Mass is the sum of HU ×
    volume × the calibration factor over the counted points.
    """
    step = 0.02
    radius = diameter / 2
    extent = radius + 4 * psf_sigma + 2 * spacing
    axis = np.arange(-extent, extent + step / 2, step)
    x, y = np.meshgrid(axis, axis)
    fraction = (x ** 2 + y ** 2 <= radius ** 2).astype(float)
    fraction = ndimage.gaussian_filter(fraction, psf_sigma / step, mode="constant")
    fraction = ndimage.uniform_filter(fraction, size=int(round(spacing / step)), mode="constant")

    volume = mass = 0.0
    remaining = diameter
    while remaining > 0:
        hu = insert_hu(density) * min(remaining, 3.0) / 3.0 * fraction
        counted = hu >= CALCIUM_THRESHOLD_HU
        volume += counted.sum() * step * step * 3.0
        mass += hu[counted].sum() * step * step * 3.0 / 1000.0 * CALIBRATION_FACTOR
        remaining -= 3.0
    return volume, mass


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_make_case_qrm_volumes_match_geometry(seed: int) -> None:
    case = make_case(seed, mode="qrm", slices=12)
    inserts = [i for i in case.extra_truth["inserts"] if i["diameter_mm"] >= 3.0]

    assert len(inserts) == 6
    for insert in inserts:
        density, diameter = insert["density_mg_cm3"], insert["diameter_mm"]
        geometric = math.pi * (diameter / 2) ** 2 * diameter
        assert insert["true_volume_mm3"] == pytest.approx(geometric, abs=1e-3)
        assert insert["true_mass_mg"] == pytest.approx(geometric * density / 1000, abs=1e-3)

        # Tolerance 10 %, 15 % at 200 mg: noise of 10–25 HU moves edge pixels
        # across the threshold, most at 200 mg, where the edge pixels sit near
        # 130 HU. A disc of radius 1.5 mm covers only about 28 pixels of 0.5 mm,
        # so a few pixels more or less are 5–10 % of its area.
        tolerance = 0.15 if density == 200.0 else 0.10
        volume, mass = _expected_threshold_scores(density, diameter, case.pixel_spacing[0],
                                                  case.description["psf_sigma_mm"])
        assert insert["threshold_volume_mm3"] == pytest.approx(volume, rel=tolerance), (density, diameter)
        assert insert["threshold_mass_mg"] == pytest.approx(mass, rel=tolerance), (density, diameter)

        # Against the geometry: whole 3 mm slices (6 mm for the 5 mm insert)
        # and blooming by the point spread function enlarge dense inserts up to
        # about twice, while the 200 mg inserts lose edge pixels below 130 HU.
        assert 0.8 * geometric <= insert["threshold_volume_mm3"] <= 2.1 * geometric, (density, diameter)
        if density >= 400.0:
            # Partial volume conserves mass while voxels stay above 130 HU.
            assert insert["threshold_mass_mg"] == pytest.approx(insert["true_mass_mg"], rel=0.2), (density, diameter)


def test_make_case_qrm_labels_group_inserts_by_density() -> None:
    case = make_case(0, mode="qrm", slices=12)
    result = score_volume(case.to_volume(), case.labels)
    inserts = case.extra_truth["inserts"]

    for label, artery in ((1, "LAD"), (2, "LCX"), (3, "RCA")):
        group = [i for i in inserts if i["label"] == label]
        labelled_volume = float((case.labels == label).sum() * case.to_volume().voxel_volume_mm3)
        assert labelled_volume == pytest.approx(sum(i["threshold_volume_mm3"] for i in group), abs=1e-3)
        assert result.volume_mm3[artery] > 0
    # Each 3D lesion of the 800 mg group is one insert. The 1 mm insert may fall
    # under the lesion list's minimum, so only the 3 and 5 mm inserts are compared.
    lesion_volumes = sorted(lesion.volume_mm3 for lesion in result.lesions if lesion.artery == "RCA")
    insert_volumes = sorted(i["threshold_volume_mm3"] for i in inserts if i["label"] == 3 and i["diameter_mm"] >= 3)
    assert lesion_volumes[-2:] == pytest.approx(insert_volumes, abs=1e-3)


def test_clear_of_bone_rejects_plaque_touching_bone() -> None:
    grid = Grid(x=np.arange(40) * 0.5, y=np.arange(40) * 0.5, z=np.array([0.0, 3.0, 6.0]),
                spacing=0.5, slice_thickness=3.0)
    volume = np.full(grid.shape, 40.0, dtype=np.float32)
    # Bone (700 HU) in columns 30–39, that is x ≥ 15 mm, on every slice.
    volume[:, :, 30:] = 700.0
    near_bone = Plaque(LAD, "LAD", np.array([[13.5, 10.0, 3.0]]), 1.0, 500.0)
    far_from_bone = Plaque(LAD, "LAD", np.array([[5.0, 10.0, 3.0]]), 1.0, 500.0)

    # 13.5 mm + 1 mm radius + 1.5 mm margin reaches 16 mm, inside the bone.
    assert clear_of_bone(volume, grid, near_bone) is False
    # 5 mm + 2.5 mm reaches 7.5 mm, far from x = 15 mm.
    assert clear_of_bone(volume, grid, far_from_bone) is True


def test_make_case_qrm_rod_labelled_other_calcium() -> None:
    case = make_case(0, mode="qrm", slices=40, size=256)
    rod = case.labels == OTHER_CALCIUM
    result = score_volume(case.to_volume(), case.labels)

    # The 10 mm rod spans 30 mm: ten slices, each with about 78.5 mm² of calcium.
    assert rod.any(axis=(1, 2)).sum() == 10
    assert case.hu[rod].min() >= CALCIUM_THRESHOLD_HU
    assert case.description["label_meaning"]["4"] == "calibration rod, 200 mg HA/cm3"
    # Label 4 never enters the scores: the total equals the three density groups.
    assert result.volume_mm3["total"] == pytest.approx(
        result.volume_mm3["LAD"] + result.volume_mm3["LCX"] + result.volume_mm3["RCA"])


@pytest.mark.parametrize("motion", [False, True])
def test_make_case_labels_cover_whole_components(motion: bool) -> None:
    # Without noise and metal, every 26-connected component of voxels ≥ 130 HU
    # is either one labelled calcification or unlabelled anatomy (bone), never
    # a calcification whose edge or motion smear was left unlabelled.
    for seed in (0, 1, 2):
        case = make_case(seed, burden="severe", size=256, slices=16, noise_hu=0.0, metal=False, motion=motion)
        components, _ = ndimage.label(case.hu >= CALCIUM_THRESHOLD_HU, np.ones((3, 3, 3), bool))
        labelled = np.unique(components[case.labels > 0])
        partly = [c for c in labelled if (case.labels[components == c] == 0).any()]

        assert len(labelled) > 0
        assert partly == [], (seed, motion)
        if motion:
            # Seeds 0–2 blur slices that contain calcium, so the smear is exercised.
            assert any((case.labels[index] > 0).any() for index in case.description["motion_slices"])
