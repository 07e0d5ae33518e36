"""A label map of the QRM phantom scan's calcium inserts, for writer tests and the docs image."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def qrm_insert_labels(volume) -> np.ndarray:
    """Label the QRM calcium inserts: voxels ≥ 130 HU in the insert ring, one artery per insert group.

    The ring lies 35 to 100 pixels (17 to 49 mm) from the insert's centre at
    row 215, column 258, measured on a maximum intensity projection of the
    scan. It leaves out the central calibration rod (about 21 pixels in
    radius) and the phantom shell.
    Each of the three density groups sits in its own 120° sector and gets an
    artery arbitrarily: left LAD, upper right LCX, lower right RCA. 3D
    components under 10 voxels are image noise and stay unlabelled.
    """
    rows, columns = np.mgrid[: volume.shape[1], : volume.shape[2]]
    row_offset, column_offset = rows - 215, columns - 258
    radius = np.hypot(row_offset, column_offset)
    angle = np.degrees(np.arctan2(row_offset, column_offset))
    ring = (radius >= 35) & (radius <= 100)
    sector = np.where(np.abs(angle) > 120, 1, np.where(angle < 0, 2, 3)).astype(np.uint8)

    calcium = (volume.hu >= 130) & ring[None]
    components, count = ndimage.label(calcium)
    sizes = ndimage.sum(calcium, components, range(1, count + 1))
    keep = np.isin(components, 1 + np.flatnonzero(sizes >= 10))
    return np.where(keep, sector[None], 0).astype(np.uint8)
