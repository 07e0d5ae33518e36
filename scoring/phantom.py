"""Digital calcium-scoring phantom: a synthetic non-contrast cardiac CT series with exact ground truth.

`make_case(seed)` builds one case in memory and `generate_phantom(out_dir, seed)`
writes it for the node and its tests:

    OUT_DIR/dicom/        the CT series, one CT Image Storage file per slice
    OUT_DIR/labels.nrrd   CAC labels in the series geometry
    OUT_DIR/regions.nrrd  weak coronary artery region (CAR) annotations
    OUT_DIR/truth.json    `score_volume` of the stored HU and the true labels
                          (the keys of `cacs-node score --json`), plus a
                          "phantom" object that describes the case

Everything is drawn from `numpy.random.default_rng(seed)`, so a seed gives
identical arrays, identical DICOM UIDs and an identical truth.json.
NOTE: that holds for one numpy version on one platform. Another numpy build
may round a transcendental function differently in the last bit, which can
move an edge voxel across a whole HU.

CAC label values (labels.nrrd), as in `scoring.result`: 0 background, 1 LAD
(including the left main), 2 LCX, 3 RCA, 4 non-coronary calcium (aortic wall,
aortic valve, mitral annulus), which scoring ignores. A voxel is labelled
when it belongs to a plaque's footprint and its stored HU is ≥ 130, so the
labels hold only voxels that the Agatston threshold sees. In the QRM mode
the labels 1, 2 and 3 mark the 200, 400 and 800 mg HA/cm³ inserts instead of
arteries.

Region values (regions.nrrd): 0 unlabelled (the region loss ignores it),
1 LAD (with LM), 2 LCX, 3 RCA, 5 OTHER_CAR (outside every coronary artery
region). `REGION_TRAINING_CLASSES` maps them to the model's region classes
(0 OTHER_CAR, 1 LAD, 2 LCX, 3 RCA). A scribble never covers calcium of
another artery. The QRM mode has no regions (all 0).

Acquisition: 512 × 512 pixels (configurable), field of view drawn so the
pixel spacing lies in 0.35–0.8 mm, contiguous 3 mm slices, 120 kVp, stored as
signed int16 with RescaleIntercept −1024 and slope 1, HU clipped to
[−1024, 3071], PixelPaddingValue −2000 outside the reconstruction circle,
BodyPartExamined HEART, no contrast agent. The series carries the phantom's
exact mass calibration factor in Calcium Scoring Mass Factor Device
(0018,9352), so truth.json holds calibrated masses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, CTImageStorage, generate_uid
from scipy import ndimage

from scoring.config import DEFAULT_MASS_CALIBRATION_FACTOR
from scoring.fileio import atomic_writer
from scoring.phantom_anatomy import Anatomy, Grid, paint_ribs, paint_slice, render_template, rib_ring, sample_anatomy
from scoring.phantom_calcium import (
    BURDEN_CLASSES,
    Plaque,
    PlaqueFootprint,
    blur_reach_mm,
    choose_burden,
    clear_of_bone,
    label_plaque,
    paint_plaque,
    sample_coronary_plaques,
    sample_extra_coronary_plaques,
    widen_footprint,
)
from scoring.phantom_regions import REGION_OTHER_CAR, REGION_UNLABELLED, draw_regions
from scoring.slice_geometry import MIN_SLICES
from scoring.volume import PADDING_HU, CTVolume

logger = logging.getLogger(__name__)

__all__ = [
    "PhantomCase",
    "make_case",
    "generate_phantom",
    "REGION_UNLABELLED",
    "REGION_OTHER_CAR",
    "REGION_VALUES",
    "REGION_TRAINING_CLASSES",
    "MODES",
]

#: Region map values by name.
REGION_VALUES: dict[str, int] = {"UNLABELLED": REGION_UNLABELLED, "LAD": 1, "LCX": 2, "RCA": 3,
                                 "OTHER_CAR": REGION_OTHER_CAR}

#: Region map value → region class of the model (0 OTHER_CAR, 1 LAD, 2 LCX, 3 RCA).
#: Unlabelled pixels (0) are absent: they carry no class.
REGION_TRAINING_CLASSES: dict[int, int] = {1: 1, 2: 2, 3: 3, REGION_OTHER_CAR: 0}

#: Generation modes: a patient-like chest, or a QRM-style calibration phantom.
MODES = ("patient", "qrm")

#: Stored value of pixels outside the reconstruction circle (HU −3024 after rescale).
PIXEL_PADDING_VALUE = -2000

#: Rescale of the stored int16 values: HU = stored + RESCALE_INTERCEPT.
RESCALE_INTERCEPT = -1024.0

#: HU range a 12-bit CT reconstruction stores; values beyond it are clipped.
HU_RANGE = (-1024.0, 3071.0)

#: The phantom's mass calibration factor (mg HA per cm³ per HU) as (0018,9352) stores it:
#: the attribute's VR is FL, so the value is the float32 nearest to the configured default.
MASS_CALIBRATION_FACTOR = float(np.float32(DEFAULT_MASS_CALIBRATION_FACTOR))

SLICE_THICKNESS_MM = 3.0
KVP = 120.0
DEFAULT_SLICES = 48
DEFAULT_QRM_SLICES = 40
FIELD_OF_VIEW_MM = (0.35 * 512, 0.8 * 512)

#: Range of the standard deviation (mm) of the in-plane Gaussian point spread function
#: applied to calcium, which makes dense calcium bloom. It is an estimate for soft
#: calcium-scoring kernels, not a measured kernel.
PSF_SIGMA_MM = (0.3, 0.7)

#: Range of the length (mm) of the in-plane motion path that blurs the heart on a few slices.
MOTION_BLUR_MM = (1.5, 4.0)


@dataclass(frozen=True)
class PhantomCase:
    """One phantom series in memory.

    hu: float32 (slices, rows, columns) in volume order, exactly the HU the
        written series decodes to. Pixels outside the reconstruction circle
        are PADDING_HU and True in `padding_mask`.
    labels: uint8 CAC labels. regions: uint8 CAR annotations (values in the module docstring).
    pixel_spacing: (row spacing, column spacing) in mm.
    positions: ImagePositionPatient of each slice, (slices, 3), in mm.
    mass_calibration_factor: mg HA per cm³ per HU, also written to (0018,9352).
    description: JSON-ready parameters of the case (seed, mode, burden, noise, ...).
    uid_seed: text from which every UID of the case is derived.
    """

    seed: int
    mode: str
    hu: np.ndarray
    padding_mask: np.ndarray
    labels: np.ndarray
    regions: np.ndarray
    pixel_spacing: tuple[float, float]
    positions: np.ndarray
    slice_thickness: float
    mass_calibration_factor: float
    description: dict[str, Any]
    uid_seed: str
    uid_prefix: str = PYDICOM_ROOT_UID
    body_part_examined: str = "HEART"
    series_description: str = "Calcium score 3.0 mm (digital phantom)"
    extra_truth: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def slice_increment(self) -> float:
        if len(self.positions) < 2:
            return self.slice_thickness
        return float(self.positions[1, 2] - self.positions[0, 2])

    def _uid(self, purpose: str) -> str:
        return str(generate_uid(prefix=self.uid_prefix, entropy_srcs=[self.uid_seed, purpose]))

    @property
    def study_instance_uid(self) -> str:
        return self._uid("study")

    @property
    def series_instance_uid(self) -> str:
        return self._uid("series")

    @property
    def frame_of_reference_uid(self) -> str:
        return self._uid("frame-of-reference")

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(self._uid(f"instance-{index}") for index in range(self.shape[0]))

    def to_volume(self, headers: tuple[Dataset, ...] = ()) -> CTVolume:
        """Return the case as the CTVolume that `load_series` builds from its written series.

        headers: empty by default. Writers that copy the Patient and Study
        modules need the datasets of `build_datasets` without PixelData.
        """
        return CTVolume(
            hu=self.hu,
            padding_mask=self.padding_mask,
            origin=self.positions[0].copy(),
            row_direction=np.array([1.0, 0.0, 0.0]),
            column_direction=np.array([0.0, 1.0, 0.0]),
            slice_direction=np.array([0.0, 0.0, 1.0]),
            pixel_spacing=self.pixel_spacing,
            slice_increment=self.slice_increment,
            slice_thickness=self.slice_thickness,
            kvp=KVP,
            positions=self.positions.copy(),
            series_instance_uid=self.series_instance_uid,
            study_instance_uid=self.study_instance_uid,
            frame_of_reference_uid=self.frame_of_reference_uid,
            sop_class_uid=CTImageStorage,
            sop_instance_uids=self.sop_instance_uids,
            headers=headers,
            mass_calibration_factor=self.mass_calibration_factor,
        )

    def build_datasets(self) -> list[Dataset]:
        """Build the CT Image Storage datasets of the series (PS3.3 A.3) with `scoring.ct_builder`."""
        from scoring.ct_builder import build_ct_datasets

        return build_ct_datasets(
            self.hu,
            pixel_spacing=self.pixel_spacing,
            positions=self.positions,
            rescale_slope=1.0,
            rescale_intercept=RESCALE_INTERCEPT,
            padding_mask=self.padding_mask,
            padding_value=PIXEL_PADDING_VALUE,
            kvp=KVP,
            slice_thickness=self.slice_thickness,
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            frame_of_reference_uid=self.frame_of_reference_uid,
            sop_instance_uids=self.sop_instance_uids,
            uid_prefix=self.uid_prefix,
            patient_name="PHANTOM^CACS",
            patient_id=f"CACS-PHANTOM-{self.mode.upper()}-{self.seed}",
            study_id=str(self.seed)[:16],
            series_description=self.series_description,
            body_part_examined=self.body_part_examined,
            patient_position="HFS",
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            manufacturer="cacs-node digital phantom",
            mass_calibration_factor=self.mass_calibration_factor,
        )


# ---------------------------------------------------------------------------
# Acquisition geometry


def _slice_grid(rng: np.random.Generator, size: int, slices: int, pixel_spacing: float | None
                ) -> tuple[float, np.ndarray, float]:
    """Draw pixel spacing, body-frame slice heights and the table offset along z.

    Returns (spacing, z of each slice in body coordinates, table z offset in mm).
    The DICOM slice positions (body z + offset) are multiples of 0.25 mm, which
    decimal strings store exactly, so `load_series` reads back the same floats.
    """
    if pixel_spacing is None:
        field_of_view = rng.uniform(*FIELD_OF_VIEW_MM)
        spacing = round(field_of_view / size, 4)
    else:
        spacing = float(pixel_spacing)
    coverage = slices * SLICE_THICKNESS_MM
    first_body_z = -0.55 * coverage + rng.uniform(-6.0, 6.0)
    first_table_z = round(rng.uniform(-250.0, 50.0) * 4) / 4
    body_z = first_body_z + SLICE_THICKNESS_MM * np.arange(slices)
    return spacing, body_z, first_table_z - first_body_z


def _in_plane_grid(rng: np.random.Generator, anatomy: Anatomy, size: int, spacing: float,
                   body_z: np.ndarray) -> tuple[Grid, tuple[float, float]]:
    """Centre the reconstruction on the heart for a small field of view, on the body for a large one.

    Returns the grid in body coordinates and the (x, y) of the first pixel in
    patient coordinates, rounded to 0.01 mm.
    """
    field_of_view = size * spacing
    body_width = 2 * anatomy.body_semi_axes[0] + 20
    weight = float(np.clip((body_width - field_of_view) / max(body_width - 200.0, 1.0), 0.0, 1.0))
    centre = weight * anatomy.heart.centre[:2] + rng.normal(0, 4, 2)
    patient_offset = rng.uniform(-25, 25, 2)
    first = centre - (size - 1) / 2 * spacing
    first_patient = np.round(first + patient_offset, 2)
    first = first_patient - patient_offset
    steps = np.arange(size) * spacing
    grid = Grid(x=first[0] + steps, y=first[1] + steps, z=body_z, spacing=spacing,
                slice_thickness=SLICE_THICKNESS_MM)
    return grid, (float(first_patient[0]), float(first_patient[1]))


def reconstruction_circle_padding(size: int) -> np.ndarray:
    """(size, size) bool: True outside the reconstruction circle inscribed in the image."""
    centre = (size - 1) / 2
    rows, columns = np.ogrid[:size, :size]
    return (rows - centre) ** 2 + (columns - centre) ** 2 > (size / 2) ** 2


# ---------------------------------------------------------------------------
# Artifacts and noise


def _line_kernel(length_px: float, angle: float) -> np.ndarray:
    """Normalised 2D kernel of a straight motion path of `length_px` pixels at `angle` radians."""
    half = int(np.ceil(length_px / 2))
    kernel = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float32)
    for t in np.linspace(-length_px / 2, length_px / 2, max(int(length_px * 3), 2)):
        kernel[int(round(half + t * np.sin(angle))), int(round(half + t * np.cos(angle)))] += 1.0
    return kernel / kernel.sum()


def _apply_motion(volume: np.ndarray, grid: Grid, anatomy: Anatomy, rng: np.random.Generator,
                  footprints: list[PlaqueFootprint]) -> list[int]:
    """Blur the heart along a random direction on a few slices, as cardiac motion does."""
    low, high = anatomy.heart.z_extent(0.0)
    candidates = np.nonzero((grid.z >= low) & (grid.z <= high))[0]
    if len(candidates) == 0:
        return []
    start = int(rng.choice(candidates))
    blurred = [int(i) for i in range(start, min(start + int(rng.integers(1, 4)), len(grid.z)))]
    length_px = rng.uniform(*MOTION_BLUR_MM) / grid.spacing
    kernel = _line_kernel(length_px, rng.uniform(0, np.pi))
    box = grid.pixel_box(*anatomy.heart.xy_extent(10.0))
    if box is None:
        return []
    for index in blurred:
        volume[index][box] = ndimage.correlate(volume[index][box], kernel, mode="nearest")
        for footprint in footprints:
            widen_footprint(footprint, index, kernel > 0)
    return blurred


def _metal_points(anatomy: Anatomy, rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "sternal_wires":
        tx, ty = anatomy.sternum_centre
        levels = np.arange(-60.0, 80.0, rng.uniform(22, 32)) + rng.uniform(0, 20)
        points = [[tx + side * rng.uniform(5, 9), ty + rng.uniform(-3, 3), z]
                  for z in levels for side in (-1.0, 1.0)]
        return np.array(points)
    # Pacemaker lead: down the superior vena cava into the right ventricle.
    vena_cava = anatomy.great_vessels["superior_vena_cava"].points
    apex = anatomy.heart.surface_point(0.6, 0.5, -14.0)
    path = np.array([vena_cava[-1], vena_cava[0], 0.5 * (vena_cava[0] + apex) + [0, -5, 0], apex])
    fine = [path[0]]
    for a, b in zip(path[:-1], path[1:]):
        count = int(np.ceil(np.linalg.norm(b - a) / 0.5))
        fine.extend(a + (b - a) * (np.arange(1, count + 1)[:, None] / count))
    return np.array(fine)


def _apply_metal(volume: np.ndarray, grid: Grid, anatomy: Anatomy, rng: np.random.Generator,
                 kind: str) -> list[int]:
    """Draw metal (sternal wires or a pacemaker lead) with bright and dark streaks around it."""
    points = _metal_points(anatomy, rng, kind)
    affected = []
    x = grid.x[None, :].astype(np.float32)
    y = grid.y[:, None].astype(np.float32)
    for index, z in enumerate(grid.z):
        near = points[np.abs(points[:, 2] - z) <= grid.slice_thickness / 2]
        # One streak source per wire crossing: at most two sources at least 5 mm apart.
        sources: list[np.ndarray] = []
        for point in near:
            if len(sources) < 2 and all(np.hypot(*(point[:2] - kept[:2])) > 5.0 for kept in sources):
                sources.append(point)
        if not sources:
            continue
        affected.append(index)
        image = volume[index]
        for px, py, _ in sources:
            dx = x - np.float32(px)
            dy = y - np.float32(py)
            distance = np.sqrt(dx * dx + dy * dy)
            streaks = np.zeros(image.shape, dtype=np.float32)
            for _ in range(int(rng.integers(4, 9))):
                direction = rng.uniform(0, np.pi)
                across = dx * np.float32(np.sin(direction)) - dy * np.float32(np.cos(direction))
                amplitude = rng.choice([-1.0, 1.0]) * rng.uniform(80, 350)
                width = rng.uniform(0.8, 2.0)
                streaks += np.float32(amplitude) * np.exp(-np.square(across / np.float32(width)))
            image += streaks * np.exp(-distance / np.float32(70.0))
            image[distance <= 0.9] = 3000.0
    return affected


def _add_noise(volume: np.ndarray, rng: np.random.Generator, sigma: float) -> None:
    """Add correlated Gaussian noise with standard deviation `sigma` HU, in place.

    TODO(#2): the noise is stationary, while real low-dose CT noise grows behind
    strongly attenuating paths (shoulders, spine) and streaks along them.

    White noise is smoothed in-plane by the separable kernel [0.5, 1, 0.5] on
    rows and on columns, which gives CT-like fine-grained texture. Each pass
    multiplies the variance by 1.5, so the amplitude is divided by 1.5 to keep
    sigma. Border rows and columns keep a slightly lower variance.
    """
    noise = rng.standard_normal(volume.shape, dtype=np.float32)
    rows_smoothed = np.empty_like(noise)
    rows_smoothed[:, [0, -1], :] = noise[:, [0, -1], :]
    middle = rows_smoothed[:, 1:-1, :]
    np.add(noise[:, :-2, :], noise[:, 2:, :], out=middle)
    middle *= 0.5
    middle += noise[:, 1:-1, :]
    smoothed = noise
    smoothed[:, :, [0, -1]] = rows_smoothed[:, :, [0, -1]]
    middle = smoothed[:, :, 1:-1]
    np.add(rows_smoothed[:, :, :-2], rows_smoothed[:, :, 2:], out=middle)
    middle *= 0.5
    middle += rows_smoothed[:, :, 1:-1]
    smoothed *= np.float32(sigma / 1.5)
    volume += smoothed


def _quantise(volume: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """Round to whole HU, clip to HU_RANGE and set padding to PADDING_HU, as the written series decodes."""
    np.rint(volume, out=volume)
    np.clip(volume, HU_RANGE[0], HU_RANGE[1], out=volume)
    volume[:, padding] = PADDING_HU
    return volume


# ---------------------------------------------------------------------------
# Public API


def _resolve_toggle(value: bool | None, rng: np.random.Generator, probability: float) -> bool:
    draw = bool(rng.uniform() < probability)
    return draw if value is None else bool(value)


def _check_options(seed: int, size: int, slices: int, pixel_spacing: float | None, noise_hu: float | None,
                   burden: str | None) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed is {seed!r}; expected a non-negative integer")
    if not 64 <= size <= 1024:
        raise ValueError(f"size is {size}; expected 64–1024 pixels per side (512 for a clinical series)")
    if not MIN_SLICES <= slices <= 200:
        raise ValueError(
            f"slices is {slices}; expected {MIN_SLICES}–200 because the series loader needs at least "
            f"{MIN_SLICES} slices to measure the slice increment (48 covers the heart at 3 mm)"
        )
    if pixel_spacing is not None and not 0.1 <= pixel_spacing <= 2.0:
        raise ValueError(f"pixel_spacing is {pixel_spacing} mm; expected 0.1–2.0 mm (0.35–0.8 is clinical)")
    if noise_hu is not None and not 0.0 <= noise_hu <= 200.0:
        raise ValueError(f"noise_hu is {noise_hu}; expected a standard deviation of 0–200 HU")
    if burden is not None and burden not in BURDEN_CLASSES:
        raise ValueError(f"burden is {burden!r}; expected one of {', '.join(BURDEN_CLASSES)}")


def make_case(
    seed: int,
    *,
    mode: str = "patient",
    size: int = 512,
    slices: int | None = None,
    pixel_spacing: float | None = None,
    burden: str | None = None,
    zero_calcium: bool = False,
    noise_hu: float | None = None,
    metal: bool | None = None,
    motion: bool | None = None,
    uid_prefix: str = PYDICOM_ROOT_UID,
) -> PhantomCase:
    """Build one phantom case in memory, deterministically for `seed`.

    mode: "patient" (chest anatomy with coronary calcium) or "qrm" (calibration
        phantom with nine hydroxyapatite cylinders; see `scoring.phantom_qrm`).
    size: rows and columns (default 512). With another size the field of view
        stays clinical, so the pixel spacing scales by 512 / size.
    slices: number of contiguous 3 mm slices (default 48, 144 mm around the
        heart; 40 in the QRM mode).
    pixel_spacing: in mm; drawn from the field of view when None.
    burden: coronary calcium class ("zero", "minimal", "mild", "moderate",
        "severe"); drawn when None. zero_calcium=True forces "zero".
    noise_hu: noise standard deviation in HU; drawn (10–35 HU, scaled by body size) when None.
    metal, motion: force metal streaks or motion blur on (True) or off (False);
        drawn per case when None (15 % and 25 % of cases).
    uid_prefix: root of the generated UIDs.

    Returns a PhantomCase. Raises ValueError for an unknown mode, an option out
    of range, or a patient-mode option (burden, zero_calcium, metal, motion) in the QRM mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {', '.join(MODES)}")
    if slices is None:
        slices = DEFAULT_QRM_SLICES if mode == "qrm" else DEFAULT_SLICES
    _check_options(seed, size, slices, pixel_spacing, noise_hu, burden)
    if mode == "qrm":
        patient_options = {"burden": burden, "zero_calcium": zero_calcium or None, "metal": metal, "motion": motion}
        given = [name for name, value in patient_options.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to the patient mode only; the QRM mode has no coronary "
                             "anatomy. Leave them out for mode='qrm'")
        from scoring.phantom_qrm import make_qrm_case

        return make_qrm_case(seed, size=size, slices=slices, pixel_spacing=pixel_spacing,
                             noise_hu=noise_hu, uid_prefix=uid_prefix)

    rng = np.random.default_rng(seed)
    spacing, body_z, table_offset = _slice_grid(rng, size, slices, pixel_spacing)
    anatomy = sample_anatomy(rng, (float(body_z[0]), float(body_z[-1])))
    grid, first_pixel = _in_plane_grid(rng, anatomy, size, spacing, body_z)

    # Anatomy: the z-invariant template, then ribs and the z-dependent structures per slice.
    template = render_template(anatomy, grid)
    ring = rib_ring(anatomy, grid)
    volume = np.empty(grid.shape, dtype=np.float32)
    for index, z in enumerate(grid.z):
        volume[index] = template
        paint_ribs(volume[index], anatomy, ring, float(z))
        paint_slice(volume[index], anatomy, grid, float(z))

    # Calcium: distractors first, then the coronary plaques, kept apart from each other.
    chosen_burden = "zero" if zero_calcium else (burden or choose_burden(rng))
    # Blurred plaques stay apart, so no two footprints overlap, and stay off bone.
    # A footprint reaches the blur reach plus the one-pixel edge and one pixel of margin.
    psf_sigma = float(rng.uniform(*PSF_SIGMA_MM))
    clearance = 1.0 + 2 * (blur_reach_mm(psf_sigma) + 2 * spacing)

    def accept(plaque: Plaque) -> bool:
        return clear_of_bone(volume, grid, plaque, margin_mm=1.5 + blur_reach_mm(psf_sigma) + MOTION_BLUR_MM[1] / 2)

    z_range = (float(body_z[0]), float(body_z[-1]))
    distractors = sample_extra_coronary_plaques(anatomy, chosen_burden, rng, z_range, accept, clearance)
    coronary = sample_coronary_plaques(anatomy, chosen_burden, rng, list(distractors), accept, clearance)
    footprints = [paint_plaque(volume, grid, plaque, psf_sigma, margin_mm=MOTION_BLUR_MM[1] / 2)
                  for plaque in distractors + coronary]

    # Artifacts, noise, and the values the series stores.
    motion_slices = _apply_motion(volume, grid, anatomy, rng, footprints) if _resolve_toggle(motion, rng, 0.25) else []
    metal_kind = "sternal_wires" if rng.uniform() < 0.6 else "pacemaker_lead"
    metal_slices = _apply_metal(volume, grid, anatomy, rng, metal_kind) if _resolve_toggle(metal, rng, 0.15) else []
    sigma = float(noise_hu) if noise_hu is not None else float(rng.uniform(10, 35) * anatomy.body_scale ** 1.5)
    _add_noise(volume, rng, sigma)
    padding_2d = reconstruction_circle_padding(size)
    hu = _quantise(volume, padding_2d)
    padding_mask = np.broadcast_to(padding_2d, hu.shape).copy()

    # Ground truth.
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labelled = [label_plaque(labels, hu, footprint) for footprint in footprints]
    regions = draw_regions(anatomy, grid, labels, padding_mask, rng)

    positions = np.zeros((slices, 3))
    positions[:, 0], positions[:, 1] = first_pixel
    positions[:, 2] = body_z + table_offset
    positions[:, 2] = np.round(positions[:, 2] * 4) / 4

    description = {
        "seed": int(seed),
        "mode": "patient",
        "burden": chosen_burden,
        "pixel_spacing_mm": spacing,
        "field_of_view_mm": round(spacing * size, 2),
        "slices": slices,
        "noise_hu": round(sigma, 2),
        "psf_sigma_mm": round(psf_sigma, 3),
        "motion_slices": motion_slices,
        "metal": metal_kind if metal_slices else None,
        "metal_slices": metal_slices,
        "body_scale": round(anatomy.body_scale, 4),
        "plaques": [dict(p.plaque.to_json(), labelled_voxels=n) for p, n in zip(footprints, labelled)],
    }
    logger.debug("phantom seed %d: burden %s, %d plaques, spacing %.4f mm, noise %.1f HU",
                 seed, chosen_burden, len(footprints), spacing, sigma)
    return PhantomCase(
        seed=int(seed),
        mode="patient",
        hu=hu,
        padding_mask=padding_mask,
        labels=labels,
        regions=regions,
        pixel_spacing=(spacing, spacing),
        positions=positions,
        slice_thickness=SLICE_THICKNESS_MM,
        mass_calibration_factor=MASS_CALIBRATION_FACTOR,
        description=description,
        uid_seed=_uid_seed(seed, "patient", size, slices, pixel_spacing, chosen_burden, noise_hu, metal, motion),
        uid_prefix=uid_prefix,
    )


def _uid_seed(seed: int, mode: str, *options: object) -> str:
    """Text from which the case's UIDs derive: the same options give the same UIDs."""
    return "cacs-node phantom " + json.dumps([int(seed), mode, *[repr(option) for option in options]])


def _write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    with atomic_writer(path, "w", encoding="utf-8") as stream:
        json.dump(document, stream, indent=2, sort_keys=False)
        stream.write("\n")


def truth_document(case: PhantomCase) -> dict[str, Any]:
    """Score the case's stored HU with its true labels; return the `score --json` object plus "phantom"."""
    from scoring.agatston import score_volume

    result = score_volume(case.to_volume(), case.labels)
    document = result.to_json()
    document["phantom"] = dict(case.description, **case.extra_truth)
    return document


def generate_phantom(out_dir: str | Path, seed: int, *, mode: str = "patient", **options: Any) -> PhantomCase:
    """Write one phantom case: OUT_DIR/dicom/, labels.nrrd, regions.nrrd and truth.json.

    options: keyword arguments of `make_case`. OUT_DIR is created; its dicom/
    folder must be empty or missing, so two series are never mixed.

    Returns the PhantomCase. Raises ValueError for bad options and
    FileExistsError when OUT_DIR/dicom already contains files.
    """
    from scoring.ct_builder import write_ct_series
    from scoring.labels import write_label_map

    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        raise FileExistsError(f"{dicom_dir} already contains files; choose an empty output folder")
    case = make_case(seed, mode=mode, **options)
    out_dir.mkdir(parents=True, exist_ok=True)

    datasets = case.build_datasets()
    write_ct_series(datasets, dicom_dir)
    volume = case.to_volume()
    write_label_map(out_dir / "labels.nrrd", case.labels, volume)
    write_label_map(out_dir / "regions.nrrd", case.regions, volume)
    truth = truth_document(case)
    _write_json_atomically(out_dir / "truth.json", truth)
    logger.info("phantom seed %d (%s) written to %s: series %s, %d slices, total Agatston %.1f, risk %s",
                seed, case.mode, out_dir, case.series_instance_uid, case.shape[0],
                truth["agatston"]["total"], truth["risk_category"])
    return case
