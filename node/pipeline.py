"""The steps a job runs: load and score the series, write SEG/SR/summary, send them.

`ScoringPipeline` is the real pipeline: `scoring.series.load_series` →
`scoring.inference.segment_volume` → `scoring.agatston.score_volume` →
`sr_writer.write_outputs` → `node.scu.send_with_retries`. The job runner
(node.worker) only uses the `Pipeline` protocol, so tests of the job machinery
can pass a fast stand-in.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset

from node.config import NOTICE, OUTPUT_KINDS, Destination, NodeSettings
from scoring.result import ScoringResult
from scoring.volume import CTVolume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredSeries:
    """A scored series, kept in memory between the scoring and writing steps.

    labels: uint8 CAC labels (0 background, 1 LAD, 2 LCX, 3 RCA) in volume shape.
    regions: uint8 coronary artery regions (0 other, 1 LAD, 2 LCX, 3 RCA), or None.
    """

    volume: CTVolume
    labels: np.ndarray
    regions: np.ndarray | None
    result: ScoringResult
    model_version: str
    model_caution: str | None = None


@dataclass(frozen=True)
class WrittenOutput:
    """One file written for a job: its output kind and SOPInstanceUID."""

    kind: str
    path: Path
    sop_instance_uid: str


class Pipeline(Protocol):
    """Steps the job runner calls, each on the worker thread."""

    def model_version(self) -> str:
        """Version of the model that `score` uses; may load the model."""
        ...

    def score(self, paths: Sequence[Path]) -> ScoredSeries:
        """Load the instance files as one series and score it.

        Raises:
            scoring.errors.SeriesError: the series cannot be scored as it is;
                the message is shown on the refused job.
        """
        ...

    def write(self, scored: ScoredSeries, out_dir: Path, predecessor: Dataset | None) -> list[WrittenOutput]:
        """Write the outputs into `out_dir`; `predecessor` is the SR that the new SR supersedes."""
        ...

    def write_notice(self, paths: Sequence[Path], reason: str, out_dir: Path) -> WrittenOutput:
        """Write the not-scored notice of a refused series into `out_dir`.

        Raises:
            ValueError: no instance file has a readable header with the UIDs the notice needs.
        """
        ...

    def send(self, files: Sequence[Path], destination: Destination, stop_event: threading.Event) -> Any:
        """Send files to one destination; return a `node.scu.SendReport`."""
        ...


class ModelUnavailableError(RuntimeError):
    """The configured model cannot be loaded; the message is short enough for one log line."""


#: Maximum length of a model loading message; torch's own texts run to many lines.
_MODEL_MESSAGE_LENGTH = 300


def explain_model_error(error: BaseException, path: Path | None) -> str:
    """Return a one-line reason why the model at `path` (None: the shipped one) cannot be loaded."""
    from scoring.checkpoint import CheckpointError
    from scoring.inference import ModelError

    model_name = str(path) if path is not None else "the shipped model"
    root: BaseException = error
    while root.__cause__ is not None:
        root = root.__cause__
    if not isinstance(root, (CheckpointError, ModelError)):
        # torch.load and unpickling errors explain torch internals, not what the operator should do.
        return (
            f"model file {model_name} cannot be read ({type(root).__name__}): it is damaged or not a cacs-node "
            'checkpoint; set [scoring] model_path to a file written by `cacs-node train`, or "" for the shipped model'
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(first_line) > _MODEL_MESSAGE_LENGTH:
        first_line = first_line[: _MODEL_MESSAGE_LENGTH - 3] + "..."
    return first_line


class ScoringPipeline:
    """The real pipeline, configured by the `[scoring]` and `[node]` settings.

    The model is loaded on first use and kept for later jobs.
    """

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self._model: Any = None
        self._model_lock = threading.Lock()
        #: The runtime that `check_model` resolved [scoring] runtime to ("onnx" or "torch").
        self.runtime: str | None = None

    def _loaded_model(self) -> Any:
        from scoring.inference import device_for_runtime, load_model

        with self._model_lock:
            if self._model is None:
                scoring = self.settings.scoring
                device = device_for_runtime(scoring.device, scoring.runtime)
                if scoring.threads:
                    import torch

                    # ONNX Runtime sessions take the same count (see scoring.inference).
                    torch.set_num_threads(scoring.threads)
                self._model = load_model(scoring.model_path, device=device)
                logger.info(
                    "model loaded from %s on device %s, version %s",
                    scoring.model_path or "the shipped default",
                    device,
                    _version_of(self._model),
                )
            return self._model

    def model_version(self) -> str:
        return _version_of(self._loaded_model())

    def model_caution(self) -> str | None:
        """Return the loaded model's restriction of use (see `LoadedModel.caution`), or None."""
        return getattr(self._loaded_model(), "caution", None)

    def check_model(self) -> str:
        """Load the configured model, prepare its runtime and the writers now; return the model version.

        The first series then does not wait for this one-time work. Moving it
        to start-up cut the node benchmark's latency by about 4 s on 2 cores.

        Raises:
            ModelUnavailableError: the model file is missing, damaged or not a
                cacs-node checkpoint, or the device is unavailable.
        """
        try:
            from scoring.inference import prepare_runtime

            model = self._loaded_model()
            self.runtime = prepare_runtime(model, self.settings.scoring.runtime)
            import sr_writer  # noqa: F401  (highdicom and matplotlib take about a second to import)

            return _version_of(model)
        except Exception as error:
            # load_model raises ModelError, but a damaged file can surface other errors from torch.
            raise ModelUnavailableError(explain_model_error(error, self.settings.scoring.model_path)) from error

    def score(self, paths: Sequence[Path]) -> ScoredSeries:
        from scoring.agatston import score_volume
        from scoring.inference import segment_volume
        from scoring.errors import NoEligibleSeriesError
        from scoring.series import load_series

        scoring = self.settings.scoring
        try:
            volume = load_series([str(path) for path in paths], policy=scoring.protocol_policy())
        except NoEligibleSeriesError as error:
            # Each job is one series, so describe what this series contained instead of the loader's general advice.
            raise NoEligibleSeriesError(f"{describe_instances(paths)}; {error}") from error
        segmentation = segment_volume(
            volume, model=self._loaded_model(), runtime=scoring.runtime
        )
        result = score_volume(volume, segmentation.labels, scoring.scoring_parameters())
        return ScoredSeries(
            volume=volume,
            labels=segmentation.labels,
            regions=getattr(segmentation, "regions", None),
            result=result,
            model_version=str(segmentation.model_version),
            model_caution=getattr(segmentation, "model_caution", None),
        )

    def write(self, scored: ScoredSeries, out_dir: Path, predecessor: Dataset | None) -> list[WrittenOutput]:
        import scoring
        from sr_writer import AlgorithmIdentification, write_outputs

        algorithm = AlgorithmIdentification(
            name="cacs-node", version=scoring.__version__, model_version=scored.model_version,
            model_caution=scored.model_caution,
        )
        regions = scored.regions if self.settings.scoring.write_region_seg else None
        derived = write_outputs(
            scored.volume,
            scored.labels,
            scored.result,
            out_dir,
            algorithm=algorithm,
            uid_root=self.settings.node.uid_root,
            regions=regions,
            predecessor=predecessor,
            parameters=self.settings.scoring.scoring_parameters(),
        )
        return outputs_of(derived, out_dir)

    def write_notice(self, paths: Sequence[Path], reason: str, out_dir: Path) -> WrittenOutput:
        import scoring
        from sr_writer import AlgorithmIdentification, build_notice_image
        from sr_writer.identity import normalize_uid_root
        from sr_writer.outputs import write_dataset

        header = _first_readable_header(paths)
        model = self._loaded_model()
        algorithm = AlgorithmIdentification(
            name="cacs-node", version=scoring.__version__, model_version=_version_of(model),
            model_caution=getattr(model, "caution", None),
        )
        uid_root = self.settings.node.uid_root
        notice = build_notice_image(
            header, reason, received_instances=len(paths), algorithm=algorithm, uid_root=uid_root,
            device_serial_number=normalize_uid_root(uid_root).rstrip("."),
        )
        path = write_dataset(notice, out_dir)
        return WrittenOutput(kind=NOTICE, path=path, sop_instance_uid=str(notice.SOPInstanceUID))

    def send(self, files: Sequence[Path], destination: Destination, stop_event: threading.Event) -> Any:
        from node.scu import send_with_retries

        return send_with_retries(
            list(files),
            destination,
            calling_ae_title=self.settings.node.ae_title,
            node_section=self.settings.node,
            stop_event=stop_event,
        )


def _first_readable_header(paths: Sequence[Path]) -> Dataset:
    """Return the header (no pixel data) of the first file with SOP Class, SOP Instance and Study UIDs.

    Raises:
        ValueError: no file has them.
    """
    from pydicom import dcmread

    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - pydicom raises several types for damaged files; the next file may do
            continue
        if all(header.get(keyword) for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")):
            return header
    raise ValueError(f"none of the {len(paths)} instance file(s) has a readable header with SOP and study UIDs")


def describe_instances(paths: Sequence[Path]) -> str:
    """Summarise what the instance files are, for example "the series has 3 localizer image(s) (ImageType LOCALIZER)"."""
    from pydicom import dcmread
    from pydicom.uid import UID

    counts: Counter[str] = Counter()
    for path in paths:
        try:
            dataset = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "ImageType"])
        except Exception as error:
            # pydicom raises several exception types for damaged files; the loader reports the file itself.
            counts[f"unreadable file(s) ({type(error).__name__})"] += 1
            continue
        image_type = [str(value).upper() for value in (dataset.get("ImageType") or [])]
        sop_class = str(dataset.get("SOPClassUID", "") or "")
        if "LOCALIZER" in image_type:
            counts["localizer image(s) (ImageType LOCALIZER), which are not scored"] += 1
        elif sop_class:
            counts[f"{UID(sop_class).name} instance(s)"] += 1
        else:
            counts["instance(s) without SOP Class UID"] += 1
    found = ", ".join(f"{count} {kind}" for kind, count in counts.most_common()) or "no instances"
    return f"the series has {found}"


def _version_of(model: Any) -> str:
    for name in ("model_version", "version"):
        value = getattr(model, name, None)
        if value:
            return str(value)
    raise ValueError(
        f"the loaded model ({type(model).__name__}) has no model_version or version attribute; "
        "the node needs it to score a series at most once per model version"
    )


def outputs_of(derived: Any, out_dir: Path) -> list[WrittenOutput]:
    """List the files of `sr_writer.write_outputs`' DerivedObjects by output kind.

    DerivedObjects has one dataset (or None) per kind (seg, region_seg, sr,
    summary) and `paths`, the written files named `<SOPInstanceUID>.dcm`.

    Raises:
        FileNotFoundError: a dataset has no written file among `paths`.
    """
    paths = {Path(path).name: Path(path) for path in getattr(derived, "paths", ())}
    written: list[WrittenOutput] = []
    for kind in sorted(OUTPUT_KINDS):
        dataset = getattr(derived, kind, None)
        if dataset is None:
            continue
        uid = str(dataset.SOPInstanceUID)
        path = paths.get(f"{uid}.dcm", out_dir / f"{uid}.dcm")
        if not path.is_file():
            raise FileNotFoundError(f"write_outputs returned the {kind} {uid} but no file {path}")
        written.append(WrittenOutput(kind=kind, path=path, sop_instance_uid=uid))
    return written
