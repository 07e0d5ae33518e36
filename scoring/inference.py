"""Segmentation of a CT volume with a trained network: CAC labels, CAR regions, MC dropout.

`segment_volume` runs the slices through the network in batches under
`torch.inference_mode`, on the CPU or a CUDA device. Memory stays bounded by
the batch size: only one batch of inputs and logits exists at a time, and
the outputs are uint8 arrays of the volume's shape.

Before the network runs, each slice is cut to the body region: the bounding
box of HU > −500 over all slices, grown to a multiple of 256 pixels around
its centre (the network's eight stride-2 levels need that), and filled with
−2048 HU where the window leaves the image. Pixels outside the window get
label 0 and region 0 (OTHER_CAR).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from scoring.checkpoint import CheckpointError, load_checkpoint, model_version
from scoring.config import model_identity_problem
from scoring.errors import FieldOfViewError
from scoring.model import (
    SIZE_MULTIPLE,
    check_lesion_threshold,
    predict_labels,
    prepare_input,
)
from scoring.volume import PADDING_HU, CTVolume

logger = logging.getLogger(__name__)

#: Folder of the shipped model.
MODELS_DIR = Path(__file__).resolve().parent / "models"

#: File name of the shipped default model inside MODELS_DIR.
DEFAULT_MODEL_FILE = "default.pt"

#: HU above which a pixel counts as body when cropping to the body region.
BODY_THRESHOLD_HU = -500.0

#: Slices per forward pass by default; bounds memory at about 0.3 GB per slice
#: of 512² in float32 on the CPU.
DEFAULT_BATCH_SIZE = 4

#: Smallest height and width, in mm, of images the model segments. An adult
#: heart is about 120 mm long, so a smaller image cannot hold its coronary
#: arteries. The phantom series cover 179–410 mm and the real series of the
#: tests 250 mm (QRM phantom) and 500 mm.
MIN_FIELD_OF_VIEW_MM = 100.0

#: Minimum number of rows and columns of images the model segments. A calcium-scoring CT
#: has 512; 64 is a guard against slivers (one row of 150 mm pixels).
MIN_IMAGE_PIXELS = 64

#: Dropout rate and number of passes of the Monte Carlo dropout mode.
MC_DROPOUT_RATE = 0.01
MC_DROPOUT_PASSES = 10

Device = Literal["auto", "cpu", "cuda"] | str

#: Runtimes of the network; "auto" picks ONNX Runtime on the CPU and torch on a GPU.
RUNTIMES: tuple[str, ...] = ("auto", "torch", "onnx")


class ModelError(RuntimeError):
    """The model cannot be loaded or run on the requested device."""


@dataclass(frozen=True)
class LoadedModel:
    """A network in eval mode on its device, with the metadata of its checkpoint.

    model_version: "<model name>-<first 12 hex digits of the weights' SHA-256>", then
        "-t<threshold>" when a lesion threshold decides; computed on loading.
    """

    network: nn.Module
    architecture: str
    model_version: str
    device: torch.device
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def lesion_threshold(self) -> float | None:
        """CAC probability above which a pixel is a lesion (metadata "lesion_threshold");
        None for the argmax rule."""
        return self.metadata.get("lesion_threshold")

    @property
    def caution(self) -> str | None:
        """The restriction of use the checkpoint states, such as training on
        synthetic data only (metadata "synthetic_only"); None when it states none."""
        text = self.metadata.get("synthetic_only")
        return (text.strip() or None) if isinstance(text, str) else None


@dataclass(frozen=True)
class UncertaintyMaps:
    """Per-pixel variance over Monte Carlo dropout passes, float32 of the volume's shape.

    region_variance: variance of the T_R softmax probabilities, averaged over the 4 classes.
    lesion_variance: variance of the T_L probability of CAC.
    passes: number of passes; rate: the dropout rate used.
    """

    region_variance: np.ndarray
    lesion_variance: np.ndarray
    passes: int
    rate: float


@dataclass(frozen=True)
class Segmentation:
    """The network's result for one volume.

    labels: uint8 CAC labels in volume shape, 0 background, 1 LAD (with LM), 2 LCX, 3 RCA.
    regions: uint8 CAR classes in volume shape, 0 OTHER_CAR, 1 LAD, 2 LCX, 3 RCA.
    model_version: version string of the model that produced them.
    body_window: (top, left, size_rows, size_columns) of the window the network saw.
    model_caution: the model's restriction of use (`LoadedModel.caution`), or None.
    """

    labels: np.ndarray
    regions: np.ndarray
    model_version: str
    body_window: tuple[int, int, int, int]
    model_caution: str | None = None


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" → CUDA when available, else CPU; anything else as torch.device.

    Raises ModelError when CUDA is requested but torch finds no CUDA device.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as error:
            raise ModelError(
                f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
            ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!s} requested but torch finds no CUDA device; choose device \"cpu\" "
            "(--device cpu on the command line, [scoring] device = \"cpu\" in node.toml)"
        )
    return resolved


def default_model_path() -> Path:
    """Path of the shipped default model."""
    return MODELS_DIR / DEFAULT_MODEL_FILE


def load_model(
    path: str | Path | None = None,
    device: str | torch.device = "auto",
    *,
    channels_last: bool = True,
) -> LoadedModel:
    """Load a checkpoint onto a device in eval mode.

    path: a checkpoint written by `cacs-node train`; None for the shipped
        default model in scoring/models/.
    device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    channels_last: store the weights in the channels-last memory format,
        which makes these convolutions several times faster on the CPU.
    Raises ModelError for a missing, damaged or mismatching checkpoint, or an
    unavailable device.
    """
    resolved_device = resolve_device(device)
    checkpoint_path = default_model_path() if path is None else Path(path)
    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except CheckpointError as error:
        raise ModelError(str(error)) from error
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network = checkpoint.build_network().to(resolved_device, memory_format=memory_format)
    try:
        check_lesion_threshold(checkpoint.metadata.get("lesion_threshold"))
    except ValueError as error:
        raise ModelError(f"{checkpoint_path}: {error}") from error
    threshold = checkpoint.metadata.get("lesion_threshold")
    # Reports carry the version, so it comes from the weights and the threshold
    # that decide, never from a stored string that an edit could leave behind.
    version = model_version(
        str(checkpoint.metadata.get("model_name", checkpoint.architecture)),
        checkpoint.state_dict, threshold,
    )
    caution = checkpoint.metadata.get("synthetic_only")
    problem = model_identity_problem(version, None if caution is None or caution == "" else caution)
    if problem:
        raise ModelError(f"{checkpoint_path}: metadata model_name or synthetic_only: {problem}")
    stored = checkpoint.metadata.get("model_version")
    if stored is not None and stored != version:
        logger.warning(
            "%s names itself model %s, but its weights and lesion threshold make it %s; "
            "reports use %s", checkpoint_path, stored, version, version,
        )
    logger.info(
        "loaded model %s (%s) from %s on %s, lesion decision %s",
        version, checkpoint.architecture, checkpoint_path, resolved_device,
        "argmax" if threshold is None else f"CAC probability > {threshold:g}",
    )
    return LoadedModel(
        network=network,
        architecture=checkpoint.architecture,
        model_version=str(version),
        device=resolved_device,
        metadata=checkpoint.metadata,
        path=checkpoint_path,
    )


@functools.lru_cache(maxsize=2)
def _cached_default_model(device: str) -> LoadedModel:
    return load_model(None, device)


def body_window(hu: np.ndarray, multiple: int = SIZE_MULTIPLE) -> tuple[int, int, int, int]:
    """Window (top, left, rows, columns) around the body, each side a multiple of `multiple`.

    The body is the bounding box of HU > −500 over all slices. Each side of
    the window is the box side rounded up to `multiple` (at least `multiple`),
    centred on the box and shifted to stay inside the image where it fits.
    Without any body pixel the window covers the whole image, rounded up.
    """
    rows, columns = hu.shape[-2:]
    body = np.any(hu > BODY_THRESHOLD_HU, axis=0) if hu.ndim == 3 else hu > BODY_THRESHOLD_HU
    if not body.any():
        return 0, 0, _round_up(rows, multiple), _round_up(columns, multiple)
    row_indices = np.flatnonzero(body.any(axis=1))
    column_indices = np.flatnonzero(body.any(axis=0))
    top, size_rows = _centred_span(row_indices[0], row_indices[-1] + 1, rows, multiple)
    left, size_columns = _centred_span(column_indices[0], column_indices[-1] + 1, columns, multiple)
    return top, left, size_rows, size_columns


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _centred_span(start: int, stop: int, length: int, multiple: int) -> tuple[int, int]:
    size = _round_up(stop - start, multiple)
    begin = (start + stop - size) // 2
    if size <= length:
        begin = min(max(begin, 0), length - size)
    else:
        begin = (length - size) // 2
    return int(begin), int(size)


def extract_window(hu: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """Cut `window` out of HU slices (slices, rows, columns), filling outside with PADDING_HU."""
    top, left, size_rows, size_columns = window
    slices, rows, columns = hu.shape
    out = np.full((slices, size_rows, size_columns), PADDING_HU, dtype=np.float32)
    source_rows = slice(max(top, 0), min(top + size_rows, rows))
    source_columns = slice(max(left, 0), min(left + size_columns, columns))
    out[:, source_rows.start - top:source_rows.stop - top,
        source_columns.start - left:source_columns.stop - left] = hu[:, source_rows, source_columns]
    return out


def _paste_window(
    target: np.ndarray, values: np.ndarray, window: tuple[int, int, int, int], first_slice: int
) -> None:
    top, left, _, _ = window
    rows, columns = target.shape[1:]
    source_rows = slice(max(top, 0), min(top + values.shape[1], rows))
    source_columns = slice(max(left, 0), min(left + values.shape[2], columns))
    target[first_slice:first_slice + values.shape[0], source_rows, source_columns] = values[
        :, source_rows.start - top:source_rows.stop - top,
        source_columns.start - left:source_columns.stop - left,
    ]


def _check_volume(volume: CTVolume) -> np.ndarray:
    hu = np.asarray(volume.hu)
    if hu.ndim != 3 or hu.shape[0] == 0:
        raise ValueError(
            f"expected a volume of shape (slices, rows, columns) with at least one slice, "
            f"got shape {hu.shape}"
        )
    rows, columns = hu.shape[1:]
    height = rows * float(volume.pixel_spacing[0])
    width = columns * float(volume.pixel_spacing[1])
    size = (f"{rows} × {columns} pixels of {float(volume.pixel_spacing[0]):g} × "
            f"{float(volume.pixel_spacing[1]):g} mm")
    if min(rows, columns) < MIN_IMAGE_PIXELS:
        raise FieldOfViewError(
            f"the images have {size}; the model needs at least {MIN_IMAGE_PIXELS} pixels in each "
            "direction to show the coronary arteries; send the calcium-scoring reconstruction"
        )
    if min(height, width) < MIN_FIELD_OF_VIEW_MM:
        # Rounded down, so a size just below the limit never reads as the limit itself.
        extents = " × ".join(f"{math.floor(extent * 10) / 10:.1f}" for extent in (height, width))
        raise FieldOfViewError(
            f"the images cover {extents} mm ({size}), less than the {MIN_FIELD_OF_VIEW_MM:.0f} mm in "
            "each direction that a heart needs; send the calcium-scoring reconstruction that shows "
            "the whole heart"
        )
    return hu


def _resolve_model(model: LoadedModel | None, device: str | torch.device) -> LoadedModel:
    if model is not None:
        return model
    resolved = resolve_device(device)
    return _cached_default_model(str(resolved))


_ONNX_SESSIONS: dict[int, Any] = {}


def resolve_runtime(loaded: LoadedModel, runtime: str) -> str:
    """Turn "auto" into "onnx" for a model on the CPU (when onnxruntime imports) or "torch".

    Raises ValueError for an unknown runtime, ModelError for "onnx" off the CPU.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        if loaded.device.type != "cpu":
            return "torch"
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            logger.warning("onnxruntime is not installed; the model runs in torch on the CPU")
            return "torch"
        return "onnx"
    if runtime == "onnx" and loaded.device.type != "cpu":
        raise ModelError(f"the ONNX runtime runs on the CPU only; the model is on {loaded.device}")
    return runtime


def device_for_runtime(device: str, runtime: str) -> str:
    """Return the device to load a model on for `runtime`.

    ONNX Runtime runs on the CPU only, so with runtime "onnx" the device "auto"
    means the CPU. Any other device or runtime is returned unchanged.
    """
    return "cpu" if runtime == "onnx" and device == "auto" else device


def prepare_runtime(loaded: LoadedModel, runtime: str = "auto") -> str:
    """Resolve `runtime` and do its one-time work now (the ONNX export); return the runtime used.

    A node calls it at start-up, so the first series does not wait for the export.
    """
    resolved = resolve_runtime(loaded, runtime)
    if resolved == "onnx":
        started = time.perf_counter()
        _onnx_session(loaded)
        logger.info(
            "model %s exported to ONNX Runtime in %.1f s",
            loaded.model_version, time.perf_counter() - started,
        )
    return resolved


def _onnx_session(loaded: LoadedModel) -> Any:
    """Export the network to ONNX once per loaded model and open an ONNX Runtime CPU session."""
    import copy
    import io

    import onnxruntime

    key = id(loaded.network)
    if key not in _ONNX_SESSIONS:
        network = copy.deepcopy(loaded.network).cpu().to(memory_format=torch.contiguous_format)
        buffer = io.BytesIO()
        axes = {0: "slices", 2: "rows", 3: "columns"}
        outputs = ["region", "lesion"] if loaded.architecture != "single" else ["classes"]
        with warnings.catch_warnings():
            # The tracer warns about the input-size check in the network's forward.
            # The tests compare the exported graph with torch, so the warning would
            # only alarm operators reading the log.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                network, (torch.zeros(1, 2, SIZE_MULTIPLE, SIZE_MULTIPLE),), buffer,
                input_names=["input"], output_names=outputs, opset_version=17, dynamo=False,
                dynamic_axes={name: axes for name in ["input", *outputs]},
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        _ONNX_SESSIONS[key] = onnxruntime.InferenceSession(
            buffer.getvalue(), options, providers=["CPUExecutionProvider"]
        )
    return _ONNX_SESSIONS[key]


def _predict_onnx(
    session: Any, lesion_threshold: float | None, inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from scoring.model import combine_outputs

    outputs = [torch.from_numpy(array) for array in session.run(None, {"input": inputs.numpy()})]
    output = tuple(outputs) if len(outputs) == 2 else outputs[0]
    return combine_outputs(output, inputs[:, 1] > 0.5, lesion_threshold)


def segment_volume(
    volume: CTVolume,
    model: LoadedModel | None = None,
    device: str | torch.device = "auto",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    crop_to_body: bool = True,
    channels_last: bool = True,
    runtime: Literal["auto", "torch", "onnx"] = "torch",
) -> Segmentation:
    """Segment CAC and CAR in every slice of `volume`.

    model: from `load_model`; None loads the shipped default model once per
        device and keeps it. device: used only when model is None.
    batch_size: slices per forward pass. crop_to_body: run the network on the
        body window only (see the module docstring) instead of the full slice
        padded to a multiple of 256. channels_last: pass the inputs in the
        channels-last memory format (match the format `load_model` gave the weights).
    runtime: "torch", or "onnx" to run the network through ONNX Runtime on
        the CPU (exported once per model, with the torch thread count), or
        "auto" for ONNX Runtime on the CPU and torch on a GPU.
        bench/bench_inference.py measured ONNX Runtime 2.5 times faster than
        the torch path on 2 cores, with identical labels on a 50-slice phantom.
    Returns a Segmentation whose arrays have the volume's shape. The model
    is not modified, so threads may share it (but not with `mc_dropout_variance`).
    Raises ModelError when the model cannot be loaded, FieldOfViewError when the
    images are smaller than MIN_FIELD_OF_VIEW_MM, ValueError for a bad volume.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    hu = _check_volume(volume)
    loaded = _resolve_model(model, device)
    session = _onnx_session(loaded) if resolve_runtime(loaded, runtime) == "onnx" else None
    window = body_window(hu) if crop_to_body else _full_window(hu)

    started = time.perf_counter()
    if session is not None:
        predict = functools.partial(_predict_onnx, session, loaded.lesion_threshold)
    else:
        predict = functools.partial(
            _predict_torch, loaded.network, loaded.device,
            torch.channels_last if channels_last else torch.contiguous_format,
            loaded.lesion_threshold,
        )
    labels, regions = predict_array(hu, window, predict, batch_size)
    logger.info(
        "segmented series %s: %d slices, window %d × %d, %.2f s on %s, model %s",
        volume.series_instance_uid, hu.shape[0], window[2], window[3],
        time.perf_counter() - started, loaded.device, loaded.model_version,
    )
    return Segmentation(labels, regions, loaded.model_version, window, loaded.caution)


def predict_array(
    hu: np.ndarray,
    window: tuple[int, int, int, int],
    predict: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[np.ndarray, ...]:
    """Run `predict` over the slices of `hu` inside `window`, `batch_size` slices at a time.

    predict: network inputs (N, 2, rows, columns) → per-pixel maps, each (N, rows, columns),
        such as (labels, regions).
    Returns one array per map, of the shape of `hu` and the map's dtype; pixels
    outside the window are 0. Training validation, calibration and
    `segment_volume` share it, so all of them see slices the same way.
    """
    maps: list[np.ndarray] = []
    with torch.inference_mode():
        for first in range(0, hu.shape[0], batch_size):
            chunk = extract_window(hu[first:first + batch_size], window)
            batch_maps = [array.cpu().numpy() for array in predict(prepare_input(chunk))]
            if not maps:
                maps = [np.zeros(hu.shape, dtype=array.dtype) for array in batch_maps]
            for target, values in zip(maps, batch_maps):
                _paste_window(target, values, window, first)
    return tuple(maps)


def _predict_torch(
    network: nn.Module, device: torch.device, memory_format: torch.memory_format,
    lesion_threshold: float | None, inputs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return predict_labels(
        network, inputs.to(device).contiguous(memory_format=memory_format), lesion_threshold
    )


def _full_window(hu: np.ndarray) -> tuple[int, int, int, int]:
    rows, columns = hu.shape[-2:]
    size_rows, size_columns = _round_up(rows, SIZE_MULTIPLE), _round_up(columns, SIZE_MULTIPLE)
    return (rows - size_rows) // 2, (columns - size_columns) // 2, size_rows, size_columns


@contextmanager
def mc_dropout(network: nn.Module, rate: float = MC_DROPOUT_RATE) -> Iterator[nn.Module]:
    """Put every dropout layer in training mode at `rate`, keep batch norm in eval mode.

    Restores the previous rates and modes on exit.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must lie in [0, 1), got {rate}")
    dropouts = [module for module in network.modules() if isinstance(module, nn.Dropout)]
    saved = [(module.p, module.training) for module in dropouts]
    was_training = network.training
    network.eval()
    try:
        for module in dropouts:
            module.p = rate
            module.train()
        yield network
    finally:
        for module, (p, training) in zip(dropouts, saved):
            module.p = p
            module.train(training)
        network.train(was_training)


def mc_dropout_variance(
    volume: CTVolume,
    model: LoadedModel | None = None,
    device: str | torch.device = "auto",
    *,
    passes: int = MC_DROPOUT_PASSES,
    rate: float = MC_DROPOUT_RATE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> UncertaintyMaps:
    """Per-pixel variance of the softmax outputs over `passes` Monte Carlo dropout passes.

    Every dropout layer runs at `rate` (0.01 by default) in training mode and
    batch norm stays in eval mode. `seed` makes the dropout masks repeatable;
    the global torch generator is left as it was. Pixels outside the body
    window get variance 0. Only two-task networks ("mtl", "sequential") have
    both maps; for the single-task model both maps are the variance of its
    4-class probabilities. The dropout layers of the shared model change
    while this runs, so no other thread may use the model meanwhile.
    Raises ValueError for passes < 2.
    """
    if passes < 2:
        raise ValueError(f"a variance needs at least 2 passes, got {passes}")
    hu = _check_volume(volume)
    loaded = _resolve_model(model, device)
    window = body_window(hu)
    region_variance = np.zeros(hu.shape, dtype=np.float32)
    lesion_variance = np.zeros(hu.shape, dtype=np.float32)

    devices = [loaded.device] if loaded.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(), \
            mc_dropout(loaded.network, rate) as network:
        torch.manual_seed(seed)
        for first in range(0, hu.shape[0], batch_size):
            inputs = prepare_input(extract_window(hu[first:first + batch_size], window))
            inputs = inputs.to(loaded.device)
            region_samples, lesion_samples = [], []
            for _ in range(passes):
                output = network(inputs)
                if isinstance(output, tuple):
                    region_samples.append(torch.softmax(output[0], dim=1))
                    lesion_samples.append(torch.softmax(output[1], dim=1)[:, 1])
                else:
                    probabilities = torch.softmax(output, dim=1)
                    region_samples.append(probabilities)
                    lesion_samples.append(probabilities)
            region = torch.stack(region_samples).var(dim=0, unbiased=False)
            lesion = torch.stack(lesion_samples).var(dim=0, unbiased=False)
            region = region.mean(dim=1)
            if lesion.ndim == 4:
                lesion = lesion.mean(dim=1)
            _paste_window(region_variance, region.float().cpu().numpy(), window, first)
            _paste_window(lesion_variance, lesion.float().cpu().numpy(), window, first)
    return UncertaintyMaps(region_variance, lesion_variance, passes, rate)
