"""Write all derived objects of one scored series: calcium SEG, region SEG, SR and summary image."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from scoring.config import ScoringParameters
from scoring.fileio import atomic_writer
from scoring.result import ScoringResult
from scoring.volume import CTVolume
from sr_writer.identity import AlgorithmIdentification, normalize_uid_root
from sr_writer.seg import build_region_seg, build_seg
from sr_writer.sr import build_sr
from sr_writer.summary import build_summary_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DerivedObjects:
    """The datasets written for one scored series and their file paths.

    seg: calcium SEG, None when no artery has calcium.
    region_seg: coronary artery region SEG, None when no regions were given
        or they hold no artery region.
    sr: TID 1500 Comprehensive 3D SR.
    summary: RGB Secondary Capture.
    paths: written files, in the order seg, region_seg, sr, summary (absent
        objects skipped). Each is `<SOPInstanceUID>.dcm` in the output folder.
    """

    seg: Dataset | None
    region_seg: Dataset | None
    sr: Dataset
    summary: Dataset
    paths: tuple[Path, ...]

    @property
    def seg_frame_count(self) -> int:
        """Number of frames of the calcium SEG, 0 without one."""
        return int(self.seg.NumberOfFrames) if self.seg is not None else 0


def write_outputs(
    volume: CTVolume,
    labels: np.ndarray,
    result: ScoringResult,
    out_dir: str | os.PathLike[str],
    *,
    algorithm: AlgorithmIdentification,
    uid_root: str,
    regions: np.ndarray | None = None,
    predecessor: Dataset | None = None,
    device_serial_number: str | None = None,
    parameters: ScoringParameters | None = None,
) -> DerivedObjects:
    """Build the SEG(s), SR and summary image of a scoring result and write them as files.

    Each object goes to `out_dir/<SOPInstanceUID>.dcm` through a temporary
    file that is fsynced and renamed, so a reader never sees a partial file.

    Args:
        volume: the scored CT series.
        labels: uint8 CAC label volume of `volume.shape` (0 background,
            1 LAD incl. LM, 2 LCX, 3 RCA, 4 other calcium, never written).
        result: scoring result of `volume` and `labels`.
        out_dir: output folder, created when missing.
        algorithm: software name, version and model version.
        uid_root: the node's UID root; every new UID starts with it.
        regions: uint8 coronary artery region map (0 OTHER_CAR, 1 LAD, 2 LCX,
            3 RCA) for the optional second SEG.
        predecessor: SR of an earlier scoring of the same series, named in
            the new SR's Predecessor Documents Sequence.
        device_serial_number: Device Serial Number written into the objects;
            defaults to the UID root, which identifies the installation.
        parameters: the scoring parameters of `result` (default
            ScoringParameters()). The SEG and the summary overlay show the
            voxels they scored, so pass the parameters the node scored with.

    Returns:
        The datasets and the paths written.

    Raises:
        LabelError: `labels` or `regions` does not match the volume.
        ValueError: invalid `uid_root`, a result that disagrees with the
            labels or parameters, or a predecessor from another study.
        OSError: the output folder cannot be written.
    """
    serial = device_serial_number or normalize_uid_root(uid_root).rstrip(".")
    common = {"algorithm": algorithm, "uid_root": uid_root, "device_serial_number": serial}

    seg = build_seg(volume, labels, result, parameters=parameters, **common)
    region_seg = build_region_seg(volume, regions, **common) if regions is not None else None
    sr = build_sr(volume, result, seg, predecessor=predecessor, **common)
    summary = build_summary_image(volume, labels, result, parameters=parameters, **common)

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = tuple(
        write_dataset(dataset, folder) for dataset in (seg, region_seg, sr, summary) if dataset is not None
    )
    logger.info(
        "wrote %d object(s) for series %s to %s: SEG %s (%d frame(s)), SR %s, summary %s",
        len(paths),
        volume.series_instance_uid,
        folder,
        seg.SOPInstanceUID if seg is not None else "none (no calcium)",
        int(seg.NumberOfFrames) if seg is not None else 0,
        sr.SOPInstanceUID,
        summary.SOPInstanceUID,
    )
    return DerivedObjects(seg=seg, region_seg=region_seg, sr=sr, summary=summary, paths=paths)


def write_dataset(dataset: Dataset, folder: Path) -> Path:
    """Write `dataset` as `folder/<SOPInstanceUID>.dcm` via a temporary file, fsync and rename."""
    uid = str(dataset.SOPInstanceUID)
    if not uid or not all(character.isdigit() or character == "." for character in uid):
        raise ValueError(f"SOP Instance UID {uid!r} is not a valid UID; refusing to use it as a file name")
    target = folder / f"{uid}.dcm"
    with atomic_writer(target) as stream:
        dataset.save_as(stream, enforce_file_format=True)
    return target
