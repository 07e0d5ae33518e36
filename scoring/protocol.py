"""Check a CT series against the calcium-scoring acquisition protocol and produce ProtocolFlags.

The Agatston score is defined on non-contrast scans at 120 kVp with 3 mm
slices, and 2.5 mm reconstructions are in clinical use too. Each rule below is "flag" (the score is produced and carries the flag) or "refuse"
(ProtocolRefusedError) per ProtocolPolicy:

- KVP: KVP other than 120 (±0.5), not recorded, or different between
  instances or frames. Multi-frame instances record it in their functional
  groups (CT X-Ray Details, or Unassigned Converted Attributes of Legacy
  Converted Enhanced CT); contrast and body part attributes are looked up
  there too when absent at the top level.
- SLICE_THICKNESS: nominal SliceThickness outside 2.5–3.0 mm or not recorded.
- SLICE_INCREMENT: measured increment outside 2.5–3.0 mm (same policy as thickness).
- CONTRAST: a contrast agent recorded in ContrastBolusAgent,
  ContrastBolusAgentSequence, ContrastBolusIngredient, a positive
  ContrastBolusVolume or ContrastBolusTotalDose, or an Enhanced CT
  ContrastBolusAgentAdministered YES. Agent texts that state absence
  (NO_CONTRAST_TEXTS) do not count. When the header records no agent, the
  images are searched for blood enhanced by contrast (`image_contrast_evidence`).
- BODY_PART: BodyPartExamined present and not one of CARDIAC_BODY_PARTS. An
  empty or missing BodyPartExamined is "not recorded" and not flagged,
  because the attribute is optional (type 3) and many scanners leave it out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from scoring.config import ProtocolPolicy
from scoring.errors import ProtocolRefusedError
from scoring.slice_geometry import (
    functional_group_item,
    functional_group_value,
    instance_attribute,
    optional_float,
)
from scoring.volume import ProtocolFlag

logger = logging.getLogger(__name__)

#: Tube voltage of the calcium-scoring protocol, and the accepted deviation.
EXPECTED_KVP = 120.0
KVP_TOLERANCE = 0.5

#: Accepted slice thickness and increment range in mm, inclusive, with a
#: tolerance for values such as 3.0000001 written by scanners.
SLICE_RANGE_MM = (2.5, 3.0)
SLICE_RANGE_TOLERANCE_MM = 0.01

#: BodyPartExamined values accepted as cardiac. CHEST and HEART are PS3.16
#: Annex L defined terms; CORONARYARTERY and THORAX are accepted as well
#: because cardiac protocols also write them.
CARDIAC_BODY_PARTS = frozenset({"CHEST", "HEART", "CORONARYARTERY", "THORAX"})

#: ContrastBolusAgent texts, upper-cased and stripped, that record no agent.
NO_CONTRAST_TEXTS = frozenset({"NONE", "NO", "N", "NIL", "NO CONTRAST", "NON-CONTRAST", "NONCONTRAST", "0"})

#: HU range of blood enhanced by iodinated contrast. Unenhanced blood is
#: 30–60 HU, and the blood pool of a CT angiogram is 250–600 HU. Above 700 HU
#: lie cortical bone, dense calcium and metal.
ENHANCED_BLOOD_HU = (180.0, 700.0)

#: Radius in mm of the largest sphere of ENHANCED_BLOOD_HU voxels from which
#: a series counts as contrast-enhanced. The heart chambers of a real CT
#: angiogram (tests/conftest.py) contain a sphere of 24.2 mm radius. In an
#: unenhanced scan only cancellous bone lies in that range. A vertebral body is
#: 20–30 mm high, so its sphere stays below 15 mm (an estimate). The largest
#: sphere was 9.8 mm in the QRM phantom scan and 15.0 mm in 72 digital phantom
#: series. The threshold lies about halfway between 15 and 24 mm.
# NOTE: no real unenhanced patient scan was at hand to measure the margin. A
# large calcified mass, or oral contrast in the stomach, could reach the radius.
ENHANCED_POOL_RADIUS_MM = 19.0

#: In-plane pixel size in mm of the enhanced-blood search. Slices are
#: averaged down to about this size, so the search takes under a second.
_POOL_SAMPLING_MM = 2.0


def kvp_of(header: Dataset) -> float | None:
    """Return the KVP of an instance (its first frame for a multi-frame instance); see `kvp_values`."""
    return optional_float(instance_attribute(header, "KVP"))


def kvp_values(header: Dataset) -> list[float]:
    """Return the KVP values recorded in an instance, one per frame for a multi-frame instance.

    The top-level KVP applies to every frame. Otherwise each frame's KVP comes
    from its functional groups: CT X-Ray Details (Enhanced CT) or Unassigned
    Per-Frame or Shared Converted Attributes (Legacy Converted Enhanced CT).
    Frames without a KVP are left out.
    """
    top_level = optional_float(header.get("KVP"))
    if top_level is not None:
        return [top_level]
    frames = int(header.get("NumberOfFrames", 1) or 1)
    values = (optional_float(functional_group_value(header, index, "KVP")) for index in range(frames))
    return [value for value in values if value is not None]


def _text_attribute(header: Dataset, keyword: str) -> str:
    return str(instance_attribute(header, keyword) or "").strip()


def contrast_evidence(header: Dataset) -> str | None:
    """Return a description of the contrast agent recorded in an instance, None when none is recorded.

    Only the header is read here. `check_protocol` searches the images
    (`image_contrast_evidence`) when no instance records an agent.

    Each attribute is read at the top level or, for multi-frame instances, in
    the functional groups of the first frame (`instance_attribute`).
    """
    agent = _text_attribute(header, "ContrastBolusAgent")
    if agent and agent.upper() not in NO_CONTRAST_TEXTS:
        return f"ContrastBolusAgent '{agent}'"
    agent_sequence = instance_attribute(header, "ContrastBolusAgentSequence")
    if agent_sequence:
        meanings = [str(item.get("CodeMeaning", item.get("CodeValue", "?"))) for item in agent_sequence]  # type: ignore[attr-defined]
        return f"ContrastBolusAgentSequence ({', '.join(meanings)})"
    ingredient = _text_attribute(header, "ContrastBolusIngredient")
    if ingredient and ingredient.upper() not in NO_CONTRAST_TEXTS:
        return f"ContrastBolusIngredient '{ingredient}'"
    for keyword in ("ContrastBolusVolume", "ContrastBolusTotalDose"):
        amount = optional_float(instance_attribute(header, keyword))
        if amount is not None and amount > 0:
            return f"{keyword} {amount:g} ml"
    usage = functional_group_item(header, 0, "ContrastBolusUsageSequence")
    if usage is not None and str(usage.get("ContrastBolusAgentAdministered", "")).upper() == "YES":
        return "ContrastBolusAgentAdministered YES"
    return None


@dataclass(frozen=True)
class EnhancedRegion:
    """The thickest region of ENHANCED_BLOOD_HU voxels in a volume.

    radius_mm: radius of the largest sphere inside it. slice_index: the
    slice of that sphere's centre (0-based, volume order). median_hu: median
    HU of its voxels at least half ENHANCED_POOL_RADIUS_MM deep.
    """

    radius_mm: float
    slice_index: int
    median_hu: float


def largest_enhanced_region(hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> EnhancedRegion | None:
    """Find the thickest region of ENHANCED_BLOOD_HU voxels; None when no voxel lies in that range.

    hu: (slices, rows, columns) HU in volume order. spacing_mm: slice
    increment, row spacing and column spacing. Each slice is averaged over
    square blocks of about _POOL_SAMPLING_MM, so the radius is known to about
    2 mm. The averaging and a 3 × 3 median filter lower the noise, which
    would otherwise punch holes into a weakly enhanced blood pool.
    """
    increment, row_spacing, column_spacing = (float(value) for value in spacing_mm)
    step = max(1, int(_POOL_SAMPLING_MM // min(row_spacing, column_spacing)))
    rows, columns = hu.shape[1] // step * step, hu.shape[2] // step * step
    blocks = hu[:, :rows, :columns].reshape(hu.shape[0], rows // step, step, columns // step, step)
    # A 3 × 3 median over the averaged pixels removes single noisy pixels but keeps the edges of a region.
    sampled = ndimage.median_filter(blocks.mean(axis=(2, 4), dtype=np.float32), size=(1, 3, 3))
    low, high = ENHANCED_BLOOD_HU
    pool = (sampled >= low) & (sampled <= high)
    if not pool.any():
        return None
    # A zero border: a region cut by the edge of the volume is measured only up to that edge.
    sampling = (increment, row_spacing * step, column_spacing * step)
    distance = ndimage.distance_transform_edt(np.pad(pool, 1), sampling=sampling)[1:-1, 1:-1, 1:-1]
    deepest = np.unravel_index(int(np.argmax(distance)), distance.shape)
    core = distance >= min(ENHANCED_POOL_RADIUS_MM / 2, float(distance.max()))
    return EnhancedRegion(float(distance[deepest]), int(deepest[0]), float(np.median(sampled[core])))


def image_contrast_evidence(hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> str | None:
    """Return a description of contrast-enhanced blood in the images, None when there is none.

    The evidence is a sphere of at least ENHANCED_POOL_RADIUS_MM radius whose
    voxels all lie within ENHANCED_BLOOD_HU: a blood pool, too thick to be
    bone or calcium (`largest_enhanced_region`). This catches a CT angiogram
    whose header records no agent. An agent in a late venous phase, with
    blood below 180 HU, is not seen.
    """
    region = largest_enhanced_region(hu, spacing_mm)
    if region is None or region.radius_mm < ENHANCED_POOL_RADIUS_MM:
        return None
    low, high = ENHANCED_BLOOD_HU
    return (
        f"the images show a {2 * region.radius_mm:.0f} mm wide region of {low:.0f}–{high:.0f} HU "
        f"(median {region.median_hu:.0f} HU) around slice {region.slice_index + 1} of {len(hu)} "
        "in position order, as blood enhanced by contrast agent; the header records no agent"
    )


def validate_policy(policy: ProtocolPolicy) -> None:
    """Raise ValueError when a ProtocolPolicy field is neither "flag" nor "refuse"."""
    for field_name in ("kvp", "thickness", "contrast", "body_part"):
        action = getattr(policy, field_name)
        if action not in ("flag", "refuse"):
            raise ValueError(f"ProtocolPolicy.{field_name} is {action!r}; expected 'flag' or 'refuse'")


def _outside_slice_range(value: float) -> bool:
    low, high = SLICE_RANGE_MM
    return value < low - SLICE_RANGE_TOLERANCE_MM or value > high + SLICE_RANGE_TOLERANCE_MM


def _kvp_deviation(headers: Sequence[Dataset]) -> ProtocolFlag | None:
    kvp = kvp_of(headers[0])
    distinct_kvps = sorted({value for header in headers for value in kvp_values(header)})
    if len(distinct_kvps) > 1:
        values = ", ".join(f"{value:g}" for value in distinct_kvps)
        message = f"kVp differs between slices ({values}); Agatston thresholds and weights are defined for 120 kVp"
        return ProtocolFlag("KVP", message)
    if kvp is None:
        return ProtocolFlag("KVP", "kVp is not recorded; calcium scoring expects 120 kVp")
    if abs(kvp - EXPECTED_KVP) > KVP_TOLERANCE:
        return ProtocolFlag("KVP", f"acquired at {kvp:g} kVp; Agatston thresholds and weights are defined for 120 kVp")
    return None


def _slice_deviations(
    slice_thickness: float | None, slice_increment: float, policy: ProtocolPolicy
) -> list[tuple[str, ProtocolFlag]]:
    found: list[tuple[str, ProtocolFlag]] = []
    low, high = SLICE_RANGE_MM
    if slice_thickness is None:
        message = f"slice thickness is not recorded; calcium scoring expects {low:.1f}–{high:.1f} mm"
        found.append((policy.thickness, ProtocolFlag("SLICE_THICKNESS", message)))
    elif _outside_slice_range(slice_thickness):
        message = f"slice thickness is {slice_thickness:g} mm; calcium scoring expects {low:.1f}–{high:.1f} mm"
        found.append((policy.thickness, ProtocolFlag("SLICE_THICKNESS", message)))
    if _outside_slice_range(slice_increment):
        message = f"slice increment is {slice_increment:.3f} mm; calcium scoring expects {low:.1f}–{high:.1f} mm"
        found.append((policy.thickness, ProtocolFlag("SLICE_INCREMENT", message)))
    return found


def _contrast_deviation(
    headers: Sequence[Dataset], hu: np.ndarray | None = None, spacing_mm: tuple[float, float, float] | None = None
) -> ProtocolFlag | None:
    for header in headers:
        evidence = contrast_evidence(header)
        if evidence is not None:
            message = f"contrast agent recorded ({evidence}); calcium scoring needs a non-contrast scan"
            return ProtocolFlag("CONTRAST", message)
    if hu is not None and spacing_mm is not None:
        evidence = image_contrast_evidence(hu, spacing_mm)
        if evidence is not None:
            return ProtocolFlag("CONTRAST", f"{evidence}; calcium scoring needs a non-contrast scan")
    return None


def _body_part_deviation(headers: Sequence[Dataset]) -> ProtocolFlag | None:
    body_part = _text_attribute(headers[0], "BodyPartExamined").upper()
    if body_part and body_part not in CARDIAC_BODY_PARTS:
        return ProtocolFlag("BODY_PART", f"BodyPartExamined is {body_part}; calcium scoring expects CHEST or HEART")
    return None


def _raise_refused(found: Sequence[tuple[str, ProtocolFlag | None]], series: str) -> None:
    rejected = [flag for action, flag in found if action == "refuse" and flag is not None]
    if rejected:
        reasons = "; ".join(flag.message for flag in rejected)
        raise ProtocolRefusedError(
            f"series {series} is not a calcium-scoring acquisition: {reasons}. "
            "Send a non-contrast 120 kVp cardiac series with 2.5–3.0 mm slices, or change the protocol policy "
            "in node.toml ([scoring] contrast_policy, kvp_policy, thickness_policy, body_part_policy)"
        )


def check_header_protocol(headers: Sequence[Dataset], *, policy: ProtocolPolicy, series: str) -> None:
    """Raise ProtocolRefusedError for refused kVp, contrast and body part deviations.

    These rules need only the headers, so `load_series` checks them before
    the slice geometry. A series that will be rejected anyway (a contrast
    scan) is then reported for that reason, not for a gap that the operator
    might fix by re-sending it. `check_protocol` repeats these checks.
    """
    validate_policy(policy)
    _raise_refused(
        [
            (policy.kvp, _kvp_deviation(headers)),
            (policy.contrast, _contrast_deviation(headers)),
            (policy.body_part, _body_part_deviation(headers)),
        ],
        series,
    )


def check_protocol(
    headers: Sequence[Dataset],
    *,
    slice_thickness: float | None,
    slice_increment: float,
    policy: ProtocolPolicy,
    series: str,
    hu: np.ndarray | None = None,
    pixel_spacing: tuple[float, float] | None = None,
) -> tuple[ProtocolFlag, ...]:
    """Return the protocol flags of a series, or raise for deviations whose policy is "refuse".

    headers: the series' instances (any order). Body part comes from the
        first, kVp from all of them, and contrast from any.
    slice_thickness: nominal thickness in mm, None when not recorded.
    slice_increment: measured increment in mm.
    hu, pixel_spacing: the decoded volume and its (row, column) spacing in
        mm. When both are given and the headers record no agent, the images
        are searched for contrast-enhanced blood.
    Raises ProtocolRefusedError listing every refused deviation.
    """
    validate_policy(policy)
    found: list[tuple[str, ProtocolFlag | None]] = [(policy.kvp, _kvp_deviation(headers))]
    found.extend(_slice_deviations(slice_thickness, slice_increment, policy))
    spacing_mm = (slice_increment, *pixel_spacing) if pixel_spacing is not None else None
    found.append((policy.contrast, _contrast_deviation(headers, hu, spacing_mm)))
    found.append((policy.body_part, _body_part_deviation(headers)))
    if not _text_attribute(headers[0], "BodyPartExamined"):
        logger.info("series %s: BodyPartExamined is not recorded; not flagged", series)

    _raise_refused(found, series)
    flags = tuple(flag for _, flag in found if flag is not None)
    for flag in flags:
        logger.warning("series %s: protocol flag %s: %s", series, flag.code, flag.message)
    return flags
