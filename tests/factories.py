"""Test conveniences that build CT series through `scoring.ct_builder`, in memory or on disk.

One code path builds CT datasets for every test package, so a test that
breaks the builder breaks loudly everywhere instead of drifting apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from scoring.ct_builder import build_ct_datasets, write_ct_series

#: Stored value of the padding outside the reconstruction circle in test series.
TEST_PADDING_STORED = -2000


def blank_hu(slices: int = 5, rows: int = 32, columns: int = 32, value: float = 40.0) -> np.ndarray:
    """Return a float HU array of the given shape filled with `value` (blood pool ≈ 40 HU)."""
    return np.full((slices, rows, columns), value, dtype=np.float64)


def circle_padding_mask(slices: int, rows: int, columns: int) -> np.ndarray:
    """Return a mask that is True outside the circle inscribed in each slice, as scanners pad."""
    row_index, column_index = np.mgrid[0:rows, 0:columns]
    radius = min(rows, columns) / 2.0
    outside = (row_index - (rows - 1) / 2.0) ** 2 + (column_index - (columns - 1) / 2.0) ** 2 > radius**2
    return np.broadcast_to(outside, (slices, rows, columns)).copy()


def make_ct_datasets(hu: np.ndarray | None = None, **options: Any) -> list[Dataset]:
    """Build CT Image Storage datasets for `hu` (default: `blank_hu()`) with builder `options`."""
    if hu is None:
        hu = blank_hu()
    return build_ct_datasets(hu, **options)


def make_series_dir(folder: Path, hu: np.ndarray | None = None, **options: Any) -> list[Dataset]:
    """Build a CT series like `make_ct_datasets` and write it into `folder`; return the datasets."""
    datasets = make_ct_datasets(hu, **options)
    write_ct_series(datasets, folder)
    return datasets
