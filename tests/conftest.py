"""Fixtures shared by every test package: the real CT data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def _shared_data_dir() -> Path:
    configured = os.environ.get("CACS_SHARED_DATA")
    if configured:
        return Path(configured)
    return REPOSITORY_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The read-only real CT data (../shared/data or $CACS_SHARED_DATA)."""
    path = _shared_data_dir()
    if not (path / "qrm-phantom-toshiba").is_dir():
        pytest.fail(
            f"real CT test data not found at {path}; check out shared/ beside the "
            "repository or set CACS_SHARED_DATA to its data folder"
        )
    return path


@pytest.fixture(scope="session")
def qrm_dicom_dir(shared_data_dir: Path) -> Path:
    """The 47-slice QRM calcium phantom scan (Toshiba Aquilion ONE, 120 kVp, 3 mm)."""
    return shared_data_dir / "qrm-phantom-toshiba" / "dicom"


@pytest.fixture(scope="session")
def abdomen_dicom_dir(shared_data_dir: Path) -> Path:
    """20 contrast-enhanced abdominal slices, JPEG 2000 lossless, without UIDs."""
    return shared_data_dir / "abdomen-contrast-j2k" / "dicom"


@pytest.fixture(scope="session")
def chest_cta_hu(shared_data_dir: Path) -> np.ndarray:
    """The real chest CT angiogram as 3 mm axial slices of 1.5 mm pixels, in increasing z, float HU.

    The NIfTI file stores 1.5 mm isotropic voxels with an identity direction.
    Its array is therefore already (slices, rows, columns) in DICOM axial
    order. Pairs of slices are averaged into the 3 mm slices of a calcium scan.
    """
    import SimpleITK as sitk

    image = sitk.ReadImage(str(shared_data_dir / "chest-cta-anatomy" / "aorta_report_ct_cropped.nii.gz"))
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert image.GetSpacing() == (1.5, 1.5, 1.5)
    thin = sitk.GetArrayFromImage(image).astype(np.float64)
    pairs = thin[: thin.shape[0] // 2 * 2].reshape(-1, 2, *thin.shape[1:])
    return np.round(pairs.mean(axis=1))
