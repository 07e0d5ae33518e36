"""Tests of node.scu against a real pynetdicom Storage SCP on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.config import Destination, NodeSection
from node.scu import (
    SendReport,
    describe_status,
    echo,
    is_sent_status,
    send_files,
    send_with_retries,
)

SEG_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
COMPREHENSIVE_3D_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.34")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"

# Short timeouts keep failure paths quick; real settings use the node.toml defaults.
NODE_SECTION = NodeSection(acse_timeout_s=5.0, dimse_timeout_s=5.0, network_timeout_s=5.0)


@dataclass
class StorageSCP:
    """A pynetdicom Storage SCP that records what it receives.

    status_for: SOP Class UID -> status returned for it (default 0x0000).
    statuses_in_order: if not empty, statuses returned for successive
        C-STORE requests, whatever the SOP class (the last one repeats).
    """

    port: int = 0
    received: list[tuple[str, str, str, Dataset]] = field(default_factory=list)
    requested_contexts: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    status_for: dict[str, int] = field(default_factory=dict)
    error_comment: str = ""
    statuses_in_order: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: When set, each C-STORE handler blocks until this event is set (or 10 s pass).
    hold_responses: threading.Event | None = None

    def handle_store(self, event: evt.Event) -> Dataset | int:
        if self.hold_responses is not None:
            self.hold_responses.wait(10.0)
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        with self.lock:
            self.received.append(
                (
                    str(dataset.SOPClassUID),
                    str(dataset.SOPInstanceUID),
                    str(event.context.transfer_syntax),
                    dataset,
                )
            )
            if self.statuses_in_order:
                status = self.statuses_in_order.pop(0) if len(self.statuses_in_order) > 1 else self.statuses_in_order[0]
            else:
                status = self.status_for.get(str(dataset.SOPClassUID), 0x0000)
        response = Dataset()
        response.Status = status
        if self.error_comment and status != 0x0000:
            response.ErrorComment = self.error_comment
        return response

    def handle_requested(self, event: evt.Event) -> None:
        with self.lock:
            for context in event.assoc.requestor.requested_contexts:
                self.requested_contexts.append(
                    (str(context.abstract_syntax), tuple(str(ts) for ts in context.transfer_syntax))
                )


@pytest.fixture
def start_scp() -> Iterator[Callable[..., StorageSCP]]:
    """Start Storage SCPs on free ports; each stops when the test ends."""
    servers = []

    def start(
        *,
        sop_classes: tuple[UID, ...] = (SEG_STORAGE, COMPREHENSIVE_3D_SR_STORAGE, SECONDARY_CAPTURE_STORAGE),
        transfer_syntaxes: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        ae_title: str = "STORE_SCP",
        require_called_aet: bool = False,
    ) -> StorageSCP:
        scp = StorageSCP()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, list(transfer_syntaxes))
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, scp.handle_store),
            (evt.EVT_REQUESTED, scp.handle_requested),
        ]
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        scp.port = server.server_address[1]
        servers.append(server)
        return scp

    yield start
    for server in servers:
        server.shutdown()


def _destination(port: int, **overrides: object) -> Destination:
    values: dict[str, object] = {
        "name": "pacs",
        "ae_title": "STORE_SCP",
        "host": "127.0.0.1",
        "port": port,
        "max_attempts": 3,
        "retry_backoff_s": 0.01,
    }
    values.update(overrides)
    return Destination(**values)  # type: ignore[arg-type]


def _write_object(
    folder: Path,
    sop_class: UID,
    *,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    with_pixels: bool = False,
) -> tuple[Path, str]:
    """Write a small Part 10 file of `sop_class`; return its path and SOP Instance UID."""
    sop_instance = generate_uid()
    dataset = Dataset()
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = sop_instance
    dataset.StudyInstanceUID = STUDY_UID
    dataset.SeriesInstanceUID = SERIES_UID
    dataset.Modality = "OT"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_instance
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if with_pixels or transfer_syntax == RLELossless:
        pixels = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 7) % 4096
        dataset.Rows = 16
        dataset.Columns = 16
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated = 16
        dataset.BitsStored = 12
        dataset.HighBit = 11
        dataset.PixelRepresentation = 0
        dataset.PixelData = pixels.tobytes()
    if transfer_syntax == RLELossless:
        dataset.compress(RLELossless)
    elif transfer_syntax == ImplicitVRLittleEndian:
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = folder / f"{sop_instance}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path, sop_instance


def test_send_files_three_output_kinds_all_sent(tmp_path: Path, start_scp) -> None:
    scp = start_scp()
    files = [
        _write_object(tmp_path, SEG_STORAGE),
        _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE),
        _write_object(tmp_path, SECONDARY_CAPTURE_STORAGE),
    ]

    report = send_files(
        [path for path, _ in files],
        _destination(scp.port),
        calling_ae_title="CACS_NODE",
        node_section=NODE_SECTION,
    )

    assert report.all_sent
    assert report.association_error == ""
    assert report.failure_reason() == ""
    assert [result.sop_instance_uid for result in report.instances] == [uid for _, uid in files]
    assert [result.status for result in report.instances] == [0x0000, 0x0000, 0x0000]
    assert sorted(uid for _, uid, _, _ in scp.received) == sorted(uid for _, uid in files)
    # Every file is Explicit VR Little Endian; the SCP accepts it, so nothing is converted.
    assert {syntax for _, _, syntax, _ in scp.received} == {ExplicitVRLittleEndian}


def test_send_files_contexts_exactly_sop_classes_of_files(tmp_path: Path, start_scp) -> None:
    scp = start_scp()
    paths = [
        _write_object(tmp_path, SEG_STORAGE)[0],
        _write_object(tmp_path, SEG_STORAGE)[0],
        _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE, transfer_syntax=RLELossless)[0],
    ]

    send_files(paths, _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION)

    uncompressed = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
    # Two SEG files share one uncompressed context; the RLE file gets its own
    # context plus the uncompressed fallback for its SOP class.
    assert scp.requested_contexts == [
        (str(SEG_STORAGE), uncompressed),
        (str(COMPREHENSIVE_3D_SR_STORAGE), (str(RLELossless),)),
        (str(COMPREHENSIVE_3D_SR_STORAGE), uncompressed),
    ]


def test_send_files_warning_status_counts_as_sent(tmp_path: Path, start_scp) -> None:
    scp = start_scp()
    scp.status_for[str(SECONDARY_CAPTURE_STORAGE)] = 0xB000
    path, _ = _write_object(tmp_path, SECONDARY_CAPTURE_STORAGE)

    report = send_files([path], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION)

    assert report.all_sent
    assert report.instances[0].status == 0xB000


def test_send_files_failure_status_reports_status_and_comment(tmp_path: Path, start_scp) -> None:
    scp = start_scp()
    scp.status_for[str(SEG_STORAGE)] = 0xA900
    scp.error_comment = "SEG not wanted here"
    seg_path, seg_uid = _write_object(tmp_path, SEG_STORAGE)
    sr_path, _ = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)

    report = send_files(
        [seg_path, sr_path], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION
    )

    seg_result, sr_result = report.instances
    assert not report.all_sent
    assert sr_result.sent
    assert not seg_result.sent
    assert seg_result.status == 0xA900
    assert seg_result.error_comment == "SEG not wanted here"
    assert not seg_result.retryable
    assert seg_result.reason == (
        "refused with status 0xA900 (Error: Data Set does not match SOP Class), "
        "error comment 'SEG not wanted here'"
    )
    reason = report.failure_reason()
    assert reason.startswith("destination 'pacs' (STORE_SCP@127.0.0.1:")
    assert f"Segmentation Storage {seg_uid}: refused with status 0xA900" in reason
    assert "did not store 1 of 2 object(s)" in reason


def test_send_files_rejected_context_skips_only_that_sop_class(tmp_path: Path, start_scp) -> None:
    scp = start_scp(sop_classes=(COMPREHENSIVE_3D_SR_STORAGE, SECONDARY_CAPTURE_STORAGE))
    seg_path, _ = _write_object(tmp_path, SEG_STORAGE)
    sr_path, sr_uid = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)

    report = send_files(
        [seg_path, sr_path], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION
    )

    seg_result, sr_result = report.instances
    assert sr_result.sent
    assert not seg_result.sent
    assert seg_result.status is None
    assert "rejected every presentation context for Segmentation Storage" in seg_result.reason
    assert not seg_result.retryable
    # No C-STORE request was made for the SEG: only the SR reached the SCP.
    assert [uid for _, uid, _, _ in scp.received] == [sr_uid]


def test_send_files_compressed_file_uncompressed_destination_decompresses(
    tmp_path: Path, start_scp
) -> None:
    scp = start_scp(sop_classes=(SECONDARY_CAPTURE_STORAGE,))
    path, _ = _write_object(tmp_path, SECONDARY_CAPTURE_STORAGE, transfer_syntax=RLELossless, with_pixels=True)
    expected = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 7) % 4096

    report = send_files([path], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION)

    assert report.all_sent
    (_, _, syntax, dataset), = scp.received
    assert syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    # RLE Lossless is lossless, so the decoded pixels equal the ones written.
    np.testing.assert_array_equal(dataset.pixel_array, expected)


def test_send_files_implicit_only_destination_converts(tmp_path: Path, start_scp) -> None:
    scp = start_scp(sop_classes=(COMPREHENSIVE_3D_SR_STORAGE,), transfer_syntaxes=(ImplicitVRLittleEndian,))
    path, sop_instance = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)

    report = send_files([path], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION)

    assert report.all_sent
    # The file is Explicit VR Little Endian; pynetdicom re-encodes it in the
    # only accepted syntax, Implicit VR Little Endian.
    (_, received_uid, syntax, dataset), = scp.received
    assert received_uid == sop_instance
    assert syntax == ImplicitVRLittleEndian
    assert dataset.StudyInstanceUID == STUDY_UID


def test_send_files_compressed_file_accepted_keeps_syntax(tmp_path: Path, start_scp) -> None:
    scp = start_scp(
        sop_classes=(SECONDARY_CAPTURE_STORAGE,),
        transfer_syntaxes=(RLELossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian),
    )
    path, _ = _write_object(tmp_path, SECONDARY_CAPTURE_STORAGE, transfer_syntax=RLELossless, with_pixels=True)

    report = send_files([path], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION)

    assert report.all_sent
    assert [syntax for _, _, syntax, _ in scp.received] == [RLELossless]


def test_send_files_wrong_called_ae_reports_rejection(tmp_path: Path, start_scp) -> None:
    scp = start_scp(require_called_aet=True)
    path, _ = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)

    report = send_files(
        [path],
        _destination(scp.port, ae_title="NOT_THE_SCP"),
        calling_ae_title="CACS_NODE",
        node_section=NODE_SECTION,
    )

    assert not report.all_sent
    # PS3.8 Table 9-21: result 1 (rejected permanent), source 1 (service
    # user), reason 7 (called AE title not recognized).
    assert "Rejected Permanent, source 1 (Service User), reason 7 (Called AE title not recognised)" in (
        report.association_error
    )
    assert not report.instances[0].retryable
    assert scp.received == []


def test_send_files_no_accepted_context_not_retryable(tmp_path: Path, start_scp) -> None:
    scp = start_scp(sop_classes=(SECONDARY_CAPTURE_STORAGE,))
    path, _ = _write_object(tmp_path, SEG_STORAGE)

    report = send_files([path], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION)

    assert report.association_error.startswith(
        f"destination STORE_SCP@127.0.0.1:{scp.port} accepted none of the proposed "
        "presentation contexts (Segmentation Storage)"
    )
    assert not report.instances[0].retryable
    assert scp.received == []


def test_send_files_closed_port_reports_no_association(tmp_path: Path) -> None:
    path, _ = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)

    # A bound socket that does not listen makes the port refuse connections.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        closed_port = blocker.getsockname()[1]
        report = send_files(
            [path], _destination(closed_port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION
        )

    assert report.association_error.startswith(f"no association with STORE_SCP@127.0.0.1:{closed_port}")
    assert report.instances[0].retryable
    assert report.instances[0].status is None


def test_send_files_response_timeout_marks_rest_retryable(tmp_path: Path, start_scp) -> None:
    scp = start_scp()
    release = threading.Event()
    scp.hold_responses = release
    first, _ = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)
    second, _ = _write_object(tmp_path, SEG_STORAGE)
    impatient = NodeSection(acse_timeout_s=5.0, dimse_timeout_s=1.0, network_timeout_s=5.0)

    try:
        report = send_files(
            [first, second], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=impatient
        )
    finally:
        release.set()

    first_result, second_result = report.instances
    assert first_result.reason == "no C-STORE response: the DIMSE timeout expired or the association was aborted"
    assert first_result.status is None
    assert first_result.retryable
    # pynetdicom aborts the association after the DIMSE timeout, so the second file is not sent.
    assert second_result.reason.startswith("association with STORE_SCP@127.0.0.1:")
    assert second_result.reason.endswith("was aborted or timed out before this object was sent")
    assert second_result.retryable


def test_send_files_unresolvable_host_reports_retryable(tmp_path: Path) -> None:
    path, _ = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)

    # ".invalid" is reserved (RFC 2606), so it never resolves.
    report = send_files(
        [path], _destination(104, host="pacs.invalid"), calling_ae_title="CACS_NODE", node_section=NODE_SECTION
    )

    assert report.association_error.startswith(
        "no association with STORE_SCP@pacs.invalid:104: connecting to host 'pacs.invalid' failed"
    )
    assert report.instances[0].retryable
    assert not report.instances[0].sent


def test_send_files_missing_file_reported_others_sent(tmp_path: Path, start_scp) -> None:
    scp = start_scp()
    sr_path, _ = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)
    missing = tmp_path / "missing.dcm"

    report = send_files(
        [missing, sr_path], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION
    )

    missing_result, sr_result = report.instances
    assert sr_result.sent
    assert not missing_result.sent
    assert missing_result.reason == f"file {missing} not found; the output was not written or was removed"


def test_send_with_retries_out_of_resources_then_success_sends(tmp_path: Path, start_scp) -> None:
    scp = start_scp()
    # First C-STORE answered 0xA700 (retryable), every later one 0x0000.
    scp.statuses_in_order = [0xA700, 0x0000]
    paths = [_write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)[0], _write_object(tmp_path, SEG_STORAGE)[0]]

    report = send_with_retries(
        paths, _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION
    )

    assert report.all_sent
    assert report.attempts == 2
    # Attempt 1 sends both files (the first refused), attempt 2 re-sends only the refused one.
    assert len(scp.received) == 3
    assert [result.status for result in report.instances] == [0x0000, 0x0000]


def test_send_with_retries_permanent_refusal_not_retried(tmp_path: Path, start_scp) -> None:
    scp = start_scp()
    scp.status_for[str(SEG_STORAGE)] = 0xC000
    path, _ = _write_object(tmp_path, SEG_STORAGE)

    report = send_with_retries(
        [path], _destination(scp.port), calling_ae_title="CACS_NODE", node_section=NODE_SECTION
    )

    assert report.attempts == 1
    assert len(scp.received) == 1
    assert report.instances[0].status == 0xC000
    assert "after" not in report.failure_reason()


def test_send_with_retries_unreachable_uses_all_attempts_with_backoff(tmp_path: Path) -> None:
    path, _ = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)
    delays: list[float] = []

    class RecordingStop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            delays.append(float(timeout or 0.0))
            return False

    calls: list[int] = []

    def refuse(files, destination, *, calling_ae_title, node_section) -> SendReport:
        calls.append(len(files))
        return send_files(
            files, destination, calling_ae_title=calling_ae_title, node_section=node_section
        )

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        report = send_with_retries(
            [path],
            _destination(port, max_attempts=4, retry_backoff_s=2.0),
            calling_ae_title="CACS_NODE",
            node_section=NODE_SECTION,
            stop_event=RecordingStop(),
            send=refuse,
        )

    assert report.attempts == 4
    assert calls == [1, 1, 1, 1]
    # The backoff starts at retry_backoff_s and doubles after each failed attempt.
    assert delays == [2.0, 4.0, 8.0]
    assert "after 4 attempt(s)" in report.failure_reason()


def test_send_with_retries_stop_event_ends_retrying(tmp_path: Path) -> None:
    path, _ = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)
    stop = threading.Event()
    stop.set()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        report = send_with_retries(
            [path],
            _destination(port, max_attempts=5, retry_backoff_s=60.0),
            calling_ae_title="CACS_NODE",
            node_section=NODE_SECTION,
            stop_event=stop,
        )

    assert report.attempts == 1
    assert not report.all_sent


def test_send_with_retries_zero_attempts_raises(tmp_path: Path) -> None:
    path, _ = _write_object(tmp_path, COMPREHENSIVE_3D_SR_STORAGE)

    with pytest.raises(ValueError, match="has max_attempts = 0; expected 1 or more"):
        send_with_retries(
            [path], _destination(104, max_attempts=0), calling_ae_title="CACS_NODE", node_section=NODE_SECTION
        )


def test_echo_running_scp_succeeds(start_scp) -> None:
    scp = start_scp()

    result = echo("STORE_SCP", "127.0.0.1", scp.port, acse_timeout_s=5.0)

    assert result.success
    assert result.status == 0x0000
    assert result.message == f"C-ECHO to STORE_SCP@127.0.0.1:{scp.port} succeeded"


def test_echo_wrong_called_ae_fails_with_reason(start_scp) -> None:
    scp = start_scp(require_called_aet=True)

    result = echo("OTHER", "127.0.0.1", scp.port, acse_timeout_s=5.0)

    assert not result.success
    assert result.status is None
    assert "reason 7 (Called AE title not recognised)" in result.message
    assert result.message.endswith(
        "the destination does not answer to called AE title 'OTHER'; check its AE title in node.toml, "
        "then restart the node"
    )


@pytest.mark.parametrize(
    ("status", "sent", "text"),
    [
        (0x0000, True, "0x0000 (Success)"),
        (0xB000, True, "0xB000 (Warning: Coercion of Data Elements)"),
        (0xB123, True, "0xB123 (Warning)"),
        (0xA700, False, "0xA700 (Refused: Out of Resources)"),
        (0xA7FF, False, "0xA7FF (Refused: Out of Resources)"),
        (0xC211, False, "0xC211 (Error: Cannot understand)"),
        (0x0122, False, "0x0122 (SOP Class not supported)"),
        (0xFE00, False, "0xFE00 (not a C-STORE status defined in PS3.4)"),
    ],
)
def test_status_helpers_table_of_codes_match_ps34(status: int, sent: bool, text: str) -> None:
    assert is_sent_status(status) is sent
    assert describe_status(status) == text
