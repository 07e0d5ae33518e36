"""Model checkpoints: atomic writes, metadata, and a SHA-256 of the weights checked on load.

A checkpoint is a `torch.save` dictionary that `torch.load(weights_only=True)`
can read (tensors, numbers, strings, lists and dicts only):

- "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION;
- "architecture": "mtl", "single" or "sequential";
- "state_dict": the network weights;
- "weights_sha256": SHA-256 over the state dict (see `hash_state_dict`);
- "metadata": architecture, input normalisation, code version, training data
  summary, metrics, model version;
- while training, also "training_state": optimizer, scheduler, loss weighting,
  epoch, best metric and random generator states, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from scoring import model as model_module
from scoring.fileio import atomic_writer

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cacs-node-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, of another format, or fails its hash check."""


def input_normalisation() -> dict[str, Any]:
    """Describe the input convention of the weights, for the metadata of every checkpoint."""
    return {
        "channels": ["(HU + 2000) / 3300 after HU below -2048 is set to -2048", "HU >= 130"],
        "hu_offset": model_module.HU_OFFSET,
        "hu_scale": model_module.HU_SCALE,
        "hu_floor": model_module.HU_FLOOR,
        "candidate_threshold_hu": float(model_module.CALCIUM_THRESHOLD_HU),
        "size_multiple": model_module.SIZE_MULTIPLE,
    }


def code_version() -> str:
    """The installed cacs-node package version, "unknown" when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("cacs-node")
    except metadata.PackageNotFoundError:
        return "unknown"


def hash_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the weights: for each key in sorted order, its name, dtype, shape and bytes.

    The hash depends on values only, not on the pickle layout, so the same
    weights give the same hash whichever torch version saved them.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def model_version(
    model_name: str, state_dict: dict[str, torch.Tensor], lesion_threshold: float | None = None
) -> str:
    """Name a model "<name>-<first 12 hex digits of the weights' hash>[-t<threshold>]".

    The threshold suffix distinguishes models with the same weights but
    different lesion decisions: it is the shortest text that reads back as
    the same float (0.63, 0.6300001), so two thresholds never share a version.
    The argmax rule has no suffix.
    """
    version = f"{model_name}-{hash_state_dict(state_dict)[:12]}"
    return version if lesion_threshold is None else f"{version}-t{float(lesion_threshold)!r}"


def seen_in_training(metadata: dict[str, Any], names: Iterable[str]) -> list[str]:
    """Return the series of `names` that the checkpoint's metadata lists as training series.

    Training summaries list every series name (phantom-N for phantom seeds,
    the case folder's name otherwise). Checkpoints written before that
    listed the first 200 only, so their longer training sets are checked in
    part. Names of other data sets may coincide by chance.
    """
    training = (metadata.get("training_data") or {}).get("training") or {}
    listed = training.get("names") if isinstance(training, dict) else None
    known = {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()
    return [name for name in names if name in known]


@dataclass
class Checkpoint:
    """The content of one checkpoint file."""

    architecture: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] | None = None

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of `state_dict` (see `hash_state_dict`)."""
        return hash_state_dict(self.state_dict)

    def build_network(self) -> nn.Module:
        """Create the network of `architecture` and load the weights into it, in eval mode."""
        network = model_module.build_model(self.architecture)
        state = {key: value.float() if value.is_floating_point() else value
                 for key, value in self.state_dict.items()}
        network.load_state_dict(state)
        network.eval()
        return network


def write_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Save `payload` with torch.save to a temporary file, fsync it, then rename it onto `path`."""
    with atomic_writer(path) as stream:
        torch.save(payload, stream)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> str:
    """Write `checkpoint` atomically to `path`; return the weights' SHA-256."""
    state_dict = {key: value.detach().cpu() for key, value in checkpoint.state_dict.items()}
    weights_sha256 = hash_state_dict(state_dict)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "architecture": checkpoint.architecture,
        "state_dict": state_dict,
        "weights_sha256": weights_sha256,
        "metadata": checkpoint.metadata,
    }
    if checkpoint.training_state is not None:
        payload["training_state"] = checkpoint.training_state
    write_atomically(Path(path), payload)
    logger.info("wrote checkpoint %s (weights sha256 %s)", path, weights_sha256[:12])
    return weights_sha256


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint and verify its weights against the stored SHA-256.

    Raises CheckpointError when the file is missing or unreadable, has another
    format, names an unknown architecture, or its weights do not match the hash.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"model checkpoint {path} is a folder; pass the path of a .pt file "
                              "written by `cacs-node train`, such as the run's best.pt")
    if not path.is_file():
        raise CheckpointError(f"model checkpoint {path} not found; pass the path of a .pt file "
                              "written by `cacs-node train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, pickle.UnpicklingError) as error:
        # A text or image file makes torch's unpickler fail with KeyError or IndexError.
        # torch's messages go on with advice for other programs; their first
        # sentence names the failure.
        text = str(error).strip()
        reason = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(error).__name__
        raise CheckpointError(
            f"model checkpoint {path} cannot be read ({reason}); the file is damaged or is "
            "not a cacs-node checkpoint"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a cacs-node checkpoint: expected format {CHECKPOINT_FORMAT!r}"
        )
    version = payload.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this cacs-node reads version "
            f"{CHECKPOINT_FORMAT_VERSION}"
        )
    architecture = payload.get("architecture")
    if architecture not in model_module.ARCHITECTURES:
        raise CheckpointError(
            f"{path} names architecture {architecture!r}; expected one of "
            f"{', '.join(model_module.ARCHITECTURES)}"
        )

    state_dict = payload.get("state_dict")
    _check_weights(path, architecture, state_dict)
    if not isinstance(payload.get("metadata") or {}, dict):
        raise CheckpointError(f"{path} has metadata that is not a mapping; the file is damaged")
    stored = payload.get("weights_sha256")
    actual = hash_state_dict(state_dict)
    if stored != actual:
        raise CheckpointError(
            f"weights in {path} do not match their stored SHA-256 (stored {stored}, computed "
            f"{actual}); the file was altered or damaged, so copy it again from its source"
        )
    return Checkpoint(
        architecture=architecture,
        state_dict=state_dict,
        metadata=dict(payload.get("metadata") or {}),
        training_state=payload.get("training_state"),
    )


def _check_weights(path: Path, architecture: str, state_dict: Any) -> None:
    """Raise CheckpointError unless `state_dict` has the names and shapes of `architecture`."""
    if not isinstance(state_dict, dict) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise CheckpointError(
            f"{path} contains no weights (a state_dict of tensors); the file is damaged"
        )
    expected = model_module.build_model(architecture).state_dict()
    mismatched = sorted(
        name for name in expected.keys() | state_dict.keys()
        if name not in expected or name not in state_dict
        or expected[name].shape != state_dict[name].shape
    )
    if mismatched:
        raise CheckpointError(
            f"the weights in {path} do not fit architecture {architecture!r}: "
            f"{len(mismatched)} tensors missing, extra or of another shape, e.g. {mismatched[0]}"
        )


def numpy_generator_state(generator: np.random.Generator) -> dict[str, Any]:
    """The bit generator state of `generator`, in a form torch.load(weights_only=True) reads."""
    return generator.bit_generator.state


def restore_numpy_generator(state: dict[str, Any]) -> np.random.Generator:
    """A new Generator whose bit generator continues from `state`."""
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)
