"""QRM-style calibration mode of the digital phantom: hydroxyapatite cylinders in a water-like body.

The model is a QRM thorax phantom with its Cardiac Calcification Insert, as
a Canon Aquilion ONE scans it at 120 kVp (public data of MolloiLab,
CAC-stanford-data). An oval thorax of soft-tissue equivalent material has
lung foam on both sides and a bone-equivalent spine. A 100 mm
water-equivalent cylinder in the middle contains nine calcium cylinders. Each cylinder is 1, 3 or 5 mm in both diameter and length,
at 200, 400 or 800 mg HA/cm³, with its axis along z.

HU from density: HU = density / CALIBRATION_FACTOR above the 0 HU water
base, with CALIBRATION_FACTOR = 0.743 mg HA/cm³ per HU (the default factor of
`scoring.config` rounded to float32, about 1.35 HU per mg HA/cm³ at 120 kVp),
giving 269, 538 and 1077 HU. The series carries the same factor in (0018,9352), so for a cylinder
whose voxels are all above 130 HU the mass score mean HU × volume × factor
returns density × volume, whatever the partial volume.

Above the inserts, from 9 to 39 mm over their bottom, runs a 10 mm calibration
rod of 200 mg HA/cm³, as in the real insert. It is labelled 4 (calcium that
scoring ignores), so it never enters the scores.

Calcium is blurred in-plane by the Gaussian point spread function of
`scoring.phantom.PSF_SIGMA_MM`. NOTE: a threshold scorer of another group
reports about 958 Agatston for a real Canon Aquilion ONE scan of this insert
(160, 306 and 491 for 200, 400 and 800 mg HA/cm³). This mode scores about
565–590 (80–110, 195–210 and 260–285 on seeds 0–2), because the real scan blooms more, in-plane
and along z, than this model.

Every cylinder starts on a slice boundary, so the 3 mm cylinders fill one
slice exactly, the 5 mm cylinders fill one slice and two thirds of the next,
and the 1 mm cylinders fill a third of one slice. The label values group
the inserts by density: 1 = 200, 2 = 400, 3 = 800 mg HA/cm³.
"""

from __future__ import annotations

import numpy as np
from pydicom.uid import PYDICOM_ROOT_UID

from scoring.config import CALCIUM_THRESHOLD_HU, DEFAULT_MASS_CALIBRATION_FACTOR
from scoring.result import OTHER_CALCIUM

#: mg HA per cm³ per HU of the calibration mode: the float32 value (0018,9352) stores.
CALIBRATION_FACTOR = float(np.float32(DEFAULT_MASS_CALIBRATION_FACTOR))

#: Insert densities (mg HA/cm³) with their label values.
DENSITY_LABELS: dict[float, int] = {200.0: 1, 400.0: 2, 800.0: 3}

#: Insert diameters, equal to their lengths, in mm.
INSERT_SIZES_MM = (5.0, 3.0, 1.0)

#: Distance between neighbouring inserts in the 3 × 3 arrangement, in mm.
INSERT_PITCH_MM = 15.0

#: Calibration rod: density (mg HA/cm³), diameter (mm), and its z range above the inserts' bottom (mm).
ROD_DENSITY = 200.0
ROD_DIAMETER_MM = 10.0
ROD_Z_RANGE_MM = (9.0, 39.0)

WATER_HU = 0.0


def insert_hu(density: float) -> float:
    """HU of pure insert material of `density` mg HA/cm³."""
    return WATER_HU + density / CALIBRATION_FACTOR


def _disc_fraction(x: np.ndarray, y: np.ndarray, centre: tuple[float, float], radius: float,
                   spacing: float, psf_sigma_mm: float = 0.0) -> np.ndarray:
    """Calcium fraction of each pixel for a disc, with a one-pixel edge and an optional Gaussian PSF."""
    from scipy import ndimage

    distance = np.sqrt((x[None, :] - centre[0]) ** 2 + (y[:, None] - centre[1]) ** 2)
    fraction = np.clip(0.5 + (radius - distance) / spacing, 0.0, 1.0)
    if psf_sigma_mm > 0:
        fraction = ndimage.gaussian_filter(fraction, psf_sigma_mm / spacing, mode="constant")
    return fraction


def _z_overlap(z: float, thickness: float, bottom: float, length: float) -> float:
    """Fraction of the slice [z − t/2, z + t/2] occupied by the cylinder [bottom, bottom + length]."""
    low = max(z - thickness / 2, bottom)
    high = min(z + thickness / 2, bottom + length)
    return max(high - low, 0.0) / thickness


def make_qrm_case(seed: int, *, size: int = 512, slices: int = 40, pixel_spacing: float | None = None,
                  noise_hu: float | None = None, uid_prefix: str = PYDICOM_ROOT_UID):
    """Build the calibration phantom in memory; see `scoring.phantom.make_case` for the options.

    Returns a PhantomCase whose `extra_truth["inserts"]` lists, per cylinder,
    the true volume and mass from geometry and the threshold volume and mass
    measured on its labelled voxels.
    """
    from scipy import ndimage

    from scoring.phantom import (
        HU_RANGE,
        PSF_SIGMA_MM,
        SLICE_THICKNESS_MM,
        PhantomCase,
        _add_noise,
        _quantise,
        _uid_seed,
        reconstruction_circle_padding,
    )
    from scoring.phantom_anatomy import Grid, blend, ellipse_fraction
    from scoring.phantom_calcium import blur_reach_mm

    rng = np.random.default_rng(seed)
    psf_sigma = float(rng.uniform(*PSF_SIGMA_MM))
    spacing = float(pixel_spacing) if pixel_spacing is not None else round(rng.uniform(0.45, 0.55) * 512 / size, 4)
    first_table_z = round(rng.uniform(-200.0, 0.0) * 4) / 4
    z = (np.arange(slices) - (slices - 1) / 2) * SLICE_THICKNESS_MM
    offset = rng.uniform(-3, 3, 2)
    first = np.round(-(size - 1) / 2 * spacing + offset, 2)
    steps = np.arange(size) * spacing
    grid = Grid(x=first[0] + steps, y=first[1] + steps, z=z, spacing=spacing, slice_thickness=SLICE_THICKNESS_MM)

    # Thorax: soft-tissue shell, lung foam, spine, and the water-equivalent insert holder.
    template = np.full((size, size), -1000.0, dtype=np.float32)
    blend(template, ellipse_fraction(grid.x, grid.y, (0, 0), (150, 100), spacing), 40.0)
    for side in (-1.0, 1.0):
        blend(template, ellipse_fraction(grid.x, grid.y, (side * 85, 5), (55, 75), spacing), -820.0)
    blend(template, ellipse_fraction(grid.x, grid.y, (0, 70), (16, 14), spacing), 600.0)
    blend(template, ellipse_fraction(grid.x, grid.y, (0, 70), (13, 11), spacing), 250.0)
    blend(template, ellipse_fraction(grid.x, grid.y, (0, -10), (50, 50), spacing), WATER_HU)
    volume = np.broadcast_to(template, grid.shape).copy()

    # Inserts: rows by density, columns by size, bottoms on the boundary below the centre slice.
    centre_slice = slices // 2
    bottom = float(z[centre_slice] - SLICE_THICKNESS_MM / 2)
    inserts = []
    for row, density in enumerate(DENSITY_LABELS):
        for column, diameter in enumerate(INSERT_SIZES_MM):
            centre = ((column - 1) * INSERT_PITCH_MM, -10 + (row - 1) * INSERT_PITCH_MM)
            inserts.append({"density": density, "diameter": diameter, "centre": centre, "bottom": bottom})
            disc = _disc_fraction(grid.x, grid.y, centre, diameter / 2, spacing, psf_sigma)
            for index, slice_z in enumerate(z):
                fraction = _z_overlap(float(slice_z), SLICE_THICKNESS_MM, bottom, diameter)
                if fraction > 0:
                    blend(volume[index], (disc * fraction).astype(np.float32), insert_hu(density))

    rod_centre = (0.0, -10.0 - 2.2 * INSERT_PITCH_MM)
    rod_disc = _disc_fraction(grid.x, grid.y, rod_centre, ROD_DIAMETER_MM / 2, spacing, psf_sigma)
    rod_length = ROD_Z_RANGE_MM[1] - ROD_Z_RANGE_MM[0]
    rod_overlaps = np.array([_z_overlap(float(s), SLICE_THICKNESS_MM, bottom + ROD_Z_RANGE_MM[0], rod_length)
                             for s in z])
    for index in np.nonzero(rod_overlaps)[0]:
        blend(volume[index], (rod_disc * rod_overlaps[index]).astype(np.float32), insert_hu(ROD_DENSITY))

    sigma = float(noise_hu) if noise_hu is not None else float(rng.uniform(10, 25))
    _add_noise(volume, rng, sigma)
    padding_2d = reconstruction_circle_padding(size)
    hu = _quantise(volume, padding_2d)
    padding_mask = np.broadcast_to(padding_2d, hu.shape).copy()

    # Labels: voxels ≥ 130 HU within one pixel of an insert, in components that reach its core.
    labels = np.zeros(hu.shape, dtype=np.uint8)
    voxel_volume = spacing * spacing * SLICE_THICKNESS_MM
    truth_inserts = []
    for insert in inserts:
        radius = insert["diameter"] / 2
        disc = _disc_fraction(grid.x, grid.y, insert["centre"], radius + blur_reach_mm(psf_sigma) + spacing,
                              spacing) > 0
        overlaps = np.array([_z_overlap(float(s), SLICE_THICKNESS_MM, bottom, insert["diameter"]) for s in z])
        support = disc[None] & (overlaps > 0)[:, None, None]
        core_disc = _disc_fraction(grid.x, grid.y, insert["centre"], radius, spacing) >= 0.5
        core = core_disc[None] & (overlaps == overlaps.max())[:, None, None]
        candidate = support & (hu >= CALCIUM_THRESHOLD_HU)
        components, _ = ndimage.label(candidate, np.ones((3, 3, 3), bool))
        keep = np.unique(components[core & candidate])
        selected = np.isin(components, keep[keep > 0])
        labels[selected] = DENSITY_LABELS[insert["density"]]

        true_volume = np.pi * radius ** 2 * insert["diameter"]
        measured_volume = float(selected.sum() * voxel_volume)
        mean_hu = float(hu[selected].mean()) if selected.any() else 0.0
        truth_inserts.append({
            "density_mg_cm3": insert["density"],
            "diameter_mm": insert["diameter"],
            "length_mm": insert["diameter"],
            "label": DENSITY_LABELS[insert["density"]],
            "centre_mm": [float(insert["centre"][0]), float(insert["centre"][1]),
                          float(first_table_z + (bottom + insert["diameter"] / 2 - z[0]))],
            "insert_hu": round(insert_hu(insert["density"]), 2),
            "true_volume_mm3": round(true_volume, 4),
            "true_mass_mg": round(true_volume * insert["density"] / 1000.0, 4),
            "threshold_volume_mm3": round(measured_volume, 4),
            "threshold_mass_mg": round(mean_hu * measured_volume / 1000.0 * CALIBRATION_FACTOR, 4),
        })

    rod_support = _disc_fraction(grid.x, grid.y, rod_centre,
                                 ROD_DIAMETER_MM / 2 + blur_reach_mm(psf_sigma) + spacing, spacing) > 0
    rod_voxels = rod_support[None] & (rod_overlaps > 0)[:, None, None] & (hu >= CALCIUM_THRESHOLD_HU)
    labels[rod_voxels] = OTHER_CALCIUM

    positions = np.zeros((slices, 3))
    positions[:, 0], positions[:, 1] = first
    positions[:, 2] = first_table_z + SLICE_THICKNESS_MM * np.arange(slices)
    description = {
        "seed": int(seed),
        "mode": "qrm",
        "pixel_spacing_mm": spacing,
        "field_of_view_mm": round(spacing * size, 2),
        "slices": slices,
        "noise_hu": round(sigma, 2),
        "psf_sigma_mm": round(psf_sigma, 3),
        "hu_range": list(HU_RANGE),
        "calibration_factor_mg_cm3_per_hu": CALIBRATION_FACTOR,
        "label_meaning": {"1": "200 mg HA/cm3", "2": "400 mg HA/cm3", "3": "800 mg HA/cm3",
                          "4": "calibration rod, 200 mg HA/cm3"},
    }
    return PhantomCase(
        seed=int(seed),
        mode="qrm",
        hu=hu,
        padding_mask=padding_mask,
        labels=labels,
        regions=np.zeros(hu.shape, dtype=np.uint8),
        pixel_spacing=(spacing, spacing),
        positions=positions,
        slice_thickness=SLICE_THICKNESS_MM,
        mass_calibration_factor=CALIBRATION_FACTOR,
        description=description,
        uid_seed=_uid_seed(seed, "qrm", size, slices, pixel_spacing, noise_hu),
        uid_prefix=uid_prefix,
        body_part_examined="CHEST",
        series_description="Calcium score 3.0 mm (QRM-style digital phantom)",
        extra_truth={"inserts": truth_inserts},
    )
