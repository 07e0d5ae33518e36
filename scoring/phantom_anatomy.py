"""Chest anatomy of the digital phantom: random anatomy parameters, coronary centerlines, HU rendering.

Coordinates are patient coordinates in mm in the DICOM patient system (LPS:
x to the patient's left, y to posterior, z to superior), shifted so that the
body axis passes through x = y = 0 and the heart centre lies at z = 0. The
acquisition (`scoring.phantom`) adds the table offset when it writes
ImagePositionPatient.

Sizes and positions at `body_scale` 1 follow measurements on a public
contrast-enhanced chest CT angiogram of a 55-year-old man (TotalSegmentator
test data, 1.5 mm grid). The sternum lies about 145 mm anterior of the
vertebral body centre. At mid-ventricular level the heart is about 135 mm
wide and 100 mm deep, with its centre 15–25 mm left of the midline. The
descending aorta runs left-anterior of the spine. At `body_scale` 1 the
chest is 300–350 mm wide and 210–250 mm deep, and each case draws a
`body_scale` of 0.85–1.15 that scales all sizes. HU values are non-contrast values: blood and myocardium 35–55 HU,
fat about −100 HU, aerated lung about −850 HU, cortical bone 600–1000 HU.

Structures that do not change along z (chest wall, thoracic cavity, spine,
descending aorta, sternum) are drawn once into a 2D template and copied into
each slice. The heart, great vessels, coronary arteries, ribs, discs and
diaphragm are drawn slice by slice inside their bounding boxes. This keeps a
48-slice 512² case at about 0.6 s of CPU time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Coronary segments whose calcium is labelled as each artery. The left main (LM)
#: belongs to the LAD subtree, as in the CAC label convention of scoring.result.
ARTERY_OF_SEGMENT: dict[str, int] = {"LM": 1, "LAD": 1, "LCX": 2, "RCA": 3}


@dataclass(frozen=True)
class Grid:
    """The axial sampling grid in body coordinates.

    x: patient x (mm) of each column centre; y: patient y (mm) of each row centre.
    z: z (mm) of each slice centre, increasing.
    spacing: in-plane pixel spacing in mm (rows and columns alike).
    slice_thickness: nominal thickness of a slice in mm.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    spacing: float
    slice_thickness: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    def pixel_box(self, x_low: float, x_high: float, y_low: float, y_high: float) -> tuple[slice, slice] | None:
        """Return (row slice, column slice) covering the rectangle in mm, None when it misses the grid."""
        column_low = int(np.floor((x_low - self.x[0]) / self.spacing))
        column_high = int(np.ceil((x_high - self.x[0]) / self.spacing)) + 1
        row_low = int(np.floor((y_low - self.y[0]) / self.spacing))
        row_high = int(np.ceil((y_high - self.y[0]) / self.spacing)) + 1
        column_low, row_low = max(column_low, 0), max(row_low, 0)
        column_high, row_high = min(column_high, len(self.x)), min(row_high, len(self.y))
        if column_low >= column_high or row_low >= row_high:
            return None
        return slice(row_low, row_high), slice(column_low, column_high)


@dataclass(frozen=True)
class Centerline:
    """A vessel centerline sampled about every 0.5 mm.

    points: (N, 3) positions in mm; radii: (N,) lumen radius in mm.
    arc_length: (N,) distance along the line from its first point, in mm.
    """

    name: str
    points: np.ndarray
    radii: np.ndarray
    arc_length: np.ndarray = field(init=False)
    z_low: float = field(init=False)
    z_high: float = field(init=False)

    def __post_init__(self) -> None:
        steps = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        object.__setattr__(self, "arc_length", np.concatenate(([0.0], np.cumsum(steps))))
        object.__setattr__(self, "z_low", float(self.points[:, 2].min()))
        object.__setattr__(self, "z_high", float(self.points[:, 2].max()))

    @property
    def length(self) -> float:
        return float(self.arc_length[-1])

    def point_at(self, distance: float) -> np.ndarray:
        """Interpolated position at `distance` mm along the line."""
        return np.array([np.interp(distance, self.arc_length, self.points[:, k]) for k in range(3)])

    def tangent_at(self, distance: float) -> np.ndarray:
        """Unit tangent at `distance` mm along the line."""
        before = self.point_at(max(distance - 0.5, 0.0))
        after = self.point_at(min(distance + 0.5, self.length))
        direction = after - before
        return direction / max(np.linalg.norm(direction), 1e-9)


@dataclass(frozen=True)
class HeartShape:
    """An egg-shaped heart: an ellipsoid about the long axis, wider at the base.

    centre: mm. long_axis: unit vector from base to apex. anterior, right: unit
    vectors perpendicular to it (anterior and patient-right as far as the tilt
    allows). semi_axes: (long, anterior, right) half lengths in mm.
    base_widening: the radius at long-axis coordinate t in [−1, 1] is
    sqrt(1 − t²) × (1 − base_widening × t), so the base (t < 0) is wider.
    """

    centre: np.ndarray
    long_axis: np.ndarray
    anterior: np.ndarray
    right: np.ndarray
    semi_axes: tuple[float, float, float]
    base_widening: float

    def surface_point(self, t: float, angle: float, outward_mm: float = 0.0) -> np.ndarray:
        """Point at long-axis coordinate t and angle (0 anterior, +π/2 patient right), pushed outward."""
        profile = np.sqrt(max(1.0 - t * t, 0.0)) * (1.0 - self.base_widening * t)
        radial = np.cos(angle) * self.anterior * self.semi_axes[1] + np.sin(angle) * self.right * self.semi_axes[2]
        point = self.centre + self.long_axis * t * self.semi_axes[0] + profile * radial
        return point + outward_mm * radial / np.linalg.norm(radial)

    def surface_coordinates(self, point: np.ndarray) -> tuple[float, float]:
        """Return (t, angle) of `point`, the inverse of `surface_point` for its direction from the axis."""
        offset = point - self.centre
        t = float(np.dot(offset, self.long_axis) / self.semi_axes[0])
        anterior = float(np.dot(offset, self.anterior) / self.semi_axes[1])
        right = float(np.dot(offset, self.right) / self.semi_axes[2])
        return t, float(np.arctan2(right, anterior))

    def signed_distance(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """Approximate signed distance in mm (negative inside) on a pixel grid at height z, in float32."""
        dx = (x - self.centre[0]).astype(np.float32)[None, :]
        dy = (y - self.centre[1]).astype(np.float32)[:, None]
        dz = float(z - self.centre[2])

        def component(axis: np.ndarray, semi_axis: float) -> np.ndarray:
            scale = 1.0 / semi_axis
            return (dx * float(axis[0] * scale) + dy * float(axis[1] * scale)) + float(dz * axis[2] * scale)

        along = component(self.long_axis, self.semi_axes[0])
        anterior = component(self.anterior, self.semi_axes[1])
        right = component(self.right, self.semi_axes[2])
        radial = np.sqrt(anterior * anterior + right * right)
        profile = np.sqrt(np.clip(1.0 - along * along, 0.0, None)) * (1.0 - self.base_widening * along)
        mean_radius = 0.5 * (self.semi_axes[1] + self.semi_axes[2])
        inside_distance = (radial - profile) * mean_radius
        # Beyond the apex or the base the radial term alone underestimates the distance.
        axial_excess = (np.abs(along) - 1.0) * self.semi_axes[0]
        return np.maximum(inside_distance, axial_excess)

    def z_extent(self, margin: float) -> tuple[float, float]:
        """Lowest and highest z (mm) the shape reaches, widened by margin."""
        half = np.sqrt(
            (self.semi_axes[0] * self.long_axis[2]) ** 2
            + ((1 + self.base_widening) * self.semi_axes[1] * self.anterior[2]) ** 2
            + ((1 + self.base_widening) * self.semi_axes[2] * self.right[2]) ** 2
        )
        return float(self.centre[2] - half - margin), float(self.centre[2] + half + margin)

    def xy_extent(self, margin: float) -> tuple[float, float, float, float]:
        """(x low, x high, y low, y high) in mm that contain the shape, widened by margin."""
        extents = []
        for k in (0, 1):
            half = np.sqrt(
                (self.semi_axes[0] * self.long_axis[k]) ** 2
                + ((1 + self.base_widening) * self.semi_axes[1] * self.anterior[k]) ** 2
                + ((1 + self.base_widening) * self.semi_axes[2] * self.right[k]) ** 2
            )
            extents += [float(self.centre[k] - half - margin), float(self.centre[k] + half + margin)]
        return extents[0], extents[1], extents[2], extents[3]


@dataclass(frozen=True)
class Anatomy:
    """All random anatomy of one case, in body coordinates (mm) and HU."""

    body_scale: float
    body_semi_axes: tuple[float, float]
    subcutaneous_fat_mm: float
    chest_wall_mm: float
    spine_centre: tuple[float, float]
    vertebral_radius: float
    disc_period: float
    disc_phase: float
    sternum_centre: tuple[float, float]
    descending_aorta: tuple[float, float, float]
    heart: HeartShape
    epicardial_fat_mm: float
    left_ventricle: HeartShape
    diaphragm_dome_z: float
    centerlines: dict[str, Centerline]
    great_vessels: dict[str, Centerline]
    lung_vessels: tuple[Centerline, ...]
    rib_levels: tuple[float, ...]
    rib_drop: float
    hu: dict[str, float]


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _polyline(points: np.ndarray, step: float = 0.5) -> np.ndarray:
    """Resample a polyline so that consecutive points are at most `step` mm apart."""
    segments = [points[:1]]
    for start, end in zip(points[:-1], points[1:]):
        count = max(int(np.ceil(np.linalg.norm(end - start) / step)), 1)
        fractions = np.arange(1, count + 1)[:, None] / count
        segments.append(start + fractions * (end - start))
    return np.concatenate(segments)


def _surface_path(
    heart: HeartShape, ts: np.ndarray, angles: np.ndarray, outward_mm: float
) -> np.ndarray:
    points = np.array([heart.surface_point(t, a, outward_mm) for t, a in zip(ts, angles)])
    return _polyline(points)


def _tapered(points: np.ndarray, start_radius: float, end_radius: float) -> np.ndarray:
    return np.linspace(start_radius, end_radius, len(points))


def _coronary_centerlines(heart: HeartShape, rng: np.random.Generator, scale: float
                          ) -> tuple[dict[str, Centerline], np.ndarray, float]:
    """Build LM, LAD, LCX and RCA on the heart surface, inside the epicardial fat.

    Returns the centerlines, the aortic root centre (mm) and the aortic radius (mm).
    """
    depth = rng.uniform(2.5, 3.5)
    av_groove = rng.uniform(-0.55, -0.4)
    wiggle = rng.uniform(0.03, 0.08)

    # LM: 8–18 mm from the left coronary ostium on the aortic root to the bifurcation.
    # The root lies on the line from the bifurcation to the centre of the heart base.
    bifurcation_angle = rng.uniform(-1.2, -0.9)
    bifurcation = heart.surface_point(av_groove, bifurcation_angle, depth)
    base_centre = heart.centre - 0.75 * heart.semi_axes[0] * heart.long_axis
    towards_base = _unit(base_centre - bifurcation)
    aortic_radius = rng.uniform(13, 17) * scale
    left_ostium = bifurcation + rng.uniform(8, 18) * scale * towards_base
    aortic_root = left_ostium + aortic_radius * towards_base
    lm_points = _polyline(np.array([left_ostium, bifurcation]))

    # LAD: anterior interventricular groove, from the bifurcation to near the apex.
    steps = 60
    ts = np.linspace(av_groove, rng.uniform(0.85, 0.95), steps)
    lad_start = rng.uniform(-0.5, -0.35)
    angles = np.linspace(bifurcation_angle, lad_start, steps) + wiggle * np.sin(np.linspace(0, 5 * np.pi, steps))
    lad_points = _surface_path(heart, ts, angles, depth)
    lad_points = np.concatenate((bifurcation[None, :], lad_points))

    # LCX: left atrioventricular groove, from the bifurcation towards the posterior crux.
    angles = np.linspace(bifurcation_angle, rng.uniform(-2.9, -2.4), steps)
    ts = av_groove + wiggle * np.sin(np.linspace(0, 3 * np.pi, steps))
    lcx_points = np.concatenate((bifurcation[None, :], _surface_path(heart, ts, angles, depth)))

    # RCA: right atrioventricular groove from the anterior ostium round to the crux,
    # then a short posterior descending branch towards the apex.
    rca_start_angle = rng.uniform(0.2, 0.45)
    rca_entry = heart.surface_point(av_groove, rca_start_angle, depth)
    right_ostium = aortic_root + aortic_radius * _unit(rca_entry - aortic_root)
    crux_angle = rng.uniform(3.1, 3.4)
    angles = np.linspace(rca_start_angle, crux_angle, steps)
    ts = av_groove + wiggle * np.sin(np.linspace(0, 4 * np.pi, steps))
    groove = _surface_path(heart, ts, angles, depth)
    descending = _surface_path(heart, np.linspace(av_groove, rng.uniform(0.2, 0.5), 20),
                               np.full(20, crux_angle), depth)
    # The ostial segment runs over the heart surface, not through the heart.
    ostial = _polyline(np.array([right_ostium, rca_entry]))
    for index, point in enumerate(ostial):
        inside = heart.signed_distance(np.array([point[0]]), np.array([point[1]]), float(point[2]))[0, 0]
        if inside < depth:
            ostial[index] = heart.surface_point(*heart.surface_coordinates(point), depth)
    rca_points = np.concatenate((_polyline(ostial), groove, descending))

    centerlines = {
        "LM": Centerline("LM", lm_points, _tapered(lm_points, 2.3 * scale, 2.1 * scale)),
        "LAD": Centerline("LAD", lad_points, _tapered(lad_points, 1.9 * scale, 0.9 * scale)),
        "LCX": Centerline("LCX", lcx_points, _tapered(lcx_points, 1.7 * scale, 1.0 * scale)),
        "RCA": Centerline("RCA", rca_points, _tapered(rca_points, 2.0 * scale, 1.0 * scale)),
    }
    return centerlines, aortic_root, aortic_radius


def _lung_vessels(rng: np.random.Generator, anatomy_centre: np.ndarray, scale: float,
                  z_range: tuple[float, float]) -> tuple[Centerline, ...]:
    """Random pulmonary vessel branches running outward from the hila."""
    vessels = []
    for side in (-1.0, 1.0):
        hilum = anatomy_centre + np.array([side * 45.0 * scale, 10.0 * scale, 25.0])
        for _ in range(int(rng.integers(10, 18))):
            direction = _unit(np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.9)]))
            length = rng.uniform(50, 110) * scale
            start = hilum + rng.normal(0, 8, 3)
            start[2] = np.clip(start[2], z_range[0], z_range[1])
            points = _polyline(np.array([start, start + 0.5 * length * _unit(direction + rng.normal(0, 0.15, 3)),
                                         start + length * direction]), step=1.0)
            radius = rng.uniform(1.5, 4.0)
            vessels.append(Centerline("lung", points, _tapered(points, radius, 0.6)))
    return tuple(vessels)


def _clear_of_coronaries(points: np.ndarray, radius: float, coronary_points: np.ndarray,
                         direction: np.ndarray, clearance: float = 4.0) -> np.ndarray:
    """Shift a great vessel along `direction` in 2 mm steps until the coronaries run outside it.

    A coronary artery inside the pulmonary trunk or the vena cava would vanish
    into its blood, and its plaques would sit in the vessel's lumen.
    """
    # Points about 2 mm apart on both lines are enough for a clearance of several mm.
    coarse_coronary = coronary_points[::4]
    for _ in range(30):
        offsets = points[::4, None, :] - coarse_coronary[None, :, :]
        if np.sqrt((offsets ** 2).sum(axis=2).min()) >= radius + clearance:
            break
        points = points + 2.0 * direction
    return points


def sample_anatomy(rng: np.random.Generator, z_range: tuple[float, float]) -> Anatomy:
    """Draw one patient's anatomy.

    z_range: lowest and highest slice z (mm, body coordinates) that will be
    rendered, so vertical structures are built long enough.
    """
    scale = rng.uniform(0.85, 1.15)
    body = (rng.uniform(150, 175) * scale, rng.uniform(105, 125) * scale)
    spine_y = body[1] - rng.uniform(62, 72) * scale
    spine = (rng.normal(0, 2), spine_y)
    sternum = (rng.normal(0, 2), -body[1] + rng.uniform(14, 24) * scale)

    # Heart: long axis from base (right, posterior, superior) to apex (left, anterior, inferior).
    # TODO(#2): the heart is one egg-shaped blob with a left-ventricular cavity; atria,
    # right ventricle and septum are not drawn as separate shapes.
    azimuth = np.deg2rad(rng.uniform(35, 55))
    elevation = np.deg2rad(rng.uniform(25, 40))
    long_axis = _unit(np.array([np.sin(azimuth) * np.cos(elevation), -np.cos(azimuth) * np.cos(elevation),
                                -np.sin(elevation)]))
    anterior = _unit(np.array([0.0, -1.0, 0.0]) - np.dot([0.0, -1.0, 0.0], long_axis) * long_axis)
    right = _unit(np.cross(long_axis, anterior))
    if right[0] > 0:
        right = -right
    heart_centre = np.array([rng.uniform(15, 28) * scale, spine_y - rng.uniform(75, 90) * scale, 0.0])
    heart = HeartShape(
        centre=heart_centre,
        long_axis=long_axis,
        anterior=anterior,
        right=right,
        semi_axes=(rng.uniform(56, 65) * scale, rng.uniform(46, 53) * scale, rng.uniform(53, 62) * scale),
        base_widening=rng.uniform(0.1, 0.25),
    )
    left_ventricle = HeartShape(
        centre=heart_centre + 0.25 * heart.semi_axes[0] * long_axis - 0.3 * heart.semi_axes[2] * right,
        long_axis=long_axis,
        anterior=anterior,
        right=right,
        semi_axes=(0.55 * heart.semi_axes[0], 0.45 * heart.semi_axes[1], 0.4 * heart.semi_axes[2]),
        base_widening=0.0,
    )

    # Great vessels: the ascending aorta rises from the root at the heart base.
    centerlines, aortic_root, aortic_radius = _coronary_centerlines(heart, rng, scale)
    top = z_range[1] + 20
    ascending = _polyline(np.array([aortic_root, aortic_root + [-8 * scale, 2, 0.5 * (top - aortic_root[2])],
                                    [aortic_root[0] - 12 * scale, aortic_root[1] + 4, top]]))
    coronary_points = np.concatenate([line.points for line in centerlines.values()])
    trunk_start = aortic_root + np.array([22, -18, 0]) * scale
    pulmonary = _clear_of_coronaries(
        _polyline(np.array([trunk_start, trunk_start + np.array([12, 15, 35]) * scale])),
        13.0 * scale, coronary_points, np.array([0.0, -1.0, 0.0]))
    vena_cava_start = aortic_root + np.array([-32, 8, 5]) * scale
    vena_cava = _clear_of_coronaries(
        _polyline(np.array([vena_cava_start, [vena_cava_start[0], vena_cava_start[1], top]])),
        9.0 * scale, coronary_points, np.array([-1.0, 0.0, 0.0]))
    great_vessels = {
        "ascending_aorta": Centerline("ascending_aorta", ascending, np.full(len(ascending), aortic_radius)),
        "pulmonary_trunk": Centerline("pulmonary_trunk", pulmonary, np.full(len(pulmonary), 13.0 * scale)),
        "superior_vena_cava": Centerline("superior_vena_cava", vena_cava, np.full(len(vena_cava), 9.0 * scale)),
    }
    descending = (spine[0] + rng.uniform(22, 32) * scale, spine_y - rng.uniform(20, 30) * scale,
                  rng.uniform(10, 14) * scale)

    heart_low, _ = heart.z_extent(0.0)
    rib_spacing = rng.uniform(24, 30) * scale
    first_rib = z_range[0] - 80 + rng.uniform(0, rib_spacing)
    rib_levels = tuple(np.arange(first_rib, z_range[1] + 100, rib_spacing))

    return Anatomy(
        body_scale=scale,
        body_semi_axes=body,
        subcutaneous_fat_mm=rng.uniform(6, 28) * scale,
        chest_wall_mm=rng.uniform(10, 16) * scale,
        spine_centre=spine,
        vertebral_radius=rng.uniform(15, 19) * scale,
        disc_period=rng.uniform(24, 30) * scale,
        disc_phase=rng.uniform(0, 30),
        sternum_centre=sternum,
        descending_aorta=descending,
        heart=heart,
        epicardial_fat_mm=rng.uniform(5.0, 9.0),
        left_ventricle=left_ventricle,
        diaphragm_dome_z=heart_low + rng.uniform(0, 15),
        centerlines=centerlines,
        great_vessels=great_vessels,
        lung_vessels=_lung_vessels(rng, np.array([heart_centre[0] - 10, spine_y - 55, 0.0]), scale, z_range),
        rib_levels=rib_levels,
        rib_drop=rng.uniform(90, 130) * scale,
        hu={
            "fat": rng.uniform(-110, -85),
            "muscle": rng.uniform(40, 55),
            "lung": rng.uniform(-880, -820),
            "blood": rng.uniform(35, 48),
            "myocardium": rng.uniform(42, 55),
            "liver": rng.uniform(50, 65),
            "cortical_bone": rng.uniform(600, 1000),
            "cancellous_bone": rng.uniform(180, 300),
            "disc": rng.uniform(70, 95),
            "cartilage": rng.uniform(80, 115),
            "table": rng.uniform(-350, -150),
        },
    )


# ---------------------------------------------------------------------------
# Rendering


def ellipse_fraction(x: np.ndarray, y: np.ndarray, centre: tuple[float, float],
                     semi_axes: tuple[float, float], spacing: float) -> np.ndarray:
    """Fraction (0–1) of each pixel inside an axis-aligned ellipse, with a one-pixel soft edge.

    x: column coordinates (mm); y: row coordinates (mm). Returns (len(y), len(x)) float32.
    """
    dx = (x[None, :] - centre[0]) / semi_axes[0]
    dy = (y[:, None] - centre[1]) / semi_axes[1]
    q = dx * dx + dy * dy
    # First-order distance to the boundary: (q − 1) / |∇q|.
    gradient = 2.0 * np.sqrt((dx / semi_axes[0]) ** 2 + (dy / semi_axes[1]) ** 2) + 1e-9
    distance = (q - 1.0) / gradient
    return np.clip(0.5 - distance / spacing, 0.0, 1.0).astype(np.float32)


def blend(image: np.ndarray, fraction: np.ndarray, value: float | np.ndarray) -> None:
    """Mix `value` into `image` in place with the given pixel fractions (partial volume)."""
    image += fraction * (value - image)


def _paint_ellipse(image: np.ndarray, grid: Grid, centre: tuple[float, float],
                   semi_axes: tuple[float, float], value: float, only_below: float | None = None) -> None:
    box = grid.pixel_box(centre[0] - semi_axes[0] - 2, centre[0] + semi_axes[0] + 2,
                         centre[1] - semi_axes[1] - 2, centre[1] + semi_axes[1] + 2)
    if box is None:
        return
    rows, columns = box
    region = image[rows, columns]
    fraction = ellipse_fraction(grid.x[columns], grid.y[rows], centre, semi_axes, grid.spacing)
    if only_below is not None:
        fraction *= region < only_below
    blend(region, fraction, value)


def tube_fraction(grid: Grid, z: float, line: Centerline, z_tolerance: float,
                  extra_radius: float = 0.0) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Pixel fractions inside a tube around `line` on the slice at z.

    The tube is the union of spheres on the centerline points. The distance
    along z is reduced by `z_tolerance` mm, so a thin vessel that passes
    between slice centres still shows, as it would in a thick slice.
    Returns (box, fraction) or None when the tube misses the slice.
    """
    reach_z = float(line.radii.max()) + extra_radius + z_tolerance
    if z < line.z_low - reach_z or z > line.z_high + reach_z:
        return None
    # Wide vessels use every few points: spheres of radius r spaced r / 4 apart
    # leave ridges of about r / 128 on the tube wall.
    stride = max(int(float(line.radii.mean()) / 4 / 0.5), 1)
    points = line.points[::stride]
    radii = line.radii[::stride] + extra_radius
    near = np.abs(points[:, 2] - z) <= radii + z_tolerance
    if not near.any():
        return None
    points = points[near].astype(np.float32)
    radii = radii[near].astype(np.float32)
    reach = float(radii.max()) + 2 * grid.spacing
    box = grid.pixel_box(points[:, 0].min() - reach, points[:, 0].max() + reach,
                         points[:, 1].min() - reach, points[:, 1].max() + reach)
    if box is None:
        return None
    rows, columns = box
    dz = np.maximum(np.abs(points[:, 2] - z) - z_tolerance, 0.0)
    fraction = np.zeros((rows.stop - rows.start, columns.stop - columns.start), dtype=np.float32)

    # Consecutive points lie close together, so each run of them gets its own small box.
    run = 8
    for start in range(0, len(points), run):
        part = slice(start, start + run)
        part_reach = float(radii[part].max()) + 2 * grid.spacing
        part_box = grid.pixel_box(points[part, 0].min() - part_reach, points[part, 0].max() + part_reach,
                                  points[part, 1].min() - part_reach, points[part, 1].max() + part_reach)
        if part_box is None:
            continue
        part_rows, part_columns = part_box
        x = grid.x[part_columns].astype(np.float32)
        y = grid.y[part_rows].astype(np.float32)
        distance_squared = ((x[None, :, None] - points[part, 0]) ** 2 + (y[:, None, None] - points[part, 1]) ** 2
                            + dz[part] ** 2)
        margin = (radii[part] - np.sqrt(distance_squared)).max(axis=2)
        local = fraction[part_rows.start - rows.start:part_rows.stop - rows.start,
                         part_columns.start - columns.start:part_columns.stop - columns.start]
        np.maximum(local, np.clip(0.5 + margin / grid.spacing, 0.0, 1.0), out=local)
    return box, fraction


def _paint_tube(image: np.ndarray, grid: Grid, z: float, line: Centerline, value: float,
                z_tolerance: float, extra_radius: float = 0.0, only_below: float | None = None) -> None:
    found = tube_fraction(grid, z, line, z_tolerance, extra_radius=extra_radius)
    if found is None:
        return
    (rows, columns), fraction = found
    region = image[rows, columns]
    if only_below is not None:
        fraction = fraction * (region < only_below)
    blend(region, fraction, value)


def render_template(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Draw the structures that do not change along z into one (rows, columns) HU image."""
    hu = anatomy.hu
    image = np.full((len(grid.y), len(grid.x)), -1000.0, dtype=np.float32)
    a, b = anatomy.body_semi_axes

    # Patient table under the back.
    table_y = b + 15
    box = grid.pixel_box(-220, 220, table_y, table_y + 12)
    if box is not None:
        image[box] = hu["table"]

    # Body: subcutaneous fat, then the muscle layer of the chest wall, then the thoracic cavity (lung).
    blend(image, ellipse_fraction(grid.x, grid.y, (0.0, 0.0), (a, b), grid.spacing), hu["fat"])
    fat = anatomy.subcutaneous_fat_mm
    blend(image, ellipse_fraction(grid.x, grid.y, (0.0, 0.0), (a - fat, b - fat), grid.spacing), hu["muscle"])
    wall = fat + anatomy.chest_wall_mm
    cavity = (a - wall, b - wall)
    blend(image, ellipse_fraction(grid.x, grid.y, (0.0, 4.0), cavity, grid.spacing), hu["lung"])

    # Posterior mediastinum and paravertebral soft tissue around the spine and descending aorta.
    sx, sy = anatomy.spine_centre
    r = anatomy.vertebral_radius
    _paint_ellipse(image, grid, (sx, sy + 0.3 * r), (2.2 * r, 1.9 * r), hu["muscle"])
    ax, ay, ar = anatomy.descending_aorta
    _paint_ellipse(image, grid, (ax, ay), (ar + 4, ar + 4), hu["fat"])
    _paint_ellipse(image, grid, (ax, ay), (ar, ar), hu["blood"])

    # Anterior mediastinal fat behind the sternum, and the sternum itself.
    tx, ty = anatomy.sternum_centre
    _paint_ellipse(image, grid, (tx + 5, ty + 14), (22 * anatomy.body_scale, 12 * anatomy.body_scale), hu["fat"])
    _paint_ellipse(image, grid, (tx, ty), (16 * anatomy.body_scale, 7 * anatomy.body_scale), hu["cortical_bone"])
    _paint_ellipse(image, grid, (tx, ty), (13 * anatomy.body_scale, 4.5 * anatomy.body_scale), hu["cancellous_bone"])

    # Vertebra: body (cortical shell, cancellous core), spinal canal, posterior arch and spinous process.
    _paint_ellipse(image, grid, (sx, sy), (r, 0.95 * r), hu["cortical_bone"])
    _paint_ellipse(image, grid, (sx, sy), (r - 2.0, 0.95 * r - 2.0), hu["cancellous_bone"])
    canal_y = sy + r + 9 * anatomy.body_scale
    _paint_ellipse(image, grid, (sx, canal_y), (12 * anatomy.body_scale, 10 * anatomy.body_scale), hu["cortical_bone"])
    _paint_ellipse(image, grid, (sx, canal_y), (8 * anatomy.body_scale, 7 * anatomy.body_scale), 15.0)
    _paint_ellipse(image, grid, (sx, canal_y + 22 * anatomy.body_scale),
                   (3.5 * anatomy.body_scale, 12 * anatomy.body_scale), hu["cortical_bone"])
    return image


@dataclass(frozen=True)
class RibRing:
    """Chest-wall pixels where ribs can appear, sorted by `around`.

    around: angular position, 0 at the spine and 1 at the sternum.
    depth_mm: depth below the outer surface of the muscle layer.
    """

    rows: np.ndarray
    columns: np.ndarray
    around: np.ndarray
    depth_mm: np.ndarray


def rib_ring(anatomy: Anatomy, grid: Grid) -> RibRing:
    """Find the chest-wall pixels once; each slice then only tests these for ribs."""
    a, b = anatomy.body_semi_axes
    fat = anatomy.subcutaneous_fat_mm
    x = grid.x[None, :]
    y = grid.y[:, None]
    # Normalised elliptical radius: 1 on the muscle boundary.
    rho = np.sqrt((x / (a - fat)) ** 2 + (y / (b - fat)) ** 2)
    mean_axis = 0.5 * (a + b) - fat
    depth = (1.0 - rho) * mean_axis
    rows, columns = np.nonzero((depth > -2.0) & (depth < anatomy.chest_wall_mm + 6.0))
    around = np.abs(np.arctan2(grid.x[columns], grid.y[rows])) / np.pi
    order = np.argsort(around, kind="stable")
    return RibRing(rows[order], columns[order], around[order], depth[rows, columns][order])


#: Rib cross-sections slope down from the spine to the front: z = level − drop × around^RIB_CURVE.
RIB_CURVE = 1.3


def paint_ribs(image: np.ndarray, anatomy: Anatomy, ring: RibRing, z: float) -> None:
    """Draw the rib cross-sections on one slice, bone from the spine round to the costal cartilage."""
    hu = anatomy.hu
    rib_depth = anatomy.chest_wall_mm * 0.5
    half_height = 5.5 * anatomy.body_scale
    half_thickness = 4.0 * anatomy.body_scale
    for level in anatomy.rib_levels:
        # Angular range where this rib is within half its height of the slice.
        low = max(level - z - half_height, 0.0) / anatomy.rib_drop
        high = (level - z + half_height) / anatomy.rib_drop
        if high <= 0:
            continue
        low_around = max(low ** (1 / RIB_CURVE), 0.12)
        high_around = min(high ** (1 / RIB_CURVE), 0.93)
        if low_around >= high_around:
            continue
        start, stop = np.searchsorted(ring.around, [low_around, high_around])
        around = ring.around[start:stop]
        rib_z = level - anatomy.rib_drop * around ** RIB_CURVE
        q = ((z - rib_z) / half_height) ** 2 + ((ring.depth_mm[start:stop] - rib_depth) / half_thickness) ** 2
        rows = ring.rows[start:stop]
        columns = ring.columns[start:stop]
        cartilage = (q <= 1.0) & (around >= 0.78)
        cortical = (q <= 1.0) & (around < 0.78)
        marrow = (q <= 0.45) & (around < 0.78)
        image[rows[cartilage], columns[cartilage]] = hu["cartilage"]
        image[rows[cortical], columns[cortical]] = hu["cortical_bone"]
        image[rows[marrow], columns[marrow]] = hu["cancellous_bone"]


def paint_slice(image: np.ndarray, anatomy: Anatomy, grid: Grid, z: float) -> None:
    """Draw the z-dependent structures of one slice over a copy of the template."""
    hu = anatomy.hu
    half_slab = 0.25 * grid.slice_thickness

    # Intervertebral disc in place of the vertebral body.
    sx, sy = anatomy.spine_centre
    r = anatomy.vertebral_radius
    if (z - anatomy.disc_phase) % anatomy.disc_period < 6.0 * anatomy.body_scale:
        _paint_ellipse(image, grid, (sx, sy), (r - 0.5, 0.95 * r - 0.5), hu["disc"])

    # Right diaphragm dome with the liver below it, left dome a little lower.
    for side, drop in ((-1.0, 0.0), (1.0, 18.0)):
        dome_height = anatomy.diaphragm_dome_z - drop - z
        if dome_height < 0:
            continue
        a, b = anatomy.body_semi_axes
        spread = np.sqrt(min(dome_height / 60.0, 1.0))
        _paint_ellipse(image, grid, (side * 0.45 * a, 10.0),
                       (0.55 * a * spread + 5, 0.7 * b * spread + 5), hu["liver"] if side < 0 else hu["muscle"],
                       only_below=-500.0)

    # Heart: epicardial fat, myocardium, left-ventricular blood pool.
    heart = anatomy.heart
    low, high = heart.z_extent(anatomy.epicardial_fat_mm)
    if low <= z <= high:
        box = grid.pixel_box(*heart.xy_extent(anatomy.epicardial_fat_mm + 2))
        if box is not None:
            rows, columns = box
            distance = heart.signed_distance(grid.x[columns], grid.y[rows], z)
            region = image[rows, columns]
            blend(region, np.clip(0.5 - (distance - anatomy.epicardial_fat_mm) / grid.spacing, 0, 1), hu["fat"])
            blend(region, np.clip(0.5 - distance / grid.spacing, 0, 1), hu["myocardium"])
            cavity = anatomy.left_ventricle.signed_distance(grid.x[columns], grid.y[rows], z)
            blend(region, np.clip(0.5 - cavity / grid.spacing, 0, 1), hu["blood"])

    # Great vessels in their fat sleeves, then the coronary arteries in the epicardial fat.
    for vessel in anatomy.great_vessels.values():
        _paint_tube(image, grid, z, vessel, hu["fat"], half_slab, extra_radius=3.0, only_below=-200.0)
    for vessel in anatomy.great_vessels.values():
        _paint_tube(image, grid, z, vessel, hu["blood"], half_slab)
    # Fat around every coronary, so the left main and the ostia near the aortic
    # root also run in fat where the egg-shaped heart would cover them.
    for vessel in anatomy.centerlines.values():
        _paint_tube(image, grid, z, vessel, hu["fat"], half_slab, extra_radius=2.5)
    for vessel in anatomy.centerlines.values():
        _paint_tube(image, grid, z, vessel, hu["blood"], half_slab)

    # Pulmonary vessels only where the slice still shows aerated lung.
    for vessel in anatomy.lung_vessels:
        _paint_tube(image, grid, z, vessel, hu["blood"], half_slab, only_below=-500.0)
