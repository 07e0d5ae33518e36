"""Scoring parameters and protocol policies, as frozen settings objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["flag", "refuse"]

#: Agatston threshold in HU, inclusive. Also the model's candidate-mask threshold.
CALCIUM_THRESHOLD_HU = 130.0

#: Mass calibration factor in mg HA per cm³ per HU used when the series does not
#: carry Calcium Scoring Mass Factor Device (0018,9352). A mass computed with it
#: is flagged as uncalibrated. 0.743 mg/cm³/HU is the value commonly quoted for
#: 120 kVp (about 1 mg HA/cm³ per 1.34 HU of water-equivalent attenuation).
DEFAULT_MASS_CALIBRATION_FACTOR = 0.743

#: Maximum length of a model version in the DICOM outputs: Software Versions (LO, 64
#: characters) carries it as "model <version>".
MAX_MODEL_VERSION_LENGTH = 64 - len("model ")

#: Maximum length of a model caution. The SEG's Algorithm Parameters (LT) and
#: the SR's TEXT items carry it in full.
MAX_MODEL_CAUTION_LENGTH = 512


def model_identity_problem(model_version: object, caution: object) -> str | None:
    """Describe why a model version or caution cannot go into the DICOM outputs, or return None.

    Both must be texts without a backslash (the DICOM value separator), the
    version at most MAX_MODEL_VERSION_LENGTH characters and not empty, the
    caution (None for none) at most MAX_MODEL_CAUTION_LENGTH characters.
    """
    checks = (
        ("model version", model_version, MAX_MODEL_VERSION_LENGTH, False),
        ("model caution", caution, MAX_MODEL_CAUTION_LENGTH, True),
    )
    for name, value, limit, optional in checks:
        if value is None and optional:
            continue
        if not isinstance(value, str) or not value.strip() or len(value) > limit or "\\" in value:
            return (f"{name} {value!r} is invalid; expected a non-empty text of at most {limit} "
                    "characters without a backslash")
    return None


@dataclass(frozen=True)
class ProtocolPolicy:
    """Policies for acquisitions that deviate from the calcium-scoring protocol.

    kvp: kVp other than 120 (default "flag").
    thickness: slice thickness or increment outside 2.5–3.0 mm (default "flag").
    contrast: a contrast agent recorded in the Contrast/Bolus module, or blood
        enhanced by contrast in the images (default "refuse").
    body_part: BodyPartExamined neither chest nor heart (default "flag").
    """

    kvp: Policy = "flag"
    thickness: Policy = "flag"
    contrast: Policy = "refuse"
    body_part: Policy = "flag"


@dataclass(frozen=True)
class ScoringParameters:
    """Agatston, volume and mass parameters.

    threshold_hu: inclusive HU threshold for calcium (default 130).
    minimum_lesion_area_mm2: inclusive minimum 2D lesion area (default 1.0 mm²).
    minimum_lesion_volume_mm3: inclusive minimum 3D lesion volume for the lesion
        list (default 1.5 mm³).
    reference_increment_mm: slice increment of the classic Agatston score (default 3.0 mm).
    mass_calibration_factor: mg HA per cm³ per HU when the series carries none
        (default 0.743).
    """

    threshold_hu: float = CALCIUM_THRESHOLD_HU
    minimum_lesion_area_mm2: float = 1.0
    minimum_lesion_volume_mm3: float = 1.5
    reference_increment_mm: float = 3.0
    mass_calibration_factor: float = DEFAULT_MASS_CALIBRATION_FACTOR
