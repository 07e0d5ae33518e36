"""Training of the multi-task U-Net and its comparison models on annotated CT series.

Data: `TrainingCase` objects (HU volume, CAC labels, CAR scribbles) from the
digital phantom (`phantom_cases`) or from a folder of annotated series
(`folder_cases`). Batches mix slices with coronary calcium (20 %) and slices
without (80 %), each cut to a crop (256 × 256 by default) placed with a
random translation.

Optimisation follows Föllmer et al. (Med Phys 2022): batch 8, Adam with
learning rate 5e-4 multiplied by 0.95 every 5 epochs, L2 weight decay, early
stopping on the validation micro-F1 of the multiclass calcification. The
continue-training mode starts from a checkpoint at learning rate 1e-4.

Under `torchrun` (WORLD_SIZE > 1) the loop runs with DistributedDataParallel:
each rank draws its own batches from a rank-specific seed, and rank 0
validates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scoring import checkpoint as checkpoint_module
from scoring import losses
from scoring import metrics
from scoring.config import CALCIUM_THRESHOLD_HU
from scoring.fileio import atomic_write_bytes
from scoring.model import build_model, predict_labels, prepare_input
from scoring.result import LAD, OTHER_CALCIUM, RCA
from scoring.volume import PADDING_HU

#: Most validation crops of 256² (or the same area in larger crops) a run keeps in
#: memory: 2 GiB of prepared input at VALIDATION_CROP_BYTES each.
MAX_VALIDATION_CROPS = 4096
#: Bytes of one prepared 256² validation crop: 2 float32 channels.
VALIDATION_CROP_BYTES = 2 * 256 * 256 * 4

#: HU above which a pixel counts as body when placing crops (as in scoring.inference).
BODY_THRESHOLD_HU = -500.0

logger = logging.getLogger(__name__)

#: Value of an unlabelled pixel in a region target; the region loss ignores it.
REGION_UNLABELLED = -1

#: Forward-pass precisions of training and validation, with their autocast dtypes.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainingCase:
    """One annotated CT series.

    hu: HU (slices, rows, columns), stored as int16 (HU rounded to whole numbers,
        which is how CT stores them) to keep many series in memory.
    labels: uint8 CAC labels, 0 background, 1 LAD, 2 LCX, 3 RCA, 4 other calcium.
    regions: int8 CAR target, −1 unlabelled, 0 OTHER_CAR, 1 LAD, 2 LCX, 3 RCA.
    """

    name: str
    hu: np.ndarray
    labels: np.ndarray
    regions: np.ndarray

    def __post_init__(self) -> None:
        if not (self.hu.shape == self.labels.shape == self.regions.shape):
            raise ValueError(
                f"case {self.name}: HU {self.hu.shape}, labels {self.labels.shape} and "
                f"regions {self.regions.shape} must have the same shape"
            )
        if self.hu.ndim != 3:
            raise ValueError(f"case {self.name}: expected 3D arrays, got shape {self.hu.shape}")

    @classmethod
    def from_arrays(
        cls, name: str, hu: np.ndarray, labels: np.ndarray, regions: np.ndarray
    ) -> TrainingCase:
        """Build a case, rounding HU to int16 (clipped to the int16 range)."""
        hu16 = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
        return cls(name, hu16, np.asarray(labels, dtype=np.uint8), np.asarray(regions, np.int8))

    @property
    def calcium_slices(self) -> np.ndarray:
        """Indices of slices with coronary calcium (labels 1–3)."""
        coronary = (self.labels >= LAD) & (self.labels <= RCA)
        return np.flatnonzero(coronary.any(axis=(1, 2)))

    @property
    def labelled_slices(self) -> int:
        """Number of slices with any CAR annotation."""
        return int((self.regions >= 0).any(axis=(1, 2)).sum())


class TrainingDivergedError(ValueError):
    """Error raised when the training loss becomes NaN or infinite and the run stops."""


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of one training run.

    architecture: "mtl", "single" or "sequential".
    weighting: "uncertainty" or "static" (multi-task losses of "mtl" and "sequential").
    alpha: region share of the static weighting (default 0.4).
    batch_size: slices per optimisation step per process (default 8).
    learning_rate: Adam learning rate of a new run (default 5e-4).
    continue_learning_rate: learning rate of the continue-training mode (default 1e-4).
    lr_decay, lr_decay_epochs: the rate is multiplied by lr_decay every lr_decay_epochs
        epochs (default 0.95 every 5).
    weight_decay: L2 weight decay of Adam (default 1e-4; the paper gives no value).
    epochs: maximum number of epochs. steps_per_epoch: optimisation steps per epoch.
    patience: validations without a better micro-F1 before stopping (default 10).
    crop_size: side of the square training crops in pixels, a multiple of 256.
    calcium_fraction: share of batch slices drawn from slices with calcium (default 0.2).
    max_shift: largest random translation of a crop centre, in pixels (default 48).
    body_crop_fraction: share of crops without calcium that are centred on a random
        body pixel instead of the CAR annotation (default 0.5).
    candidate_crop_fraction: share of crops without calcium that are centred on a
        random candidate pixel (HU ≥ 130) that is not coronary calcium: bone, noise,
        metal, other calcium (default 0). It is taken before body_crop_fraction;
        the two together may not exceed 1.
    validation: "crops" scores fixed crops around the heart after each epoch;
        "volumes" segments the whole validation series, as the node does, so
        false positives in bone and noise far from the heart count too.
    validation_every: epochs between validations (default 1); early stopping
        counts validations, not epochs.
    validation_crops: number of fixed validation crops (default 32).
    selection: how validation decides which pixels are lesions when it scores
        an epoch. "argmax" (default) is the paper's rule. "calibrated" tries
        the lesion thresholds of `cacs-node calibrate` on the validation
        series and scores the epoch by the best one. The checkpoints then
        carry that threshold, chosen at the latest validation. It needs
        validation="volumes".
    precision: "fp32", or "bf16" to run forward passes and losses under
        bfloat16 autocast. A step of 8 crops of 256² took 1.05 s instead of
        1.9 s on 2 AVX512-BF16 cores. Weights and optimiser state stay float32.
    snapshot_epochs: epochs after which a copy of the checkpoint is kept as
        epoch-NNN.pt (to compare models at an equal training budget).
    ema_decay: 0 (default) validates and saves the trained weights themselves.
        A value in (0, 1), such as 0.999, keeps an exponential moving average
        of the weights and batch-norm statistics, updated after every step.
        Validation, best.pt and exports then use the average. With decay d it
        spans about 1 / (1 − d) steps, so one noisy step moves it little.
    time_limit_minutes: None (default) for no limit. Otherwise the run
        validates and stops after the first epoch that ends later than this
        many minutes after the first epoch began, for a training window of fixed length.
    seed: seed of weights, sampling and dropout.
    threads: torch CPU threads, None to keep torch's default.
    device: "auto", "cpu" or a torch device such as "cuda:0".
    """

    architecture: str = "mtl"
    weighting: str = "uncertainty"
    alpha: float = losses.DEFAULT_STATIC_ALPHA
    batch_size: int = 8
    learning_rate: float = 5e-4
    continue_learning_rate: float = 1e-4
    lr_decay: float = 0.95
    lr_decay_epochs: int = 5
    weight_decay: float = 1e-4
    epochs: int = 100
    steps_per_epoch: int = 50
    patience: int = 10
    crop_size: int = 256
    calcium_fraction: float = 0.2
    max_shift: int = 48
    body_crop_fraction: float = 0.5
    candidate_crop_fraction: float = 0.0
    validation: str = "crops"
    validation_every: int = 1
    validation_crops: int = 32
    selection: str = "argmax"
    precision: str = "fp32"
    snapshot_epochs: tuple[int, ...] = ()
    ema_decay: float = 0.0
    time_limit_minutes: float | None = None
    seed: int = 0
    threads: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.architecture not in ("mtl", "single", "sequential"):
            raise ValueError(f"unknown architecture {self.architecture!r}")
        if self.weighting not in ("uncertainty", "static"):
            raise ValueError(
                f"unknown loss weighting {self.weighting!r}; expected 'uncertainty' or 'static'"
            )
        if self.crop_size <= 0 or self.crop_size % 256:
            raise ValueError(f"crop size must be a positive multiple of 256, got {self.crop_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.batch_size * (self.crop_size // 256) ** 2 < 2:
            raise ValueError(
                f"batch size {self.batch_size} with {self.crop_size}-pixel crops leaves one value "
                "per channel at the 1 × 1 bottleneck, where batch norm cannot train; use a "
                "batch size of at least 2"
            )
        if not 0.0 <= self.calcium_fraction <= 1.0:
            raise ValueError(f"calcium fraction must lie in [0, 1], got {self.calcium_fraction}")
        for name in ("body_crop_fraction", "candidate_crop_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name.replace('_', ' ')} must lie in [0, 1], got {value}")
        if self.body_crop_fraction + self.candidate_crop_fraction > 1.0:
            raise ValueError(
                f"body crop fraction {self.body_crop_fraction} and candidate crop fraction "
                f"{self.candidate_crop_fraction} add up to more than 1"
            )
        if self.validation not in ("crops", "volumes"):
            raise ValueError(
                f"unknown validation {self.validation!r}; expected 'crops' or 'volumes'"
            )
        if self.selection not in ("argmax", "calibrated"):
            raise ValueError(
                f"unknown selection {self.selection!r}; expected 'argmax' or 'calibrated'"
            )
        if self.selection == "calibrated" and self.validation != "volumes":
            raise ValueError("calibrated selection needs validation on volumes (--validation volumes)")
        outside = [epoch for epoch in self.snapshot_epochs if not 1 <= epoch <= self.epochs]
        if outside:
            raise ValueError(
                f"snapshot epochs {outside} lie outside the epochs of this run (1 to {self.epochs})"
            )
        for name in ("learning_rate", "continue_learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', ' ')} must be positive and finite, got {value}")
        if self.time_limit_minutes is not None and not self.time_limit_minutes > 0:
            raise ValueError(f"time limit must be positive, got {self.time_limit_minutes} minutes")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {self.ema_decay}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}"
            )
        for name in (
            "batch_size", "epochs", "steps_per_epoch", "lr_decay_epochs", "patience",
            "validation_crops", "validation_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        crops_of_256 = self.validation_crops * (self.crop_size // 256) ** 2
        if self.validation == "crops" and crops_of_256 > MAX_VALIDATION_CROPS:
            raise ValueError(
                f"{self.validation_crops} validation crops of {self.crop_size}² would hold "
                f"{crops_of_256 * VALIDATION_CROP_BYTES / 2**30:.1f} GiB in memory; use at most "
                f"{MAX_VALIDATION_CROPS:,} crops of 256² or the same area in larger crops"
            )

    @property
    def model_name(self) -> str:
        """Short name of the compared model: single, sequential, mtl-static or mtl-uncertainty."""
        if self.architecture == "single":
            return "single"
        if self.architecture == "sequential":
            return "sequential"
        return f"mtl-{self.weighting}"


@dataclass
class TrainingOutcome:
    """Checkpoint paths, epochs and validation history of a finished training run."""

    checkpoint_path: Path
    best_checkpoint_path: Path
    epochs_run: int
    best_epoch: int
    best_micro_f1: float
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Data sources


def region_target_from_annotation(
    annotation: np.ndarray, mapping: dict[int, int]
) -> np.ndarray:
    """Translate a CAR annotation map into a region target (−1 unlabelled, 0–3 classes).

    mapping: annotation value → region class (0 OTHER_CAR, 1 LAD, 2 LCX, 3 RCA).
    Values not in the mapping become unlabelled.
    """
    target = np.full(annotation.shape, REGION_UNLABELLED, dtype=np.int8)
    for value, region_class in mapping.items():
        target[annotation == value] = region_class
    return target


def phantom_cases(
    seeds: Iterable[int], **options: Any
) -> list[TrainingCase]:
    """Generate phantom series in memory with `scoring.phantom.make_case`.

    options are passed to make_case. The regions map is translated with
    `phantom_region_mapping`.
    """
    from scoring import phantom

    cases = []
    for seed in seeds:
        started = time.perf_counter()
        case = phantom.make_case(int(seed), **options)
        regions = region_target_from_annotation(case.regions, phantom_region_mapping())
        cases.append(TrainingCase.from_arrays(f"phantom-{seed}", case.hu, case.labels, regions))
        logger.debug("phantom seed %d generated in %.1f s", seed, time.perf_counter() - started)
    return cases


def phantom_region_mapping() -> dict[int, int]:
    """Annotation value → region class for the phantom's regions map.

    The phantom writes 0 for unlabelled pixels, 1 LAD, 2 LCX, 3 RCA and 5 for
    pixels annotated as outside every artery region (OTHER_CAR).
    """
    from scoring import phantom

    return dict(phantom.REGION_TRAINING_CLASSES)


#: Label-map file names looked for beside each series, in order of preference.
LABEL_MAP_NAMES: tuple[str, ...] = ("labels.nrrd", "labels.nii.gz", "labels.nii", "labels.dcm")
REGION_MAP_NAMES: tuple[str, ...] = (
    "regions.nrrd", "regions.nii.gz", "regions.nii", "regions.dcm",
)


def folder_cases(root: Path) -> list[TrainingCase]:
    """Load every annotated series under `root`.

    Layout (the one `cacs-node phantom` writes): each case is a folder with
    `dicom/` (the series), `labels.*` and `regions.*`. The CAC labels may be
    NRRD, NIfTI or a DICOM SEG with one segment per artery. The CAR scribbles
    use the phantom's values in NRRD or NIfTI. In a DICOM SEG they are the
    artery segments plus an OTHER segment, which becomes OTHER_CAR.
    Raises FileNotFoundError when no case folder is found.
    """
    from scoring.labels import read_label_map
    from scoring.series import load_series

    case_dirs = annotated_case_folders(
        root, "dicom/, labels.nrrd (or .nii.gz, .dcm) and regions.nrrd"
    )
    cases = []
    for case_dir in case_dirs:
        label_path = _first_existing(case_dir, LABEL_MAP_NAMES)
        region_path = _first_existing(case_dir, REGION_MAP_NAMES)
        if label_path is None or region_path is None:
            raise FileNotFoundError(
                f"case {case_dir} lacks a label map: expected one of "
                f"{', '.join(LABEL_MAP_NAMES)} and one of {', '.join(REGION_MAP_NAMES)}"
            )
        volume = load_series(case_dir / "dicom")
        labels = read_label_map(label_path, volume, calcium=True)
        annotation = read_label_map(region_path, volume)
        if region_path.suffix == ".dcm":
            # read_label_map gives artery values 1–3 and 4 for an OTHER segment.
            mapping = {1: 1, 2: 2, 3: 3, OTHER_CALCIUM: 0}
        else:
            mapping = phantom_region_mapping()
        regions = region_target_from_annotation(annotation, mapping)
        cases.append(TrainingCase.from_arrays(case_dir.name, volume.hu, labels, regions))
        logger.info("loaded training case %s (%d slices)", case_dir.name, volume.shape[0])
    return cases


def annotated_case_folders(root: Path, expected: str) -> list[Path]:
    """Find the case folders under `root`: those that contain a dicom/ folder, sorted.

    expected: what a case folder should contain, for the error message.
    Raises FileNotFoundError when `root` is not a folder or contains no case.
    """
    root = Path(root)
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"annotated data folder {root} {state}")
    case_dirs = sorted(path.parent for path in root.rglob("dicom") if path.is_dir())
    if not case_dirs:
        raise FileNotFoundError(
            f"no annotated series found under {root}: expected folders containing {expected}"
        )
    return case_dirs


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def summarise_cases(cases: Sequence[TrainingCase]) -> dict[str, Any]:
    """Training data summary for checkpoint metadata: series, slices, labelled
    slices, and the name of every series, which `seen_in_training` checks
    evaluation sets against (a name takes some 20 bytes)."""
    return {
        "series": len(cases),
        "slices": int(sum(case.hu.shape[0] for case in cases)),
        "labelled_slices": int(sum(case.labelled_slices for case in cases)),
        "calcium_slices": int(sum(len(case.calcium_slices) for case in cases)),
        "names": [case.name for case in cases],
    }


# ---------------------------------------------------------------------------
# Sampling


@dataclass
class Batch:
    """A training batch: inputs (N, 2, S, S) float32 and the targets of both tasks."""

    inputs: torch.Tensor
    labels: torch.Tensor
    regions: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        """Move to `device`; inputs go to the channels-last layout the network uses."""
        inputs = self.inputs.to(device).contiguous(memory_format=torch.channels_last)
        return Batch(inputs, self.labels.to(device), self.regions.to(device))

    @property
    def candidate(self) -> torch.Tensor:
        return self.inputs[:, 1] > 0.5

    @property
    def lesion_target(self) -> torch.Tensor:
        """1 where the label is a coronary artery (1–3), else 0."""
        return ((self.labels >= LAD) & (self.labels <= RCA)).long()


def crop_slice(
    case: TrainingCase, slice_index: int, centre: tuple[int, int], size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a size × size window centred at `centre` (row, column) from one slice.

    Parts of the window outside the image are filled with PADDING_HU, label 0
    and unlabelled regions.
    """
    rows, columns = case.hu.shape[1:]
    top = centre[0] - size // 2
    left = centre[1] - size // 2
    hu = np.full((size, size), PADDING_HU, dtype=np.float32)
    labels = np.zeros((size, size), dtype=np.uint8)
    regions = np.full((size, size), REGION_UNLABELLED, dtype=np.int8)
    source_rows = slice(max(top, 0), min(top + size, rows))
    source_columns = slice(max(left, 0), min(left + size, columns))
    target_rows = slice(source_rows.start - top, source_rows.stop - top)
    target_columns = slice(source_columns.start - left, source_columns.stop - left)
    hu[target_rows, target_columns] = case.hu[slice_index, source_rows, source_columns]
    labels[target_rows, target_columns] = case.labels[slice_index, source_rows, source_columns]
    regions[target_rows, target_columns] = case.regions[slice_index, source_rows, source_columns]
    return hu, labels, regions


class HybridSampler:
    """Draws batches with a set share of slices that hold coronary calcium.

    Each batch slice comes from the calcium pool with probability
    `calcium_fraction` (from the other slices otherwise). A calcium crop is
    centred on a random coronary calcium pixel. Any other crop is centred,
    with probability `candidate_crop_fraction`, on a random candidate pixel
    (HU ≥ 130) that is not coronary calcium, the pixels the lesion task must
    learn to reject; with probability `body_crop_fraction`, on a random body
    pixel (HU > −500), so that ribs, spine and the body wall far from the heart
    are seen too. Otherwise it is centred on the centre of the slice's CAR annotation, or
    the image centre when there is none. The centre then moves by a random
    translation of up to `max_shift` pixels in each direction and stays
    inside the image.
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase],
        crop_size: int,
        calcium_fraction: float,
        max_shift: int,
        generator: np.random.Generator,
        body_crop_fraction: float = 0.0,
        candidate_crop_fraction: float = 0.0,
    ) -> None:
        if not cases:
            raise ValueError("no training cases: pass at least one annotated series")
        self.cases = list(cases)
        self.crop_size = crop_size
        self.calcium_fraction = calcium_fraction
        self.max_shift = max_shift
        self.generator = generator
        self.body_crop_fraction = body_crop_fraction
        self.candidate_crop_fraction = candidate_crop_fraction
        self.calcium_pool: list[tuple[int, int]] = []
        self.other_pool: list[tuple[int, int]] = []
        for case_index, case in enumerate(self.cases):
            calcium = set(case.calcium_slices.tolist())
            for slice_index in range(case.hu.shape[0]):
                pool = self.calcium_pool if slice_index in calcium else self.other_pool
                pool.append((case_index, slice_index))

    def _draw_slice(self) -> tuple[int, int, bool]:
        use_calcium = bool(self.calcium_pool) and (
            not self.other_pool or self.generator.random() < self.calcium_fraction
        )
        pool = self.calcium_pool if use_calcium else self.other_pool
        case_index, slice_index = pool[int(self.generator.integers(len(pool)))]
        return case_index, slice_index, use_calcium

    def _anchor(self, case: TrainingCase, slice_index: int, calcium: bool) -> tuple[int, int]:
        rows, columns = case.hu.shape[1:]
        if calcium:
            labels = case.labels[slice_index]
            points = np.argwhere((labels >= LAD) & (labels <= RCA))
            row, column = points[int(self.generator.integers(len(points)))]
            return int(row), int(column)
        if self.body_crop_fraction > 0 or self.candidate_crop_fraction > 0:
            draw = self.generator.random()
            pixels = None
            if draw < self.candidate_crop_fraction:
                labels = case.labels[slice_index]
                pixels = np.argwhere(
                    (case.hu[slice_index] >= CALCIUM_THRESHOLD_HU)
                    & ((labels < LAD) | (labels > RCA))
                )
            elif draw < self.candidate_crop_fraction + self.body_crop_fraction:
                pixels = np.argwhere(case.hu[slice_index] > BODY_THRESHOLD_HU)
            if pixels is not None and len(pixels):
                row, column = pixels[int(self.generator.integers(len(pixels)))]
                return int(row), int(column)
        annotated = np.argwhere(case.regions[slice_index] >= 0)
        if len(annotated):
            row, column = annotated.mean(axis=0)
            return int(row), int(column)
        return rows // 2, columns // 2

    def sample(self, batch_size: int) -> Batch:
        """Draw one batch of `batch_size` crops."""
        images, label_crops, region_crops = [], [], []
        half = self.crop_size // 2
        for _ in range(batch_size):
            case_index, slice_index, calcium = self._draw_slice()
            case = self.cases[case_index]
            row, column = self._anchor(case, slice_index, calcium)
            shift = self.generator.integers(-self.max_shift, self.max_shift + 1, size=2)
            rows, columns = case.hu.shape[1:]
            row = int(np.clip(row + shift[0], min(half, rows - half), max(half, rows - half)))
            column = int(
                np.clip(column + shift[1], min(half, columns - half), max(half, columns - half))
            )
            hu, labels, regions = crop_slice(case, slice_index, (row, column), self.crop_size)
            images.append(hu)
            label_crops.append(labels)
            region_crops.append(regions)
        return Batch(
            inputs=prepare_input(np.stack(images)),
            labels=torch.from_numpy(np.stack(label_crops)),
            regions=torch.from_numpy(np.stack(region_crops).astype(np.int64)),
        )


def validation_batches(
    cases: Sequence[TrainingCase], crop_size: int, seed: int, crops: int = 32, batch_size: int = 8
) -> list[Batch]:
    """Draw a fixed validation set of `crops` crops with the hybrid sampler at 50 % calcium.

    These crops lie around the heart, so their micro-F1 misses false
    positives in spine and ribs that full slices show; `validation="volumes"`
    in TrainingConfig scores whole series instead.

    The same seed gives the same crops, so validation F1 is comparable across epochs.
    """
    sampler = HybridSampler(cases, crop_size, 0.5, 0, np.random.default_rng(seed))
    batches = []
    remaining = crops
    while remaining > 0:
        size = min(batch_size, remaining)
        batches.append(sampler.sample(size))
        remaining -= size
    return batches


# ---------------------------------------------------------------------------
# The training step


class TrainingModule(nn.Module):
    """Network and loss weighting in one module, so DDP synchronises the log variances too.

    forward(batch inputs, labels, regions) returns (total loss, region loss, lesion loss).
    For the single-task model the region loss is 0 and the total is the multiclass loss.
    """

    def __init__(self, network: nn.Module, weighting: nn.Module | None) -> None:
        super().__init__()
        self.network = network
        self.weighting = weighting

    def forward(
        self, inputs: torch.Tensor, labels: torch.Tensor, regions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        candidate = inputs[:, 1] > 0.5
        output = self.network(inputs)
        if not isinstance(output, tuple):
            loss = losses.multiclass_loss(output, labels, candidate)
            return loss, torch.zeros_like(loss), loss
        region_logits, lesion_logits = output
        lesion_target = ((labels >= LAD) & (labels <= RCA)).long()
        region_part = losses.region_loss(region_logits, regions)
        lesion_part = losses.lesion_loss(lesion_logits, lesion_target, candidate)
        if self.weighting is None:
            raise RuntimeError("a two-task network needs a loss weighting module")
        return self.weighting(region_part, lesion_part), region_part, lesion_part


class WeightAverage:
    """Exponential moving average of a network's weights and batch-norm statistics.

    After update number t the average moves towards the trained network by
    1 − d with d = min(decay, (1 + t) / (10 + t)), so the weights of the first
    steps, far from any optimum, fade out quickly. Integer buffers (the
    batch counters of batch norm) are copied, not averaged.
    """

    def __init__(self, network: nn.Module, decay: float, updates: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.network = copy.deepcopy(network)
        self.network.requires_grad_(False)
        self.network.eval()
        self.decay = decay
        self.updates = updates

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """Move the average towards the current state of `network` (same architecture)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged = self.network.state_dict()
        for name, value in network.state_dict().items():
            if value.is_floating_point():
                averaged[name].lerp_(value, 1.0 - decay)
            else:
                averaged[name].copy_(value)


def make_training_module(config: TrainingConfig) -> TrainingModule:
    """Build the network and its loss weighting for `config`."""
    network = build_model(config.architecture)
    if config.architecture == "single":
        weighting: nn.Module | None = None
    elif config.weighting == "uncertainty":
        weighting = losses.UncertaintyWeighting()
    else:
        weighting = losses.StaticWeighting(config.alpha)
    return TrainingModule(network, weighting)


def sigmas(module: TrainingModule) -> tuple[float, float]:
    """(σ_R, σ_L) of the module's weighting; (nan, nan) for the single-task model."""
    if module.weighting is None:
        return math.nan, math.nan
    return module.weighting.sigmas()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Return the autocast context of `precision` on `device`; a no-op for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def evaluate_batches(
    network: nn.Module, batches: Sequence[Batch], device: torch.device, precision: str = "fp32"
) -> dict:
    """Validation metrics on crops: micro-F1 of the multiclass calcification, binary F1, CAR F1."""
    was_training = network.training
    network.eval()
    predicted, truth, region_predicted, region_truth = [], [], [], []
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, precision):
            labels, regions = predict_labels(network, batch.inputs)
        predicted.append(labels.cpu().numpy())
        truth.append(batch.labels.cpu().numpy())
        region_predicted.append(regions.cpu().numpy())
        region_truth.append(batch.regions.cpu().numpy())
    network.train(was_training)
    return _validation_metrics(
        network, predicted, truth, region_predicted, region_truth
    )


@torch.inference_mode()
def evaluate_volumes(
    network: nn.Module,
    cases: Sequence[TrainingCase],
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 4,
) -> dict:
    """Validation metrics on whole series, each cut to its body window as in `segment_volume`."""
    from scoring import inference

    was_training = network.training
    network.eval()

    def predict(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, precision):
            return predict_labels(
                network, inputs.to(device).contiguous(memory_format=torch.channels_last)
            )

    predicted, truth, region_predicted, region_truth = [], [], [], []
    for case in cases:
        labels, regions = inference.predict_array(
            case.hu, inference.body_window(case.hu), predict, batch_size
        )
        predicted.append(labels)
        truth.append(case.labels)
        region_predicted.append(regions)
        region_truth.append(case.regions)
    network.train(was_training)
    return _validation_metrics(network, predicted, truth, region_predicted, region_truth)


def _calibrated_metrics(
    network: nn.Module,
    cases: Sequence[TrainingCase],
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Multiclass CAC micro-F1 at the best lesion threshold, with that threshold (NaN: argmax).

    micro_f1_cac_argmax keeps the argmax rule's micro-F1 for the log.
    """
    from scoring import evaluation

    results = evaluation.sweep_thresholds(
        network, device, [(case.hu, case.labels) for case in cases],
        autocast=lambda: autocast(device, precision),
    )
    chosen = evaluation.best_threshold(results)
    return {
        "micro_f1_cac_argmax": results[0].counts.f1,
        "micro_f1_cac": chosen.counts.f1,
        "lesion_threshold": math.nan if chosen.threshold is None else chosen.threshold,
    }


def _validation_metrics(
    network: nn.Module,
    predicted: Sequence[np.ndarray],
    truth: Sequence[np.ndarray],
    region_predicted: Sequence[np.ndarray],
    region_truth: Sequence[np.ndarray],
) -> dict:
    predicted_labels = np.concatenate([array.reshape(-1) for array in predicted])
    true_labels = np.concatenate([array.reshape(-1) for array in truth])
    binary = metrics.binary_voxel_metrics(predicted_labels, true_labels)
    region_f1 = math.nan
    # The single-task model has no region task, so its CAR F1 is undefined.
    if getattr(network, "architecture", "") != "single":
        region_f1 = metrics.region_micro_f1(
            np.concatenate([array.reshape(-1) for array in region_predicted]),
            np.concatenate([array.reshape(-1) for array in region_truth]),
        )
    return {
        "micro_f1_cac": metrics.multiclass_micro_f1(predicted_labels, true_labels),
        "binary_f1": binary.f1,
        "micro_f1_car": region_f1,
    }


# ---------------------------------------------------------------------------
# The loop


def resolve_device(name: str) -> torch.device:
    """"auto" → the first CUDA device when there is one, else the CPU; otherwise torch.device(name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch finds no CUDA device; use 'cpu'")
    return device


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass
class _Distributed:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _start_distributed(device_name: str) -> tuple[_Distributed, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed(), resolve_device(device_name)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    state = _Distributed(True, dist.get_rank(), dist.get_world_size(), local_rank)
    logger.info("joined torchrun group: rank %d of %d on %s", state.rank, state.world_size, device)
    return state, device


def _broadcast_flag(flag: bool, distributed: _Distributed, device: torch.device) -> bool:
    """Rank 0's value of `flag` on every rank."""
    if not distributed.enabled:
        return flag
    import torch.distributed as dist

    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def train(
    config: TrainingConfig,
    train_cases: Sequence[TrainingCase],
    validation_cases: Sequence[TrainingCase],
    output_dir: Path,
    *,
    resume: Path | None = None,
    continue_from: Path | None = None,
    data_description: str = "",
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainingOutcome:
    """Train one model and write `last.pt` and `best.pt` into `output_dir`.

    resume: a `last.pt` of an interrupted run with the same settings; the run
        continues from its epoch with its optimizer, scheduler and generator states.
    continue_from: a checkpoint whose weights start a new run at
        `config.continue_learning_rate` (the active-learning mode).
    Returns the outcome with the best validation micro-F1 and its epoch.
    Raises ValueError for bad settings or data, CheckpointError for a bad checkpoint.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    distributed, device = _start_distributed(config.device)
    output_dir = Path(output_dir)

    _seed_everything(config.seed)
    # Channels-last makes a training step about 4 times faster on the CPU (2.2 s
    # against 8.5 s for 8 crops of 256² on 2 cores, torch 2.13).
    module = make_training_module(config).to(device, memory_format=torch.channels_last)
    learning_rate = config.learning_rate
    start_epoch = 0
    best_f1 = -1.0
    best_epoch = 0
    epochs_without_improvement = 0
    history: list[dict[str, float]] = []
    generator = np.random.default_rng([config.seed, distributed.rank])
    training_state = None

    source = starting_checkpoint(config, resume=resume, continue_from=continue_from)
    if source is not None:
        seen = checkpoint_module.seen_in_training(source.metadata, [case.name for case in validation_cases])
        if seen:
            logger.warning(
                "%d validation series were training series of %s (%s), so the validation F1 "
                "overstates the model; validate on series it has not seen",
                len(seen), resume or continue_from, ", ".join(seen[:10]),
            )
    if continue_from is not None:
        module.network.load_state_dict(source.state_dict)
        weighting_state = (source.training_state or {}).get("weighting")
        if weighting_state and module.weighting is not None:
            module.weighting.load_state_dict(weighting_state)
        learning_rate = config.continue_learning_rate
        logger.info("continue training from %s at learning rate %g", continue_from, learning_rate)
    if resume is not None:
        module.network.load_state_dict(source.state_dict)
        training_state = source.training_state
        if module.weighting is not None and training_state.get("weighting"):
            module.weighting.load_state_dict(training_state["weighting"])
        learning_rate = float(training_state["initial_learning_rate"])

    optimizer = torch.optim.Adam(
        module.parameters(), lr=learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_decay_epochs, gamma=config.lr_decay
    )
    if training_state is not None:
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        start_epoch = int(training_state["epoch"])
        best_f1 = float(training_state["best_micro_f1"])
        best_epoch = int(training_state["best_epoch"])
        epochs_without_improvement = int(training_state["epochs_without_improvement"])
        history = list(training_state.get("history", []))
        generators = training_state.get("generators") or []
        if distributed.rank < len(generators):
            generator = checkpoint_module.restore_numpy_generator(generators[distributed.rank])
        torch.set_rng_state(training_state["torch_rng"])
        logger.info("resumed %s at epoch %d", resume, start_epoch)

    # A checkpoint of a run with a weight average stores the average as its
    # weights and the trained weights in its training state.
    average = None
    if config.ema_decay > 0:
        updates = int((training_state or {}).get("average_updates", 0))
        average = WeightAverage(module.network, config.ema_decay, updates)
    if training_state is not None and training_state.get("trained_network") is not None:
        module.network.load_state_dict(training_state["trained_network"])
    evaluated = module.network if average is None else average.network

    wrapped: nn.Module = module
    if distributed.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )

    sampler = HybridSampler(
        train_cases, config.crop_size, config.calcium_fraction, config.max_shift, generator,
        body_crop_fraction=config.body_crop_fraction,
        candidate_crop_fraction=config.candidate_crop_fraction,
    )
    if not sampler.calcium_pool:
        logger.warning("no training slice contains coronary calcium; every crop is negative")
    if validation_cases and not any(case.calcium_slices.size for case in validation_cases):
        logger.warning(
            "no validation slice contains coronary calcium, so the validation micro-F1 only "
            "shows whether the model called any calcium: 1.0 for none, 0.0 otherwise"
        )
    validation = []
    if config.validation == "crops":
        validation = validation_batches(
            validation_cases, config.crop_size, seed=config.seed + 7919,
            crops=config.validation_crops,
        )
    summary = {
        "training": summarise_cases(train_cases),
        "validation": summarise_cases(validation_cases),
        "description": data_description,
    }
    # The folder appears only once the settings, checkpoints and data have
    # passed their checks, so a run rejected at the start leaves nothing behind.
    if distributed.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            _carry_best_checkpoint(Path(resume), output_dir, distributed.is_main)
    last_path = output_dir / "last.pt"
    best_path = output_dir / "best.pt"

    epoch = start_epoch
    stop = False
    run_started = time.monotonic()
    # Lesion threshold of the latest calibrated validation (a resumed run starts
    # from its checkpoint's); NaN for the argmax rule.
    lesion_threshold = math.nan
    if resume is not None and config.selection == "calibrated":
        lesion_threshold = float(source.metadata.get("lesion_threshold", math.nan))
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        wrapped.train()
        totals = np.zeros(3)
        steps = range(config.steps_per_epoch)
        if progress and distributed.is_main:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"epoch {epoch}", leave=False, unit="step")
        for _ in steps:
            batch = sampler.sample(config.batch_size).to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, config.precision):
                total, region_part, lesion_part = wrapped(
                    batch.inputs.contiguous(memory_format=torch.channels_last),
                    batch.labels, batch.regions,
                )
            if not torch.isfinite(total.detach()):
                raise TrainingDivergedError(
                    f"the training loss became {float(total.detach())} in epoch {epoch}. "
                    "last.pt keeps the weights of the last finished epoch, if there is one. "
                    "Lower the learning rate and resume, or start again"
                )
            total.backward()
            optimizer.step()
            if average is not None:
                average.update(module.network)
            totals += [float(total.detach()), float(region_part.detach()), float(lesion_part.detach())]
        scheduler.step()

        improved = False
        record: dict[str, float] = {}
        out_of_time = _broadcast_flag(
            config.time_limit_minutes is not None
            and time.monotonic() - run_started >= 60 * config.time_limit_minutes,
            distributed, device,
        )
        validating = (
            epoch % config.validation_every == 0 or epoch == config.epochs or out_of_time
        )
        if distributed.is_main:
            if not validating:
                validation_metrics = dict.fromkeys(("micro_f1_cac", "binary_f1", "micro_f1_car"),
                                                   math.nan)
            elif config.validation == "volumes":
                validation_metrics = evaluate_volumes(
                    evaluated, validation_cases, device, config.precision
                )
                if config.selection == "calibrated":
                    validation_metrics.update(
                        _calibrated_metrics(evaluated, validation_cases, device, config.precision)
                    )
                    lesion_threshold = validation_metrics["lesion_threshold"]
            else:
                validation_metrics = evaluate_batches(
                    evaluated, validation, device, config.precision
                )
            sigma_region, sigma_lesion = sigmas(module)
            record = {
                "epoch": epoch,
                "loss": float(totals[0]) / config.steps_per_epoch,
                "region_loss": float(totals[1]) / config.steps_per_epoch,
                "lesion_loss": float(totals[2]) / config.steps_per_epoch,
                "sigma_region": sigma_region,
                "sigma_lesion": sigma_lesion,
                "learning_rate": float(optimizer.param_groups[0]["lr"]),
                "seconds": time.perf_counter() - started,
                **validation_metrics,
            }
            history.append(record)
            improved = validating and validation_metrics["micro_f1_cac"] > best_f1
            if improved:
                best_f1 = validation_metrics["micro_f1_cac"]
                best_epoch = epoch
                epochs_without_improvement = 0
            elif validating:
                epochs_without_improvement += 1
            validation_text = (
                "validation micro-F1 CAC {micro_f1_cac:.3f}, binary F1 {binary_f1:.3f}, "
                "micro-F1 CAR {micro_f1_car:.3f}".format(**validation_metrics)
                if validating else "no validation this epoch"
            )
            if validating and "lesion_threshold" in validation_metrics:
                chosen = validation_metrics["lesion_threshold"]
                validation_text += (
                    f" (lesion decision {'argmax' if math.isnan(chosen) else f'P(CAC) > {chosen:g}'}"
                    f"; micro-F1 CAC with the argmax {validation_metrics['micro_f1_cac_argmax']:.3f})"
                )
            logger.info(
                "epoch %d/%d: loss %.4f (region %.4f, lesion %.4f), sigma_R %.3f, sigma_L %.3f, "
                "%s, lr %.2e, %.0f s",
                epoch, config.epochs, record["loss"], record["region_loss"],
                record["lesion_loss"], sigma_region, sigma_lesion, validation_text,
                record["learning_rate"], record["seconds"],
            )
            metadata = _metadata(config, summary, record, best_f1, best_epoch)
            if not math.isnan(lesion_threshold):
                metadata["lesion_threshold"] = lesion_threshold
            state = _training_state(
                module, optimizer, scheduler, epoch, best_f1, best_epoch,
                epochs_without_improvement, history, generator, learning_rate, config,
            )
            if average is not None:
                state["trained_network"] = module.network.state_dict()
                state["average_updates"] = average.updates
            checkpoint = checkpoint_module.Checkpoint(
                config.architecture, evaluated.state_dict(), metadata, state
            )
            if improved:
                checkpoint_module.save_checkpoint(best_path, checkpoint)
            if epoch in config.snapshot_epochs:
                checkpoint_module.save_checkpoint(output_dir / f"epoch-{epoch:03d}.pt", checkpoint)
            checkpoint_module.save_checkpoint(last_path, checkpoint)
            if on_epoch is not None:
                on_epoch(record)
            stop = epochs_without_improvement >= config.patience
            if stop:
                logger.info(
                    "early stop after epoch %d: no better validation micro-F1 for %d validations "
                    "(best %.3f at epoch %d)", epoch, config.patience, best_f1, best_epoch,
                )
            elif out_of_time:
                stop = True
                logger.info(
                    "stopped after epoch %d: the time limit of %g minutes is reached "
                    "(best validation micro-F1 %.3f at epoch %d)",
                    epoch, config.time_limit_minutes, best_f1, best_epoch,
                )
        if _broadcast_flag(stop, distributed, device):
            break

    return TrainingOutcome(last_path, best_path, epoch, best_epoch, best_f1, history)


def _carry_best_checkpoint(resume: Path, output_dir: Path, is_main: bool) -> None:
    """Copy best.pt from the resumed run's folder when a resumed run writes into another folder.

    The resumed state carries the best validation micro-F1 so far. Without
    its weights, the new folder would have no best.pt until a later epoch
    beats that value.
    """
    source = resume.parent / "best.pt"
    target = output_dir / "best.pt"
    if not is_main or target.exists() or not source.is_file():
        return
    if source.resolve() == target.resolve():
        return
    atomic_write_bytes(target, source.read_bytes())
    logger.info("copied %s to %s", source, target)


def starting_checkpoint(
    config: TrainingConfig, *, resume: Path | None = None, continue_from: Path | None = None
) -> checkpoint_module.Checkpoint | None:
    """Load the checkpoint a run starts from and check that it fits `config`.

    Cheap next to the generation of training data, so `cacs-node train` calls
    it first. Returns None for a run from random weights. Raises ValueError
    for settings the checkpoint contradicts, CheckpointError for a bad file.
    """
    if resume is not None and continue_from is not None:
        raise ValueError("use either resume (an interrupted run) or continue_from, not both")
    path = resume if resume is not None else continue_from
    if path is None:
        return None
    source = checkpoint_module.load_checkpoint(path)
    _check_architecture(source, config)
    if resume is None:
        return source
    state = source.training_state
    if state is None:
        raise checkpoint_module.CheckpointError(
            f"{resume} contains no training state (an exported model); use --continue-from"
        )
    resumed_config = state.get("config", {})
    resumed_weighting = resumed_config.get("weighting", config.weighting)
    if resumed_weighting != config.weighting:
        raise ValueError(
            f"{resume} was trained with {resumed_weighting} weighting, not "
            f"{config.weighting}; resume with --weighting {resumed_weighting}"
        )
    resumed_decay = float(resumed_config.get("ema_decay", 0.0))
    if resumed_decay != config.ema_decay:
        raise ValueError(
            f"{resume} was trained with EMA decay {resumed_decay:g}, not "
            f"{config.ema_decay:g}; resume with --ema-decay {resumed_decay:g}, or start a "
            "new run from its weights with --continue-from"
        )
    reached = int(state.get("epoch", 0))
    if reached >= config.epochs:
        raise ValueError(
            f"{resume} has already trained {reached} epoch{'' if reached == 1 else 's'}, so "
            f"--epochs {config.epochs} leaves nothing to do; give --epochs above {reached}"
        )
    return source


def _check_architecture(source: checkpoint_module.Checkpoint, config: TrainingConfig) -> None:
    if source.architecture != config.architecture:
        raise ValueError(
            f"checkpoint architecture {source.architecture!r} differs from the requested "
            f"{config.architecture!r}; pass --architecture {source.architecture}"
        )


def _metadata(
    config: TrainingConfig,
    summary: dict[str, Any],
    record: dict[str, float],
    best_f1: float,
    best_epoch: int,
) -> dict[str, Any]:
    return {
        "architecture": config.architecture,
        "model_name": config.model_name,
        "input_normalisation": checkpoint_module.input_normalisation(),
        "code_version": checkpoint_module.code_version(),
        "torch_version": str(torch.__version__),
        "training_config": asdict(config),
        "training_data": summary,
        "metrics": {
            "last_epoch": {key: float(value) for key, value in record.items()},
            "best_validation_micro_f1_cac": best_f1,
            "best_epoch": best_epoch,
        },
    }


def _training_state(
    module: TrainingModule,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    best_f1: float,
    best_epoch: int,
    epochs_without_improvement: int,
    history: list[dict[str, float]],
    generator: np.random.Generator,
    initial_learning_rate: float,
    config: TrainingConfig,
) -> dict[str, Any]:
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "weighting": module.weighting.state_dict() if module.weighting is not None else {},
        "epoch": epoch,
        "best_micro_f1": best_f1,
        "best_epoch": best_epoch,
        "epochs_without_improvement": epochs_without_improvement,
        "history": history,
        "generators": [checkpoint_module.numpy_generator_state(generator)],
        "torch_rng": torch.get_rng_state(),
        "initial_learning_rate": initial_learning_rate,
        "config": asdict(config),
    }


def export_model(source: Path, destination: Path, extra_metadata: dict[str, Any] | None = None,
                 half_precision: bool = False) -> str:
    """Write the weights and metadata of `source` without training state; return the model version.

    The model version is "<model name>-<first 12 hex digits of the weights' SHA-256>",
    followed by "-t<threshold>" when the metadata sets a lesion threshold.
    half_precision stores float tensors as float16 (they are cast back to
    float32 on load), which halves the file size.
    """
    checkpoint = checkpoint_module.load_checkpoint(source)
    state_dict = checkpoint.state_dict
    if half_precision:
        state_dict = {
            key: value.half() if value.is_floating_point() else value
            for key, value in state_dict.items()
        }
    metadata = dict(checkpoint.metadata)
    metadata.update(extra_metadata or {})
    version = checkpoint_module.model_version(
        metadata.get("model_name", checkpoint.architecture), state_dict,
        metadata.get("lesion_threshold"),
    )
    metadata["model_version"] = version
    metadata["storage_dtype"] = "float16" if half_precision else "float32"
    checkpoint_module.save_checkpoint(
        destination, checkpoint_module.Checkpoint(checkpoint.architecture, state_dict, metadata)
    )
    return version
