"""The 2D multi-task U-Net of Föllmer et al. (Med Phys 2022) and its comparison models.

One shared encoder feeds two decoders. The region decoder (task T_R) labels
each pixel as a coronary artery region (CAR): OTHER_CAR, LAD, LCX or RCA. The
lesion decoder (task T_L) labels each candidate pixel as OTHER_CAC or CAC, and
at every level receives the region decoder's feature map, so features flow
from T_R to T_L and never back.

Layer facts follow the paper and the authors' public inference code
(github.com/Berni1557/MTAL-CACS, src/model.py). The stem has two 5 × 5
convolutions to 16 channels. Eight stride-2 down blocks have 16, 32, 32, 64,
64, 64, 128 and 128 channels, with dropout 0.5 on the bottleneck. Eight
bilinear up blocks mirror the encoder. Every activation is LeakyReLU(0.2),
and the multi-task network has about 3.1 million parameters. Input sides
must be multiples of 256 because eight stride-2 steps halve them eight times.

The networks return logits. Softmax is left to the caller (the losses use
log-softmax, inference takes the argmax, which is the same with or without
softmax).

Input channels (`prepare_input`): HU normalised as (HU + 2000) / 3300 after
every value below −2048 (the −3024 padding some scanners store) is set to
−2048, and the candidate mask HU ≥ 130, the Agatston threshold.
"""

from __future__ import annotations

import logging
import numbers
from typing import Literal

import numpy as np
import torch
from torch import nn

from scoring.config import CALCIUM_THRESHOLD_HU
from scoring.result import BACKGROUND

logger = logging.getLogger(__name__)

#: Output channels of the eight down blocks, from 256² (for a 512² input) to 2².
ENCODER_CHANNELS: tuple[int, ...] = (16, 32, 32, 64, 64, 64, 128, 128)

#: Channels of the stem (two 5 × 5 convolutions at full resolution).
STEM_CHANNELS = 16

#: Input sides must be multiples of this: 2 ** len(ENCODER_CHANNELS).
SIZE_MULTIPLE = 2 ** len(ENCODER_CHANNELS)

#: Region classes of task T_R; the index equals the CAC label value of the artery.
REGION_CLASSES: tuple[str, ...] = ("OTHER_CAR", "LAD", "LCX", "RCA")

#: Lesion classes of task T_L.
LESION_CLASSES: tuple[str, ...] = ("OTHER_CAC", "CAC")

#: Classes of the single-task comparison model; the index equals the CAC label value.
MULTICLASS_CLASSES: tuple[str, ...] = ("OTHER_CAC", "LAD", "LCX", "RCA")

#: HU normalisation of the image channel: (HU + HU_OFFSET) / HU_SCALE.
HU_OFFSET = 2000.0
HU_SCALE = 3300.0
#: Values below this (padding such as −3024) are raised to it before normalising.
HU_FLOOR = -2048.0

#: Dropout on the bottleneck output during training.
BOTTLENECK_DROPOUT = 0.5

Architecture = Literal["mtl", "single", "sequential"]
ARCHITECTURES: tuple[str, ...] = ("mtl", "single", "sequential")

LEAKY_SLOPE = 0.2


def prepare_input(hu: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Build the 2-channel network input from HU slices.

    hu: HU values of shape (slices, rows, columns) or (rows, columns).
    Returns a float32 tensor (slices, 2, rows, columns): channel 0 the
    normalised HU, channel 1 the candidate mask (HU ≥ 130) as 0.0 or 1.0.
    """
    tensor = torch.as_tensor(hu, dtype=torch.float32)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        raise ValueError(
            f"expected HU slices of shape (slices, rows, columns), got shape {tuple(tensor.shape)}"
        )
    candidate = (tensor >= CALCIUM_THRESHOLD_HU).to(torch.float32)
    image = (tensor.clamp(min=HU_FLOOR) + HU_OFFSET) / HU_SCALE
    return torch.stack((image, candidate), dim=1)


def check_input_size(rows: int, columns: int) -> None:
    """Raise ValueError unless both sides are positive multiples of SIZE_MULTIPLE."""
    if rows <= 0 or columns <= 0 or rows % SIZE_MULTIPLE or columns % SIZE_MULTIPLE:
        raise ValueError(
            f"input of {rows} × {columns} pixels cannot pass eight stride-2 levels; "
            f"pad or crop both sides to a multiple of {SIZE_MULTIPLE}"
        )


class DownBlock(nn.Module):
    """Halve the resolution: (N, C_in, H, W) → (N, C_out, H/2, W/2).

    4 × 4 convolution with stride 2, LeakyReLU, dropout (rate 0 in training,
    raised only for Monte Carlo dropout), 3 × 3 convolution, batch norm, LeakyReLU.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)
        self.activation_down = nn.LeakyReLU(LEAKY_SLOPE)
        self.dropout = nn.Dropout(p=0.0)
        self.conv = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.activation_down(self.down(x)))
        return self.activation(self.norm(self.conv(x)))


class UpBlock(nn.Module):
    """Double the resolution and merge a skip input.

    (N, C_low, H, W) and skip (N, C_skip, 2H, 2W) → (N, C_out, 2H, 2W):
    bilinear ×2 upsampling (align_corners=True), concatenation with the skip
    tensor, 3 × 3 convolution, LeakyReLU, dropout (rate 0 in training), 3 × 3
    convolution, batch norm, LeakyReLU.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.activation1 = nn.LeakyReLU(LEAKY_SLOPE)
        self.dropout = nn.Dropout(p=0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation2 = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.upsample(low), skip), dim=1)
        x = self.dropout(self.activation1(self.conv1(x)))
        return self.activation2(self.norm(self.conv2(x)))


class Encoder(nn.Module):
    """Stem and eight down blocks; returns the feature map of every level.

    (N, C_in, H, W) → [stem (N, 16, H, W), level 1 (N, 16, H/2, W/2), …,
    level 8 (N, 128, H/256, W/256)]. Dropout 0.5 is applied to the level-8
    output (the bottleneck) in training mode.
    """

    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STEM_CHANNELS, kernel_size=5, padding=2),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, kernel_size=5, padding=2),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        channels = (STEM_CHANNELS,) + ENCODER_CHANNELS
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[i], channels[i + 1]) for i in range(len(ENCODER_CHANNELS))
        )
        self.bottleneck_dropout = nn.Dropout(p=BOTTLENECK_DROPOUT)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of the returned feature maps, stem first."""
        return (STEM_CHANNELS,) + ENCODER_CHANNELS

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input_size(x.shape[-2], x.shape[-1])
        features = [self.stem(x)]
        for block in self.down_blocks:
            features.append(block(features[-1]))
        features[-1] = self.bottleneck_dropout(features[-1])
        return features


class Decoder(nn.Module):
    """Eight up blocks from the bottleneck back to full resolution.

    At each level the up block concatenates the upsampled output of the level
    below with the encoder feature map of that level. When `extras` is given,
    its tensors for that level join the concatenation: the lesion decoder gets
    the region decoder's outputs there, and the raw input at the last level.
    Output channels mirror the encoder: 128, 64, 64, 64, 32, 32, 16, then
    `last_channels`.
    Returns the list of the eight up-block outputs, coarsest first.
    """

    def __init__(
        self,
        level_channels: tuple[int, ...],
        extra_channels: tuple[int, ...] | None = None,
        last_channels: int = STEM_CHANNELS,
    ) -> None:
        super().__init__()
        levels = len(level_channels) - 1
        extra = extra_channels or (0,) * levels
        if len(extra) != levels:
            raise ValueError(f"expected {levels} extra channel counts, got {len(extra)}")
        blocks = []
        low_channels = level_channels[-1]
        for step in range(levels):
            level = levels - 1 - step
            out_channels = level_channels[level] if step < levels - 1 else last_channels
            in_channels = low_channels + level_channels[level] + extra[step]
            blocks.append(UpBlock(in_channels, out_channels))
            low_channels = out_channels
        self.up_blocks = nn.ModuleList(blocks)

    def forward(
        self,
        features: list[torch.Tensor],
        extras: list[list[torch.Tensor]] | None = None,
    ) -> list[torch.Tensor]:
        outputs = []
        low = features[-1]
        levels = len(self.up_blocks)
        for step, block in enumerate(self.up_blocks):
            skip = [features[levels - 1 - step]]
            if extras is not None:
                skip.extend(extras[step])
            low = block(low, torch.cat(skip, dim=1) if len(skip) > 1 else skip[0])
            outputs.append(low)
        return outputs


def _head(in_channels: int, hidden_channels: int, classes: int) -> nn.Sequential:
    """Two 3 × 3 convolutions with a LeakyReLU between them, ending in class logits."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1),
        nn.LeakyReLU(LEAKY_SLOPE),
        nn.Conv2d(hidden_channels, classes, kernel_size=3, padding=1),
    )


class MultiTaskUNet(nn.Module):
    """The multi-task network: shared encoder, region decoder T_R, lesion decoder T_L.

    forward: (N, 2, H, W) → (region logits (N, 4, H, W), lesion logits (N, 2, H, W)).
    The lesion decoder's last level also receives the raw 2-channel input, and
    its last up block has 32 output channels, as in the authors' code.
    """

    architecture = "mtl"

    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels)
        levels = self.encoder.level_channels
        self.region_decoder = Decoder(levels)
        self.region_head = _head(STEM_CHANNELS, len(REGION_CLASSES), len(REGION_CLASSES))

        # The region decoder's output at each level mirrors the encoder channels.
        region_channels = tuple(reversed(levels[:-1]))
        extra = list(region_channels)
        extra[-1] += in_channels
        self.lesion_decoder = Decoder(levels, tuple(extra), last_channels=2 * STEM_CHANNELS)
        self.lesion_head = _head(2 * STEM_CHANNELS, STEM_CHANNELS, len(LESION_CLASSES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        region_levels = self.region_decoder(features)
        extras = [[output] for output in region_levels]
        extras[-1].append(x)
        lesion_levels = self.lesion_decoder(features, extras)
        return self.region_head(region_levels[-1]), self.lesion_head(lesion_levels[-1])


class SingleTaskUNet(nn.Module):
    """The single-task multiclass comparison model: one decoder, 4 classes.

    forward: (N, 2, H, W) → logits (N, 4, H, W) over OTHER_CAC, LAD, LCX, RCA.
    """

    architecture = "single"

    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels)
        self.decoder = Decoder(self.encoder.level_channels)
        self.head = _head(STEM_CHANNELS, STEM_CHANNELS, len(MULTICLASS_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x))[-1])


class _SegmentationUNet(nn.Module):
    """One encoder, one decoder and a head: (N, C_in, H, W) → (N, classes, H, W)."""

    def __init__(self, in_channels: int, classes: int) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels)
        self.decoder = Decoder(self.encoder.level_channels)
        self.head = _head(STEM_CHANNELS, max(classes, STEM_CHANNELS // 4), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x))[-1])


class SequentialUNet(nn.Module):
    """The sequential comparison model: a CAR network, then a CAC network.

    The CAC network's input is the image, the candidate mask and the CAR
    network's softmax probabilities (2 + 4 channels).
    forward: (N, 2, H, W) → (region logits (N, 4, H, W), lesion logits (N, 2, H, W)).
    """

    architecture = "sequential"

    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        self.region_network = _SegmentationUNet(in_channels, len(REGION_CLASSES))
        self.lesion_network = _SegmentationUNet(
            in_channels + len(REGION_CLASSES), len(LESION_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        region_logits = self.region_network(x)
        region_probabilities = torch.softmax(region_logits, dim=1)
        lesion_logits = self.lesion_network(torch.cat((x, region_probabilities), dim=1))
        return region_logits, lesion_logits


def build_model(architecture: str) -> nn.Module:
    """Create an untrained network.

    architecture: "mtl" (multi-task, used with uncertainty or static loss
    weighting), "single" (single-task multiclass) or "sequential".
    Raises ValueError for any other name.
    """
    if architecture == "mtl":
        return MultiTaskUNet()
    if architecture == "single":
        return SingleTaskUNet()
    if architecture == "sequential":
        return SequentialUNet()
    raise ValueError(
        f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
    )


def count_parameters(network: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def combine_tasks(
    region_logits: torch.Tensor,
    lesion_logits: torch.Tensor,
    candidate: torch.Tensor,
    lesion_threshold: float | None = None,
) -> torch.Tensor:
    """Turn T_R and T_L outputs into CAC labels (0 background, 1 LAD, 2 LCX, 3 RCA).

    A pixel is a lesion where the argmax of T_L is CAC and the candidate mask
    is set. Its label is the argmax of T_R where that is an artery, and 0 where
    it is OTHER_CAR.

    region_logits: (N, 4, H, W); lesion_logits: (N, 2, H, W); candidate: (N, H, W) bool.
    lesion_threshold: None for the argmax rule; else a pixel is a lesion where
        the T_L probability of CAC exceeds this value (see `check_lesion_threshold`).
    Returns uint8 labels of shape (N, H, W).
    """
    region = region_logits.argmax(dim=1)
    lesion = _is_calcium(lesion_logits, lesion_threshold) & candidate.bool()
    labels = torch.where(lesion, region, torch.zeros_like(region))
    return labels.to(torch.uint8)


def check_lesion_threshold(threshold: float | None) -> float | None:
    """Validate a lesion threshold: None, or a probability strictly between 0 and 1.

    With the focal loss and the 0.01 weight of OTHER_CAC, the loss puts the
    CAC probability above 0.5 for every pixel with at least about a 1 %
    chance of being calcium. So the argmax of a network that is not fully
    trained calls many uncertain pixels calcium. A threshold above 0.5,
    chosen on validation series (`cacs-node calibrate`), moves that decision.
    """
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(
            f"lesion threshold must be a number strictly between 0 and 1, got {threshold!r} "
            f"({type(threshold).__name__})"
        )
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"lesion threshold must lie strictly between 0 and 1, got {threshold}")
    return threshold


def _is_calcium(logits: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Calcium where the argmax is not class 0, or where 1 − P(class 0) exceeds `threshold`."""
    if threshold is None:
        return logits.argmax(dim=1) != 0
    return 1.0 - torch.softmax(logits.float(), dim=1)[:, 0] > threshold


def combine_multiclass(
    logits: torch.Tensor, candidate: torch.Tensor, lesion_threshold: float | None = None
) -> torch.Tensor:
    """CAC labels from the single-task model: argmax of the 4 classes inside the candidate mask.

    logits: (N, 4, H, W) over OTHER_CAC, LAD, LCX, RCA; candidate: (N, H, W).
    lesion_threshold: None for the argmax rule; else a pixel is calcium where
        the summed artery probability exceeds it, labelled with its likeliest artery.
    Returns uint8 labels (N, H, W); OTHER_CAC becomes 0.
    """
    if lesion_threshold is None:
        labels = logits.argmax(dim=1)
    else:
        artery = logits[:, 1:].argmax(dim=1) + 1
        labels = torch.where(
            _is_calcium(logits, lesion_threshold), artery, torch.zeros_like(artery)
        )
    labels = torch.where(candidate.bool(), labels, torch.full_like(labels, BACKGROUND))
    return labels.to(torch.uint8)


def predict_labels(
    network: nn.Module, inputs: torch.Tensor, lesion_threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run any of the three architectures and return (CAC labels, region classes), both uint8.

    inputs: (N, 2, H, W) from `prepare_input`. For the single-task model,
    which has no region task, the region output is the predicted artery inside
    the candidate mask and 0 (OTHER_CAR) elsewhere. lesion_threshold: as in
    `combine_tasks`; None for the argmax rule.
    """
    return combine_outputs(network(inputs), inputs[:, 1] > 0.5, lesion_threshold)


def combine_outputs(
    output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    candidate: torch.Tensor,
    lesion_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CAC labels, region classes) from a network output: a (T_R, T_L) pair or multiclass logits."""
    if isinstance(output, tuple):
        region_logits, lesion_logits = output
        labels = combine_tasks(region_logits, lesion_logits, candidate, lesion_threshold)
        return labels, region_logits.argmax(dim=1).to(torch.uint8)
    labels = combine_multiclass(output, candidate, lesion_threshold)
    return labels, labels.clone()
