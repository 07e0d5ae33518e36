"""Helpers for the node tests: free ports, settings, a fast pipeline and a pynetdicom SCU."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from node.config import Destination, NodeSection, NodeSettings, Peer, ScoringSection, StorageSection
from node.pipeline import ScoredSeries, WrittenOutput
from scoring.result import ScoringResult
from scoring.volume import CTVolume

#: Calling AE title of the test scanner; listed as a peer on 127.0.0.1.
SCANNER_AE = "SCANNER"
NODE_AE = "CACS_NODE"

#: Verification SOP Class UID (PS3.4 Annex A).
VERIFICATION = "1.2.840.10008.1.1"
#: Basic Text SR Storage, the SOP class of the stand-in SR the fake pipeline writes.
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def dcmtk_tool(name: str) -> str:
    """Return the path of a DCMTK command-line tool, skipping the test when DCMTK is missing.

    pynetdicom installs apps with the same names (storescu, echoscu) that can
    come first on PATH, so /usr/bin is tried first and each candidate must
    report a DCMTK version.
    """
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if not candidate:
            continue
        version = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False)
        if "dcmtk" in version.stdout.lower():
            return candidate
    pytest.skip(f"DCMTK {name} not found; install the Debian package dcmtk (scripts/test.sh does)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_settings(storage_root: Path, **node_options: Any) -> NodeSettings:
    """Settings for a node on 127.0.0.1 with a 0.5 s quiet period and SCANNER as peer.

    node_options override `[node]` fields; `quiet_period_s`, `destinations`,
    `min_free_space_mb` and `peers` are taken out and applied to their sections.
    """
    quiet = node_options.pop("quiet_period_s", 0.5)
    destinations = node_options.pop("destinations", ())
    min_free = node_options.pop("min_free_space_mb", 0)
    peers = node_options.pop("peers", (Peer(SCANNER_AE, "127.0.0.1"),))
    node = NodeSection(ae_title=NODE_AE, bind_address="127.0.0.1", port=node_options.pop("port", free_port()),
                       acse_timeout_s=5.0, dimse_timeout_s=10.0, network_timeout_s=10.0)
    node = replace(node, **node_options)
    return NodeSettings(
        node=node,
        peers=tuple(peers),
        destinations=tuple(destinations),
        storage=StorageSection(root=storage_root, min_free_space_mb=min_free),
        scoring=ScoringSection(quiet_period_s=quiet, device="cpu"),
    )


@dataclass
class FakeSendResult:
    """Stands in for node.scu.InstanceSendResult."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    sent: bool
    status: int | None = 0
    error_comment: str = ""
    reason: str = ""
    retryable: bool = False


@dataclass
class FakeSendReport:
    """Stands in for node.scu.SendReport."""

    destination: str
    peer: str
    instances: tuple[FakeSendResult, ...]
    attempts: int = 1

    @property
    def all_sent(self) -> bool:
        return all(result.sent for result in self.instances)

    def failure_reason(self) -> str:
        failed = [result for result in self.instances if not result.sent]
        if not failed:
            return ""
        return f"destination {self.destination!r} refused " + "; ".join(
            f"{result.path.name}: status 0x{result.status:04X} {result.error_comment}" for result in failed
        )


@dataclass
class FakePipeline:
    """A pipeline that records its calls and scores a series as 10 Agatston per instance.

    refuse_with: exception raised by `score` (for refusal tests).
    refused_kinds: destination name → output kinds that destination refuses with 0xA900.
    score_delay_s: time `score` takes, to keep a job in scoring while a test acts.
    load_series: read the instances with the real series loader first, so
        that its refusals (a damaged instance) reach the worker.
    """

    refuse_with: Exception | None = None
    refused_kinds: dict[str, set[str]] = field(default_factory=dict)
    score_delay_s: float = 0.0
    load_series: bool = False
    scored: list[list[Path]] = field(default_factory=list)
    predecessors: list[Dataset | None] = field(default_factory=list)
    #: The reason passed to each `write_notice` call, and the error it raises (None: it writes).
    notices: list[str] = field(default_factory=list)
    notice_error: Exception | None = None
    #: (destination name, output kinds stored there) per send call.
    sent: list[tuple[str, list[str]]] = field(default_factory=list)
    kind_of: dict[Path, str] = field(default_factory=dict)
    started: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def model_version(self) -> str:
        return "fake-model-1"

    def score(self, paths: Sequence[Path]) -> ScoredSeries:
        self.started.set()
        if self.score_delay_s:
            time.sleep(self.score_delay_s)  # stands in for model run time, not a wait for a condition
        with self.lock:
            self.scored.append(sorted(Path(path) for path in paths))
        if self.refuse_with is not None:
            raise self.refuse_with
        if self.load_series:
            from scoring.series import load_series

            load_series([str(path) for path in paths])
        total = 10.0 * len(paths)
        scores = {"LAD": total, "LCX": 0.0, "RCA": 0.0, "total": total}
        result = ScoringResult(
            series_instance_uid="",
            normalization_factor=1.0,
            agatston=scores,
            volume_mm3=dict(scores),
            mass_mg=dict(scores),
            risk_category="II",
            cac_drs="A1/N1",
            lesions=(),
            mass_calibration_factor=0.743,
            mass_calibrated=False,
        )
        return ScoredSeries(
            volume=cast(CTVolume, None),
            labels=np.zeros((1, 1, 1), np.uint8),
            regions=None,
            result=result,
            model_version="fake-model-1",
        )

    def write(self, scored: ScoredSeries, out_dir: Path, predecessor: Dataset | None) -> list[WrittenOutput]:
        with self.lock:
            self.predecessors.append(predecessor)
        return [self._write_stand_in(kind, out_dir) for kind in ("seg", "sr")]

    def write_notice(self, paths: Sequence[Path], reason: str, out_dir: Path) -> WrittenOutput:
        with self.lock:
            self.notices.append(reason)
        if self.notice_error is not None:
            raise self.notice_error
        return self._write_stand_in("notice", out_dir)

    def _write_stand_in(self, kind: str, out_dir: Path) -> WrittenOutput:
        path, sop_instance_uid = write_stand_in(out_dir, BASIC_TEXT_SR)
        self.kind_of[path.resolve()] = kind
        return WrittenOutput(kind, path, sop_instance_uid)

    def send(self, files: Sequence[Path], destination: Destination, stop_event: threading.Event) -> FakeSendReport:
        refused = self.refused_kinds.get(destination.name, set())
        results = []
        sent_kinds = []
        for path in files:
            kind = self.kind_of[Path(path).resolve()]
            is_refused = kind in refused
            results.append(FakeSendResult(path, BASIC_TEXT_SR, path.stem, sent=not is_refused,
                                          status=0xA900 if is_refused else 0x0000,
                                          error_comment=f"{kind} not accepted" if is_refused else ""))
            if not is_refused:
                sent_kinds.append(kind)
        with self.lock:
            self.sent.append((destination.name, sent_kinds))
        return FakeSendReport(destination.name, f"{destination.ae_title}@{destination.host}:{destination.port}",
                              tuple(results))


def write_stand_in(folder: Path, sop_class: str, **attributes: Any) -> tuple[Path, str]:
    """Write a minimal DICOM file of `sop_class` with new UIDs into `folder`; return its path and SOPInstanceUID.

    attributes: further elements by keyword, e.g. PatientID="TEST"; Modality is "SR" unless given.
    """
    dataset = Dataset()
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "SR"
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path, str(dataset.SOPInstanceUID)


def associate(port: int, *, calling: str = SCANNER_AE, called: str = NODE_AE,
              contexts: Sequence[tuple[str, Sequence[str]]] = ()) -> tuple[AE, Association]:
    """Request an association with the node on 127.0.0.1; contexts default to CT Image Storage."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = 5
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    if contexts:
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, list(syntaxes))
    else:
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian])
        ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    return ae, assoc


def store_all(port: int, items: Sequence[Dataset | Path], **options: Any) -> list[int]:
    """Send datasets or files over one association and return each response status.

    A missing response (association dropped) is returned as -1.
    """
    ae, assoc = associate(port, **options)
    if not assoc.is_established:
        raise AssertionError(f"association with the node was not established: {assoc.acceptor.primitive}")
    statuses = []
    try:
        for item in items:
            response = assoc.send_c_store(item)
            statuses.append(int(response.Status) if "Status" in response else -1)
    finally:
        assoc.release()
        ae.shutdown()
    return statuses


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    """Poll `condition` every 20 ms until it is true; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s: {message}")


def write_untrained_model(path: Path) -> Path:
    """Write a checkpoint of an untrained multi-task U-Net, which loads like a trained one."""
    from scoring.checkpoint import Checkpoint, save_checkpoint
    from scoring.model import build_model

    network = build_model("mtl")
    save_checkpoint(path, Checkpoint(architecture="mtl", state_dict=network.state_dict(),
                                     metadata={"model_name": "untrained-test"}))
    return path


def untrained_model_version(path: Path) -> str:
    """The version the node reports for a model from `write_untrained_model`: "untrained-test-<hash>"."""
    from scoring.inference import load_model

    version = load_model(path, "cpu").model_version
    assert version.startswith("untrained-test-")
    return version


@contextlib.contextmanager
def held_storage_root(root: Path) -> Iterator[None]:
    """Hold the node lock on `root`, as a running `cacs-node serve` does."""
    from node.storage import NodeLock

    lock = NodeLock(root)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
