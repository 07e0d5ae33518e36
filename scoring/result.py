"""The outcome of scoring one series: per-artery scores, lesions, risk category.

The JSON form (`ScoringResult.to_json`) is a public interface: `cacs-node
score --json`, the phantom's truth.json and the SR writer all use these keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scoring.volume import ProtocolFlag

#: Label values of a CAC label volume. The left main (LM) belongs to the LAD
#: subtree. OTHER_CALCIUM marks non-coronary calcium, which scoring ignores.
BACKGROUND = 0
LAD = 1
LCX = 2
RCA = 3
OTHER_CALCIUM = 4

#: Artery names in label order; "total" is added in score dictionaries.
ARTERIES: tuple[str, ...] = ("LAD", "LCX", "RCA")
ARTERY_LABELS: dict[str, int] = {"LAD": LAD, "LCX": LCX, "RCA": RCA}
SCORE_KEYS: tuple[str, ...] = ARTERIES + ("total",)


@dataclass(frozen=True)
class Lesion:
    """One 3D lesion: 6-connected voxels ≥ threshold of one artery, at least the minimum volume.

    centroid_mm: centroid in patient coordinates (x, y, z), mm.
    agatston: this lesion's share of the artery's Agatston score, normalised.
    """

    artery: str
    voxel_count: int
    volume_mm3: float
    mass_mg: float
    peak_hu: float
    agatston: float
    centroid_mm: tuple[float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "artery": self.artery,
            "voxel_count": self.voxel_count,
            "volume_mm3": self.volume_mm3,
            "mass_mg": self.mass_mg,
            "peak_hu": self.peak_hu,
            "agatston": self.agatston,
            "centroid_mm": list(self.centroid_mm),
        }


@dataclass(frozen=True)
class ScoringResult:
    """Agatston, volume and mass per artery and in total, with risk category and CAC-DRS.

    Score dictionaries have the keys of SCORE_KEYS ("LAD", "LCX", "RCA", "total").
    normalization_factor: slice increment / 3 mm, already applied to Agatston.
    risk_category: "I" (0), "II" (>0 and <100), "III" ([100, 300)), "IV" (≥300).
    cac_drs: "A0" for a zero score, else "A1"–"A3" followed by "/N" and the
        number of arteries with calcium, for example "A2/N3".
    mass_calibration_factor: mg HA per cm³ per HU used for the mass score.
    mass_calibrated: False when the factor is the configured default rather
        than the series' own Calcium Scoring Mass Factor Device.
    """

    series_instance_uid: str
    normalization_factor: float
    agatston: dict[str, float]
    volume_mm3: dict[str, float]
    mass_mg: dict[str, float]
    risk_category: str
    cac_drs: str
    lesions: tuple[Lesion, ...]
    mass_calibration_factor: float
    mass_calibrated: bool
    threshold_hu: float = 130.0
    flags: tuple[ProtocolFlag, ...] = field(default_factory=tuple)

    @property
    def arteries_with_calcium(self) -> tuple[str, ...]:
        """Arteries whose Agatston or volume score is above zero, in label order."""
        return tuple(a for a in ARTERIES if self.agatston[a] > 0 or self.volume_mm3[a] > 0)

    def to_json(self) -> dict[str, Any]:
        """Return the `score --json` object. Its keys are a public interface."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "normalization_factor": self.normalization_factor,
            "flags": [{"code": f.code, "message": f.message} for f in self.flags],
            "agatston": dict(self.agatston),
            "volume_mm3": dict(self.volume_mm3),
            "mass_mg": dict(self.mass_mg),
            "risk_category": self.risk_category,
            "cac_drs": self.cac_drs,
            "mass_calibration_factor": self.mass_calibration_factor,
            "mass_calibrated": self.mass_calibrated,
            "threshold_hu": self.threshold_hu,
            "lesions": [lesion.to_json() for lesion in self.lesions],
        }
