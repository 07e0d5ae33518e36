"""Weak coronary artery region (CAR) annotations of the digital phantom, drawn like scribbles.

On each annotated slice and for each artery that crosses the slice, the
simulated annotator draws a scribble inside the artery and a closed contour
around it at `contour_radius_mm`. Pixels outside every contour, beyond a
gap, are OTHER_CAR; the band between a scribble and the outside stays
unlabelled, and so do the pixels outside the reconstruction circle and the
slices the annotator skipped. Values are those of `scoring.phantom`
(REGION_UNLABELLED, 1 LAD, 2 LCX, 3 RCA, REGION_OTHER_CAR).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from scoring.phantom_anatomy import ARTERY_OF_SEGMENT, Anatomy, Grid
from scoring.result import LAD, RCA

#: Region map value of an unlabelled pixel (ignored by the region loss).
REGION_UNLABELLED = 0

#: Region map value of a pixel annotated as outside every coronary artery region.
#: 5 rather than 4, so it is never confused with OTHER_CALCIUM (4) of the CAC labels.
REGION_OTHER_CAR = 5


def draw_regions(anatomy: Anatomy, grid: Grid, labels: np.ndarray, padding_mask: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Draw scribbles, contours and OTHER_CAR for every slice; return a uint8 region map.

    labels: the true CAC labels, so each artery's own calcium is scribbled
    with its artery and never with another one.
    """
    regions = np.zeros(grid.shape, dtype=np.uint8)
    contour_radius = rng.uniform(7.0, 13.0)
    gap = rng.uniform(1.5, 4.0)
    skipped = rng.uniform(size=len(grid.z)) < 0.08
    points_by_artery: dict[int, list[np.ndarray]] = {}
    radii_by_artery: dict[int, list[np.ndarray]] = {}
    for name, line in anatomy.centerlines.items():
        points_by_artery.setdefault(ARTERY_OF_SEGMENT[name], []).append(line.points)
        radii_by_artery.setdefault(ARTERY_OF_SEGMENT[name], []).append(line.radii)
    artery_points = {a: np.concatenate(p) for a, p in points_by_artery.items()}
    artery_radii = {a: np.concatenate(r) for a, r in radii_by_artery.items()}

    coronary_slices = ((labels >= LAD) & (labels <= RCA)).any(axis=(1, 2))
    for index, z in enumerate(grid.z):
        if skipped[index]:
            continue
        near_any = np.zeros(grid.shape[1:], dtype=bool)
        scribbles = np.zeros(grid.shape[1:], dtype=np.uint8)
        conflict = np.zeros(grid.shape[1:], dtype=bool)
        no_calcium = np.zeros(grid.shape[1:], dtype=bool)
        for artery in range(LAD, RCA + 1):
            own_calcium = labels[index] == artery if coronary_slices[index] else no_calcium
            calcium_rows, calcium_columns = np.nonzero(own_calcium) if coronary_slices[index] else ((), ())
            in_slab = np.abs(artery_points[artery][:, 2] - z) <= grid.slice_thickness / 2
            if not in_slab.any() and len(calcium_rows) == 0:
                continue
            points = artery_points[artery][in_slab]
            radii = artery_radii[artery][in_slab]
            reach = contour_radius + gap + 2 * grid.spacing
            xs = np.concatenate((points[:, 0], grid.x[np.asarray(calcium_columns, dtype=int)]))
            ys = np.concatenate((points[:, 1], grid.y[np.asarray(calcium_rows, dtype=int)]))
            box = grid.pixel_box(xs.min() - reach, xs.max() + reach, ys.min() - reach, ys.max() + reach)
            if box is None:
                continue
            rows, columns = box

            # Seeds: the centerline points of the slab, rasterised, plus the artery's own calcium.
            seeds = own_calcium[rows, columns].copy()
            seed_rows = np.rint((points[:, 1] - grid.y[rows.start]) / grid.spacing).astype(int)
            seed_columns = np.rint((points[:, 0] - grid.x[columns.start]) / grid.spacing).astype(int)
            inside = ((seed_rows >= 0) & (seed_rows < seeds.shape[0])
                      & (seed_columns >= 0) & (seed_columns < seeds.shape[1]))
            seeds[seed_rows[inside], seed_columns[inside]] = True
            if not seeds.any():
                continue
            distance = ndimage.distance_transform_edt(~seeds, sampling=grid.spacing)

            scribble_radius = max(0.6 * float(radii.mean()) if len(radii) else 0.0, grid.spacing)
            scribble = (distance <= scribble_radius) | own_calcium[rows, columns]
            target = scribbles[rows, columns]
            conflict[rows, columns] |= scribble & (target != 0) & (target != artery)
            target[scribble] = artery
            near_any[rows, columns] |= distance <= contour_radius + gap

        slice_regions = np.where(near_any, REGION_UNLABELLED, REGION_OTHER_CAR).astype(np.uint8)
        slice_regions[scribbles != 0] = scribbles[scribbles != 0]
        slice_regions[conflict] = REGION_UNLABELLED

        # Never scribble an artery over calcium of another artery, nor call coronary calcium OTHER_CAR.
        if coronary_slices[index]:
            coronary = (labels[index] >= LAD) & (labels[index] <= RCA)
            slice_regions[coronary & (slice_regions != labels[index])] = REGION_UNLABELLED
        slice_regions[padding_mask[index]] = REGION_UNLABELLED
        regions[index] = slice_regions
    return regions
