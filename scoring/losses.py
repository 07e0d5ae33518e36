"""Focal loss with class weights and masks, and the two ways of weighting the task losses.

Region task T_R: focal loss over annotated (scribbled) pixels only. Lesion
task T_L: focal loss over candidate pixels (HU ≥ 130) only. Both use γ = 2
and down-weight the background class to 0.01.

Task weighting, after Kendall, Gal and Cipolla (CVPR 2018), as used by
Föllmer et al. (Med Phys 2022):
- uncertainty: L = L_R / σ_R² + L_L / σ_L² + log σ_R + log σ_L, where the
  learned parameters are the log variances s = log σ², so the loss is
  computed as L_R·exp(−s_R) + L_L·exp(−s_L) + s_R/2 + s_L/2;
- static: L = α L_R + (1 − α) L_L (α = 0.4 in the comparison).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

#: Focusing parameter γ of the focal loss.
FOCAL_GAMMA = 2.0

#: Class weights of T_R in class order OTHER_CAR, LAD, LCX, RCA.
REGION_CLASS_WEIGHTS: tuple[float, ...] = (0.01, 1.0, 1.0, 1.0)

#: Class weights of T_L in class order OTHER_CAC, CAC.
LESION_CLASS_WEIGHTS: tuple[float, ...] = (0.01, 1.0)

#: Class weights of the single-task model in class order OTHER_CAC, LAD, LCX, RCA.
MULTICLASS_CLASS_WEIGHTS: tuple[float, ...] = (0.01, 1.0, 1.0, 1.0)

#: α of the static weighting in the comparison: the region task's share.
DEFAULT_STATIC_ALPHA = 0.4


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: Sequence[float] | torch.Tensor,
    valid: torch.Tensor | None = None,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """Class-weighted focal loss averaged over the valid pixels.

    Per pixel: −w[t] · (1 − p_t)^γ · log p_t, where t is the target class and
    p_t its softmax probability. The result is the sum over valid pixels
    divided by the number of valid pixels (not by the sum of weights).

    logits: (N, C, H, W). target: (N, H, W) integer class indices; values at
    invalid pixels are ignored and may be anything, negative included.
    class_weights: C weights. valid: (N, H, W) bool, None for all pixels.
    Returns a scalar tensor; 0 (still attached to the graph) when no pixel is valid.
    Raises ValueError when shapes or the number of weights do not match.
    """
    if logits.ndim != 4:
        raise ValueError(f"expected logits of shape (N, C, H, W), got {tuple(logits.shape)}")
    classes = logits.shape[1]
    weights = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    if weights.shape != (classes,):
        raise ValueError(f"expected {classes} class weights, got {tuple(weights.shape)}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"expected target of shape {expected}, got {tuple(target.shape)}")
    if valid is None:
        valid = torch.ones(expected, dtype=torch.bool, device=logits.device)
    elif tuple(valid.shape) != expected:
        raise ValueError(f"expected valid mask of shape {expected}, got {tuple(valid.shape)}")

    valid = valid.bool()
    count = valid.sum()
    if count == 0:
        return logits.sum() * 0.0

    # Invalid pixels get class 0 so that gather stays in range; their loss is masked out.
    safe_target = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
    log_probabilities = functional.log_softmax(logits, dim=1)
    log_pt = log_probabilities.gather(1, safe_target[:, None]).squeeze(1)
    pt = log_pt.exp()
    per_pixel = -weights[safe_target] * (1.0 - pt).pow(gamma) * log_pt
    return (per_pixel * valid).sum() / count


class UncertaintyWeighting(nn.Module):
    """L = L_R·exp(−s_R) + L_L·exp(−s_L) + s_R/2 + s_L/2 with learned s = log σ².

    Both log variances start at 0 (σ = 1), so training starts from L_R + L_L.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_variance_region = nn.Parameter(torch.zeros(()))
        self.log_variance_lesion = nn.Parameter(torch.zeros(()))

    def forward(self, region_loss: torch.Tensor, lesion_loss: torch.Tensor) -> torch.Tensor:
        return (
            region_loss * torch.exp(-self.log_variance_region)
            + lesion_loss * torch.exp(-self.log_variance_lesion)
            + 0.5 * self.log_variance_region
            + 0.5 * self.log_variance_lesion
        )

    def sigmas(self) -> tuple[float, float]:
        """(σ_R, σ_L) as floats, for logs and checkpoint metadata."""
        return (
            float(torch.exp(0.5 * self.log_variance_region.detach())),
            float(torch.exp(0.5 * self.log_variance_lesion.detach())),
        )


class StaticWeighting(nn.Module):
    """L = α L_R + (1 − α) L_L with a fixed α in [0, 1]."""

    def __init__(self, alpha: float = DEFAULT_STATIC_ALPHA) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"static weight alpha must lie in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def forward(self, region_loss: torch.Tensor, lesion_loss: torch.Tensor) -> torch.Tensor:
        return self.alpha * region_loss + (1.0 - self.alpha) * lesion_loss

    def sigmas(self) -> tuple[float, float]:
        """Equivalent (σ_R, σ_L) of the fixed weights, σ = 1/√weight (∞ for a zero weight)."""
        def sigma(weight: float) -> float:
            return float("inf") if weight == 0 else weight**-0.5

        return sigma(self.alpha), sigma(1.0 - self.alpha)


def region_loss(region_logits: torch.Tensor, region_target: torch.Tensor) -> torch.Tensor:
    """Focal loss of T_R over annotated pixels.

    region_target: (N, H, W) with 0 OTHER_CAR, 1 LAD, 2 LCX, 3 RCA and −1 for
    unlabelled pixels, which are ignored.
    """
    return focal_loss(region_logits, region_target, REGION_CLASS_WEIGHTS, valid=region_target >= 0)


def lesion_loss(
    lesion_logits: torch.Tensor, lesion_target: torch.Tensor, candidate: torch.Tensor
) -> torch.Tensor:
    """Focal loss of T_L over candidate pixels; lesion_target is 1 for CAC, 0 otherwise."""
    return focal_loss(lesion_logits, lesion_target, LESION_CLASS_WEIGHTS, valid=candidate)


def multiclass_loss(
    logits: torch.Tensor, labels: torch.Tensor, candidate: torch.Tensor
) -> torch.Tensor:
    """Focal loss of the single-task model over candidate pixels.

    labels: CAC labels 0–3 (OTHER_CAC, LAD, LCX, RCA); other values (4,
    non-coronary calcium) count as OTHER_CAC.
    """
    target = torch.where(labels.long() <= 3, labels.long(), torch.zeros_like(labels.long()))
    return focal_loss(logits, target, MULTICLASS_CLASS_WEIGHTS, valid=candidate)
