"""Calcified plaques of the digital phantom: placement, partial-volume rendering and true labels.

A plaque is a capsule: a sphere of `radius` mm swept along a short axis that
follows the vessel centerline, shifted off the centerline towards the wall.
Each voxel receives the calcium fraction of its footprint, estimated from
the distance to the capsule with a one-pixel linear edge in-plane and by
averaging five sub-planes across the slice thickness. The voxel HU is then
background × (1 − fraction) + peak HU × fraction, which is how a thick slice
mixes a small dense object with the tissue around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from scoring.config import CALCIUM_THRESHOLD_HU
from scoring.phantom_anatomy import ARTERY_OF_SEGMENT, Anatomy, Centerline, Grid, blend
from scoring.result import OTHER_CALCIUM

#: Sub-planes per slice used to average the calcium fraction across the slice thickness.
SLAB_SAMPLES = 5

@dataclass(frozen=True)
class BurdenClass:
    """How much coronary calcium a case gets.

    probability: chance of the class per case. count: inclusive range of plaques.
    radius, length: ranges of the capsule radius and axis length in mm.
    peak_hu: range of the HU of pure calcium.
    """

    probability: float
    count: tuple[int, int]
    radius: tuple[float, float]
    length: tuple[float, float]
    peak_hu: tuple[float, float]


#: Burden classes, chosen so that every Agatston risk category occurs across seeds.
BURDEN_CLASSES: dict[str, BurdenClass] = {
    "zero": BurdenClass(0.18, (0, 0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)),
    "minimal": BurdenClass(0.12, (1, 3), (0.3, 1.2), (0.0, 3.0), (150.0, 450.0)),
    "mild": BurdenClass(0.2, (2, 5), (0.5, 1.3), (0.0, 4.0), (160.0, 700.0)),
    "moderate": BurdenClass(0.28, (4, 8), (0.8, 1.7), (1.0, 7.0), (200.0, 800.0)),
    "severe": BurdenClass(0.22, (6, 16), (0.9, 2.4), (1.5, 14.0), (250.0, 1300.0)),
}

#: Relative frequency of plaques per coronary segment.
SEGMENT_WEIGHTS: dict[str, float] = {"LM": 0.07, "LAD": 0.4, "LCX": 0.2, "RCA": 0.33}


@dataclass(frozen=True)
class Plaque:
    """One calcified object.

    label: CAC label value (1 LAD incl. LM, 2 LCX, 3 RCA, 4 non-coronary calcium).
    site: segment or structure ("LM", "LAD", "aortic_wall", "aortic_valve", "mitral_annulus", ...).
    axis: (K, 3) points of the capsule axis in mm; radius: capsule radius in mm.
    peak_hu: HU of pure calcium in this plaque.
    """

    label: int
    site: str
    axis: np.ndarray
    radius: float
    peak_hu: float

    @property
    def centre(self) -> np.ndarray:
        return self.axis.mean(axis=0)

    @property
    def bounding_radius(self) -> float:
        return float(np.linalg.norm(self.axis - self.centre, axis=1).max() + self.radius)

    def to_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "site": self.site,
            "centre_mm": [round(float(v), 3) for v in self.centre],
            "radius_mm": round(self.radius, 3),
            "axis_length_mm": round(float(np.linalg.norm(self.axis[-1] - self.axis[0])), 3),
            "peak_hu": round(self.peak_hu, 1),
        }


@dataclass
class PlaqueFootprint:
    """Pixels one plaque was drawn into: per slice a box and the pixels that may be labelled.

    boxes: slice index → (rows, columns). support: slice index → bool mask of the
    box, the pixels within one pixel of the plaque. core: slice index → bool mask
    of the pixels holding at least half of the plaque's largest fraction.
    """

    plaque: Plaque
    boxes: dict[int, tuple[slice, slice]]
    support: dict[int, np.ndarray]
    core: dict[int, np.ndarray]


def choose_burden(rng: np.random.Generator) -> str:
    """Draw a coronary calcium burden class with the probabilities of BURDEN_CLASSES."""
    names = list(BURDEN_CLASSES)
    weights = np.array([BURDEN_CLASSES[name].probability for name in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _capsule_axis(line: Centerline, centre_distance: float, length: float, offset: np.ndarray) -> np.ndarray:
    distances = np.arange(centre_distance - length / 2, centre_distance + length / 2 + 0.25, 0.25)
    distances = np.clip(distances, 0.0, line.length)
    return np.array([line.point_at(d) for d in distances]) + offset


def _perpendicular(tangent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=3)
    vector -= np.dot(vector, tangent) * tangent
    return vector / max(np.linalg.norm(vector), 1e-9)


def _fits(candidate: Plaque, placed: list[Plaque], clearance: float) -> bool:
    for other in placed:
        gap = np.linalg.norm(candidate.centre - other.centre) - candidate.bounding_radius - other.bounding_radius
        if gap < clearance:
            return False
    return True


def clear_of_bone(volume: np.ndarray, grid: Grid, plaque: Plaque, margin_mm: float = 1.5) -> bool:
    """Return True when the anatomy within `margin_mm` of the plaque stays below 130 HU.

    A plaque that touched bone would make bone voxels part of its footprint,
    and the labels would then call bone calcium; such placements are rejected.
    """
    reach = plaque.radius + margin_mm
    box = grid.pixel_box(plaque.axis[:, 0].min() - reach, plaque.axis[:, 0].max() + reach,
                         plaque.axis[:, 1].min() - reach, plaque.axis[:, 1].max() + reach)
    if box is None:
        return True
    near = (grid.z >= plaque.axis[:, 2].min() - reach - grid.slice_thickness / 2) & (
        grid.z <= plaque.axis[:, 2].max() + reach + grid.slice_thickness / 2)
    if not near.any():
        return True
    return float(volume[near][(slice(None), *box)].max()) < CALCIUM_THRESHOLD_HU


def sample_coronary_plaques(anatomy: Anatomy, burden: str, rng: np.random.Generator,
                            placed: list[Plaque], accept: Callable[[Plaque], bool] = lambda plaque: True,
                            clearance: float = 2.0) -> list[Plaque]:
    """Place the coronary plaques of one burden class along the centerlines.

    placed: plaques already in the volume, kept at least `clearance` mm away.
    accept: extra placement test, for example `clear_of_bone` on the anatomy.
    """
    spec = BURDEN_CLASSES[burden]
    count = int(rng.integers(spec.count[0], spec.count[1] + 1))
    segments = list(SEGMENT_WEIGHTS)
    weights = np.array([SEGMENT_WEIGHTS[name] for name in segments])
    plaques: list[Plaque] = []
    for _ in range(count):
        for _attempt in range(25):
            segment = segments[int(rng.choice(len(segments), p=weights / weights.sum()))]
            line = anatomy.centerlines[segment]
            # Plaques cluster in the proximal segments.
            centre_distance = line.length * rng.uniform(0.0, 1.0) ** 1.6
            index = int(np.searchsorted(line.arc_length, centre_distance).clip(0, len(line.radii) - 1))
            vessel_radius = float(line.radii[index])
            tiny = rng.uniform() < 0.15
            radius = rng.uniform(0.2, 0.5) if tiny else rng.uniform(*spec.radius)
            length = 0.0 if tiny else rng.uniform(*spec.length)
            offset = _perpendicular(line.tangent_at(centre_distance), rng) * rng.uniform(0.2, 0.8) * vessel_radius
            candidate = Plaque(ARTERY_OF_SEGMENT[segment], segment,
                               _capsule_axis(line, centre_distance, length, offset),
                               float(radius), float(rng.uniform(*spec.peak_hu)))
            if _fits(candidate, placed + plaques, clearance) and accept(candidate):
                plaques.append(candidate)
                break
    return plaques


def sample_extra_coronary_plaques(anatomy: Anatomy, burden: str, rng: np.random.Generator,
                                  z_range: tuple[float, float],
                                  accept: Callable[[Plaque], bool] = lambda plaque: True,
                                  clearance: float = 2.0) -> list[Plaque]:
    """Place non-coronary calcium (label 4): aortic wall, aortic valve and mitral annulus.

    accept: extra placement test, for example `clear_of_bone` on the anatomy.
    """
    severity = list(BURDEN_CLASSES).index(burden) / (len(BURDEN_CLASSES) - 1)
    plaques: list[Plaque] = []

    # Aortic wall plaques in the descending aorta and above the root of the ascending aorta.
    for _ in range(int(rng.poisson(0.6 + 3.0 * severity))):
        theta = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(1.0, 12.0)
        radius = rng.uniform(0.8, 2.5)
        if rng.uniform() < 0.5:
            ax, ay, ar = anatomy.descending_aorta
            z = rng.uniform(*z_range)
            wall = np.array([ax + (ar - 0.5) * np.cos(theta), ay + (ar - 0.5) * np.sin(theta), z])
            axis = wall + np.outer(np.linspace(-length / 2, length / 2, max(int(length / 0.25), 1) + 1), [0, 0, 1])
        else:
            line = anatomy.great_vessels["ascending_aorta"]
            distance = rng.uniform(15.0, max(line.length - 5.0, 16.0))
            tangent = line.tangent_at(distance)
            outward = _perpendicular(tangent, rng)
            centre = line.point_at(distance) + outward * (float(line.radii[0]) - 0.5)
            axis = centre + np.outer(np.linspace(-length / 2, length / 2, max(int(length / 0.25), 1) + 1), tangent)
        plaques.append(Plaque(OTHER_CALCIUM, "aortic_wall", axis, float(radius), float(rng.uniform(250, 1100))))

    # Aortic valve cusps, inside the root.
    if rng.uniform() < 0.15 + 0.45 * severity:
        root = anatomy.great_vessels["ascending_aorta"].points[0]
        tangent = anatomy.great_vessels["ascending_aorta"].tangent_at(0.0)
        for _ in range(int(rng.integers(1, 4))):
            position = root + _perpendicular(tangent, rng) * rng.uniform(3.0, 8.0)
            plaques.append(Plaque(OTHER_CALCIUM, "aortic_valve", position[None, :], float(rng.uniform(1.0, 3.0)),
                                  float(rng.uniform(300, 1200))))

    # Mitral annulus calcification: an arc on the posterior mitral ring, inside the heart.
    if rng.uniform() < 0.1 + 0.35 * severity:
        heart = anatomy.heart
        start = rng.uniform(-2.7, -2.0)
        angles = np.linspace(start, start + rng.uniform(0.2, 0.7), 40)
        axis = np.array([heart.surface_point(-0.45, a, -12.0) for a in angles])
        plaques.append(Plaque(OTHER_CALCIUM, "mitral_annulus", axis, float(rng.uniform(1.2, 2.5)),
                              float(rng.uniform(300, 1100))))

    kept: list[Plaque] = []
    for plaque in plaques:
        if _fits(plaque, kept, clearance) and accept(plaque):
            kept.append(plaque)
    return kept


def _slab_fraction(plaque: Plaque, grid: Grid, z: float, rows: slice, columns: slice) -> np.ndarray:
    """Calcium fraction of each pixel in the box, averaged over SLAB_SAMPLES planes of the slice."""
    x = grid.x[columns][None, :, None]
    y = grid.y[rows][:, None, None]
    axis = plaque.axis
    fraction = np.zeros((rows.stop - rows.start, columns.stop - columns.start), dtype=np.float64)
    offsets = (np.arange(SLAB_SAMPLES) + 0.5) / SLAB_SAMPLES - 0.5
    in_plane = (x - axis[:, 0]) ** 2 + (y - axis[:, 1]) ** 2
    for offset in offsets:
        dz2 = (z + offset * grid.slice_thickness - axis[:, 2]) ** 2
        distance = np.sqrt((in_plane + dz2).min(axis=2))
        fraction += np.clip(0.5 + (plaque.radius - distance) / grid.spacing, 0.0, 1.0)
    return fraction / SLAB_SAMPLES


#: Calcium fraction below which a blurred plaque's tail is not part of its footprint.
SUPPORT_FRACTION = 0.01


def blur_reach_mm(psf_sigma_mm: float) -> float:
    """Distance beyond a plaque's edge where its blurred calcium fraction can still reach SUPPORT_FRACTION."""
    return 2.5 * psf_sigma_mm


def paint_plaque(volume: np.ndarray, grid: Grid, plaque: Plaque, psf_sigma_mm: float = 0.0,
                 margin_mm: float = 0.0) -> PlaqueFootprint:
    """Mix one plaque into the HU volume in place and return where it went.

    psf_sigma_mm: standard deviation of the in-plane Gaussian point spread
    function of the reconstruction. It spreads dense calcium over neighbouring
    pixels (blooming), which enlarges thresholded areas as real scans do.
    margin_mm: extra room in the footprint's boxes for later smearing (motion blur).
    """
    reach = plaque.radius + 2 * grid.spacing + 4 * psf_sigma_mm + margin_mm
    low = plaque.axis[:, 2].min() - plaque.radius - grid.slice_thickness / 2
    high = plaque.axis[:, 2].max() + plaque.radius + grid.slice_thickness / 2
    footprint = PlaqueFootprint(plaque, {}, {}, {})
    box = grid.pixel_box(plaque.axis[:, 0].min() - reach, plaque.axis[:, 0].max() + reach,
                         plaque.axis[:, 1].min() - reach, plaque.axis[:, 1].max() + reach)
    if box is None:
        return footprint
    rows, columns = box
    fractions: dict[int, np.ndarray] = {}
    for index in np.nonzero((grid.z >= low) & (grid.z <= high))[0]:
        fraction = _slab_fraction(plaque, grid, float(grid.z[index]), rows, columns)
        if psf_sigma_mm > 0:
            fraction = ndimage.gaussian_filter(fraction, psf_sigma_mm / grid.spacing, mode="constant")
        if fraction.max() <= 0.0:
            continue
        blend(volume[index, rows, columns], fraction.astype(np.float32), plaque.peak_hu)
        fractions[int(index)] = fraction
    if not fractions:
        return footprint
    largest = max(float(f.max()) for f in fractions.values())
    for index, fraction in fractions.items():
        footprint.boxes[index] = box
        # One pixel of margin, so noise that extends the plaque's edge stays part of it.
        footprint.support[index] = ndimage.binary_dilation(fraction >= SUPPORT_FRACTION, np.ones((3, 3), bool))
        footprint.core[index] = fraction >= 0.5 * largest
    return footprint


def widen_footprint(footprint: PlaqueFootprint, index: int, structure: np.ndarray) -> None:
    """Dilate the support on one slice, after motion blur smeared the plaque over its box."""
    if index in footprint.support:
        footprint.support[index] = ndimage.binary_dilation(footprint.support[index], structure)


def label_plaque(labels: np.ndarray, hu: np.ndarray, footprint: PlaqueFootprint) -> int:
    """Write the plaque's label where its support reaches ≥ 130 HU and connects to its core.

    hu: the final HU after quantisation, noise and artifacts. A component of
    ≥ 130 HU support voxels (26-connected across slices) is kept only when it
    contains a core voxel, so noise specks beside a faint plaque are not
    called calcium. Returns the number of voxels labelled.
    """
    if not footprint.boxes:
        return 0
    indices = sorted(footprint.boxes)
    rows, columns = footprint.boxes[indices[0]]
    first, last = indices[0], indices[-1]
    shape = (last - first + 1, rows.stop - rows.start, columns.stop - columns.start)
    candidate = np.zeros(shape, dtype=bool)
    core = np.zeros(shape, dtype=bool)
    for index in indices:
        above = hu[index, rows, columns] >= CALCIUM_THRESHOLD_HU
        candidate[index - first] = footprint.support[index] & above
        core[index - first] = footprint.core[index] & above
    components, _ = ndimage.label(candidate, np.ones((3, 3, 3), bool))
    keep = np.unique(components[core])
    keep = keep[keep > 0]
    selected = np.isin(components, keep)
    target = labels[first:last + 1, rows, columns]
    target[selected] = footprint.plaque.label
    return int(selected.sum())
