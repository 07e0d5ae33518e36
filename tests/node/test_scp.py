"""Tests of node.scp over real sockets on 127.0.0.1: association checks and C-STORE statuses."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom._config
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless
from pynetdicom import AE
from pynetdicom.association import Association

from node.config import Peer
from node.jobs import REFUSED
from node.server import NodeServer
from tests.factories import make_ct_datasets, make_series_dir
from tests.node.helpers import (
    NODE_AE,
    SCANNER_AE,
    FakePipeline,
    associate,
    dcmtk_tool,
    make_settings,
    store_all,
    wait_for,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeServer]:
    server = NodeServer(make_settings(tmp_path / "storage", max_associations=2), pipeline=FakePipeline())
    server.start()
    yield server
    server.stop()


def _rejection(port: int, **options: str) -> tuple[int, int, int]:
    ae, assoc = associate(port, **options)
    try:
        assert assoc.is_rejected, "association was not rejected"
        primitive = assoc.acceptor.primitive
        return int(primitive.result), int(primitive.result_source), int(primitive.diagnostic)
    finally:
        ae.shutdown()


def _encoded_dataset(dataset: pydicom.Dataset) -> bytes:
    """Encode a dataset in Explicit VR Little Endian without preamble and file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _raw_file(path: Path, sop_class_in_meta: str, sop_instance: str, body: bytes) -> Path:
    """Write a Part 10 file whose meta names `sop_class_in_meta`, followed by `body` as the dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_in_meta
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    stream = BytesIO()
    stream.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(stream, meta, enforce_standard=True)
    path.write_bytes(stream.getvalue() + body)
    return path


def test_echoscu_node_returns_success(node: NodeServer) -> None:
    completed = subprocess.run(
        [dcmtk_tool("echoscu"), "-aet", SCANNER_AE, "-aec", NODE_AE, "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=30,
    )
    # echoscu exits 0 only when the C-ECHO response status is 0x0000.
    assert completed.returncode == 0, completed.stderr


def test_associate_unknown_calling_ae_rejected_1_1_3(node: NodeServer) -> None:
    assert _rejection(node.port, calling="INTRUDER") == (1, 1, 3)


def test_associate_calling_ae_case_differs_rejected_1_1_3(node: NodeServer) -> None:
    assert _rejection(node.port, calling="scanner") == (1, 1, 3)


def test_associate_wrong_called_ae_rejected_1_1_7(node: NodeServer) -> None:
    assert _rejection(node.port, called="OTHER_NODE") == (1, 1, 7)


def test_associate_called_ae_case_differs_rejected_1_1_7(node: NodeServer) -> None:
    assert _rejection(node.port, called="cacs_node") == (1, 1, 7)


def test_associate_over_limit_rejected_2_3_2(node: NodeServer) -> None:
    # The fixture allows 2 associations: the third is one over the limit.
    held = [associate(node.port) for _ in range(2)]
    try:
        assert all(assoc.is_established for _ae, assoc in held)
        assert _rejection(node.port) == (2, 3, 2)
    finally:
        for ae, assoc in held:
            assoc.release()
            ae.shutdown()


def test_associate_contexts_negotiated_per_syntax(node: NodeServer) -> None:
    contexts = [
        (CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]),
        (CT_IMAGE_STORAGE, [RLELossless]),
        (CT_IMAGE_STORAGE, [JPEGBaseline8Bit]),
        (MR_IMAGE_STORAGE, [ExplicitVRLittleEndian]),
    ]
    ae, assoc = associate(node.port, contexts=contexts)
    try:
        assert assoc.is_established
        accepted = sorted(str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts)
        results = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx.result for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
        ae.shutdown()

    # The same SOP class in two contexts with lossless syntaxes: both accepted.
    assert accepted == sorted([ExplicitVRLittleEndian, RLELossless])
    # PS3.8 Table 9-18: 4 = transfer syntaxes not supported, 3 = abstract syntax not supported.
    assert results[(CT_IMAGE_STORAGE, JPEGBaseline8Bit)] == 4
    assert results[(MR_IMAGE_STORAGE, ExplicitVRLittleEndian)] == 3


def test_storescu_series_stored_byte_identical(node: NodeServer, tmp_path: Path) -> None:
    datasets = make_series_dir(tmp_path / "series", uid_seed="storescu")
    files = sorted((tmp_path / "series").glob("*.dcm"))

    completed = subprocess.run(
        [dcmtk_tool("storescu"), "-aet", SCANNER_AE, "-aec", NODE_AE, "127.0.0.1", str(node.port), *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )

    assert completed.returncode == 0, completed.stderr
    assert node.jobs is not None
    stored = node.jobs.series_instances(str(datasets[0].SeriesInstanceUID))
    assert len(stored) == 5
    for record in stored:
        original = pydicom.dcmread(tmp_path / "series" / f"{record.sop_instance_uid}.dcm")
        copy = pydicom.dcmread(node.store.absolute(record.path))
        # Pixel data is stored as received, never decoded and re-encoded.
        assert copy.PixelData == original.PixelData
        assert copy.SeriesInstanceUID == original.SeriesInstanceUID


def _abdomen_with_uids(source: Path, target: Path) -> list[str]:
    """Copy the JPEG 2000 abdominal slices, which lack UIDs, with fixed test UIDs; return their SOP Instance UIDs."""
    target.mkdir()
    uids = []
    for index, path in enumerate(sorted(source.iterdir()), start=1):
        dataset = pydicom.dcmread(path)
        dataset.SOPClassUID = CT_IMAGE_STORAGE
        dataset.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.7701"
        dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7701.1"
        dataset.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7701.1.{index}"
        dataset.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.save_as(target / f"{index:03d}.dcm", enforce_file_format=True)
        uids.append(str(dataset.SOPInstanceUID))
    return uids


def test_storescu_jpeg2000_series_stored_compressed(node: NodeServer, tmp_path: Path, abdomen_dicom_dir: Path) -> None:
    uids = _abdomen_with_uids(abdomen_dicom_dir, tmp_path / "abdomen")

    # -xv: propose JPEG 2000 lossless only, so the files go out as they are.
    completed = subprocess.run(
        [dcmtk_tool("storescu"), "-xv", "-aet", SCANNER_AE, "-aec", NODE_AE, "127.0.0.1", str(node.port),
         *sorted(map(str, (tmp_path / "abdomen").iterdir()))],
        capture_output=True, text=True, timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    assert node.jobs is not None
    records = node.jobs.series_instances("1.2.826.0.1.3680043.8.498.7701.1")
    assert sorted(record.sop_instance_uid for record in records) == sorted(uids)
    assert {record.transfer_syntax_uid for record in records} == {"1.2.840.10008.1.2.4.90"}
    first = pydicom.dcmread(node.store.absolute(records[0].path))
    # The stored copy decodes: pixel data arrived intact.
    assert first.pixel_array.shape == (first.Rows, first.Columns)


def test_store_rle_instance_kept_compressed(node: NodeServer) -> None:
    datasets = make_ct_datasets(transfer_syntax=RLELossless, uid_seed="rle")

    statuses = store_all(node.port, datasets[:1], contexts=[(CT_IMAGE_STORAGE, [RLELossless])])

    assert statuses == [0x0000]
    assert node.jobs is not None
    record = node.jobs.find_instance(str(datasets[0].SOPInstanceUID))
    assert record is not None
    assert record.transfer_syntax_uid == RLELossless
    stored = pydicom.dcmread(node.store.absolute(record.path))
    assert stored.PixelData == datasets[0].PixelData


def test_store_sop_class_mismatch_returns_a900(
    node: NodeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The request (taken from the file meta) names CT Image Storage, the dataset Secondary Capture.
    dataset = make_ct_datasets(uid_seed="mismatch")[0]
    dataset.SOPClassUID = SECONDARY_CAPTURE
    path = _raw_file(tmp_path / "mismatch.dcm", CT_IMAGE_STORAGE, str(dataset.SOPInstanceUID), _encoded_dataset(dataset))
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)

    with caplog.at_level("ERROR", logger="node.scp"):
        assert store_all(node.port, [path]) == [0xA900]
    assert f"dataset SOP Class UID '{SECONDARY_CAPTURE}', request '{CT_IMAGE_STORAGE}'" in caplog.text


def test_store_truncated_dataset_returns_c210(node: NodeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (0008,0016) UI declaring 32767 bytes with only 3 present.
    path = _raw_file(tmp_path / "truncated.dcm", CT_IMAGE_STORAGE, "1.2.3.4", b"\x08\x00\x16\x00UI\xff\x7f1.2")
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)

    assert store_all(node.port, [path]) == [0xC210]


def test_store_garbage_bytes_returns_c210(node: NodeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _raw_file(tmp_path / "garbage.dcm", CT_IMAGE_STORAGE, "1.2.3.5", b"not a dataset at all, just text")
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)

    assert store_all(node.port, [path]) == [0xC210]


def test_store_below_free_space_returns_a700(tmp_path: Path) -> None:
    # 2**40 MiB (one exbibyte) of required free space cannot be met.
    server = NodeServer(make_settings(tmp_path / "storage", min_free_space_mb=2**40), pipeline=FakePipeline())
    server.start()
    try:
        statuses = store_all(server.port, make_ct_datasets(uid_seed="full")[:2])
        assert server.jobs is not None
        assert server.jobs.pending_series_count() == 0
    finally:
        server.stop()
    assert statuses == [0xA700, 0xA700]
    assert list((tmp_path / "storage" / "incoming").iterdir()) == []


def test_store_identical_resend_ignored(node: NodeServer) -> None:
    datasets = make_ct_datasets(uid_seed="resend")

    first = store_all(node.port, datasets)
    second = store_all(node.port, datasets)

    assert first == [0x0000] * 5
    assert second == [0x0000] * 5
    assert node.jobs is not None
    assert len(node.jobs.series_instances(str(datasets[0].SeriesInstanceUID))) == 5
    assert node.jobs.series_conflict(str(datasets[0].SeriesInstanceUID)) == ""
    assert list((node.store.conflicts).iterdir()) == []


def test_store_changed_resend_marks_conflict(node: NodeServer) -> None:
    datasets = make_ct_datasets(uid_seed="conflict")
    changed = make_ct_datasets(uid_seed="conflict")
    changed[2].WindowCenter = 400

    assert store_all(node.port, datasets) == [0x0000] * 5
    assert store_all(node.port, changed[2:3]) == [0x0000]

    assert node.wait_idle(20)
    assert node.jobs is not None
    series_uid = str(datasets[0].SeriesInstanceUID)
    jobs = node.jobs.jobs_of_series(series_uid)
    assert [job.state for job in jobs] == [REFUSED]
    assert "conflicting instances: 1 SOP instance(s)" in jobs[0].reason
    assert str(datasets[2].SOPInstanceUID) in jobs[0].reason
    assert f"cacs-node retry {jobs[0].id} --keep-stored" in jobs[0].reason
    assert len(node.jobs.conflicts_of_series(series_uid)) == 1
    # The fake pipeline was never asked to score the conflicting series.
    assert node.pipeline.scored == []  # type: ignore[attr-defined]


def test_store_series_completes_after_quiet_period(node: NodeServer) -> None:
    datasets = make_ct_datasets(uid_seed="quiet")
    store_all(node.port, datasets)

    assert node.jobs is not None
    wait_for(lambda: node.jobs.pending_series_count() == 0, 10, "series not completed after the quiet period")
    assert len(node.jobs.jobs_of_series(str(datasets[0].SeriesInstanceUID))) == 1


def _node_with(tmp_path: Path, **options: object) -> NodeServer:
    server = NodeServer(make_settings(tmp_path / "storage", **options), pipeline=FakePipeline())
    server.start()
    return server


def test_associate_known_ae_other_host_rejected_1_1_3(tmp_path: Path) -> None:
    # SCANNER is allowed only from 192.0.2.10 (a documentation address), the test connects from 127.0.0.1.
    server = _node_with(tmp_path, peers=(Peer(SCANNER_AE, "192.0.2.10"),))
    try:
        assert _rejection(server.port) == (1, 1, 3)
    finally:
        server.stop()


def test_associate_peer_host_name_resolved_accepted(tmp_path: Path) -> None:
    server = _node_with(tmp_path, peers=(Peer(SCANNER_AE, "localhost"),))
    try:
        ae, assoc = associate(server.port)
        established = assoc.is_established
        if established:
            assoc.release()
        ae.shutdown()
    finally:
        server.stop()
    assert established


def test_associate_unknown_peer_accepted_when_allowed(tmp_path: Path) -> None:
    server = _node_with(tmp_path, peers=(), accept_unknown_peers=True)
    try:
        statuses = store_all(server.port, make_ct_datasets(uid_seed="any-peer")[:1], calling="ANY_SCANNER")
    finally:
        server.stop()
    assert statuses == [0x0000]


def test_associate_enhanced_ct_and_verification_accepted(node: NodeServer) -> None:
    contexts = [
        ("1.2.840.10008.5.1.4.1.1.2.1", [ExplicitVRLittleEndian]),  # Enhanced CT Image Storage
        ("1.2.840.10008.1.1", ["1.2.840.10008.1.2"]),  # Verification, Implicit VR Little Endian
    ]
    ae, assoc = associate(node.port, contexts=contexts)
    try:
        accepted = sorted(str(cx.abstract_syntax) for cx in assoc.accepted_contexts)
        echo_status = int(assoc.send_c_echo().Status)
    finally:
        assoc.release()
        ae.shutdown()

    assert accepted == ["1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2.1"]
    assert echo_status == 0x0000


def test_store_resend_other_syntax_same_pixels_ignored(node: NodeServer) -> None:
    explicit = make_ct_datasets(uid_seed="syntax")[:1]
    rle = make_ct_datasets(uid_seed="syntax", transfer_syntax=RLELossless)[:1]

    assert store_all(node.port, explicit) == [0x0000]
    assert store_all(node.port, rle, contexts=[(CT_IMAGE_STORAGE, [RLELossless])]) == [0x0000]

    # Same elements and same decoded pixels: a duplicate, not a conflict.
    assert node.jobs is not None
    assert node.jobs.series_conflict(str(explicit[0].SeriesInstanceUID)) == ""
    assert node.jobs.find_instance(str(explicit[0].SOPInstanceUID)).transfer_syntax_uid == ExplicitVRLittleEndian


def test_store_missing_series_uid_returns_a900(node: NodeServer) -> None:
    dataset = make_ct_datasets(uid_seed="no-series")[0]
    del dataset.SeriesInstanceUID

    assert store_all(node.port, [dataset]) == [0xA900]


def test_store_invalid_uid_returns_c211(node: NodeServer) -> None:
    dataset = make_ct_datasets(uid_seed="bad-uid")[0]
    dataset.SeriesInstanceUID = "1.2.3/../../etc"

    assert store_all(node.port, [dataset]) == [0xC211]
    assert node.jobs is not None
    assert node.jobs.pending_series_count() == 0


def test_store_instance_uid_differs_from_request_returns_c211(
    node: NodeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = make_ct_datasets(uid_seed="other-instance")[0]
    # The file meta, and so the request, names another SOP Instance UID than the dataset.
    path = _raw_file(tmp_path / "other.dcm", CT_IMAGE_STORAGE, "1.2.826.0.1.3680043.8.498.999", _encoded_dataset(dataset))
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)

    with caplog.at_level("ERROR", logger="node.scp"):
        assert store_all(node.port, [path]) == [0xC211]
    assert f"dataset SOP Instance UID {dataset.SOPInstanceUID}, request 1.2.826.0.1.3680043.8.498.999" in caplog.text


def _associate_together(port: int, count: int) -> list[tuple[AE, Association]]:
    """Request `count` associations from SCANNER at the same moment, one thread each."""
    barrier = threading.Barrier(count)
    results: list[tuple[AE, Association]] = []
    lock = threading.Lock()

    def request() -> None:
        barrier.wait(timeout=10)
        pair = associate(port)
        with lock:
            results.append(pair)

    threads = [threading.Thread(target=request) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_associate_simultaneous_over_limit_rejects_only_extra(tmp_path: Path) -> None:
    server = NodeServer(make_settings(tmp_path / "storage", max_associations=3), pipeline=FakePipeline())
    server.start()
    try:
        pairs = _associate_together(server.port, 4)
        try:
            established = [assoc for _ae, assoc in pairs if assoc.is_established]
            rejected = [assoc for _ae, assoc in pairs if assoc.is_rejected]
            # max_associations = 3: three of the four simultaneous requests fit,
            # only the fourth is over the limit.
            assert (len(established), len(rejected)) == (3, 1)
            primitive = rejected[0].acceptor.primitive
            assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 2)
        finally:
            for ae, assoc in pairs:
                if assoc.is_established:
                    assoc.release()
                ae.shutdown()
    finally:
        server.stop()


# An exception in a pynetdicom thread (an A-ABORT sent on a connection that
# sent nothing) fails the test instead of only warning.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_associate_idle_connections_not_counted_peer_accepted(tmp_path: Path) -> None:
    server = NodeServer(make_settings(tmp_path / "storage", max_associations=2), pipeline=FakePipeline())
    server.start()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(5)]
    held: list[tuple[AE, Association]] = []
    try:
        # Five connections that never send an A-ASSOCIATE-RQ hold no slot, so
        # both of the max_associations = 2 slots are free for SCANNER.
        held = [associate(server.port) for _ in range(2)]
        assert [assoc.is_established for _ae, assoc in held] == [True, True]
        assert server.scp is not None and server.scp.accepted_association_count() == 2
    finally:
        for ae, assoc in held:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        # The idle connections are still open when the node stops.
        server.stop()
        for connection in idle:
            connection.close()


def test_associate_unknown_peer_at_limit_rejected_1_1_3(node: NodeServer) -> None:
    held = [associate(node.port) for _ in range(2)]
    try:
        # The peer check comes before the limit check: an unknown caller is told
        # it is unknown (1, 1, 3), not that the node is busy (2, 3, 2).
        assert _rejection(node.port, calling="INTRUDER") == (1, 1, 3)
        assert _rejection(node.port) == (2, 3, 2)
    finally:
        for ae, assoc in held:
            assoc.release()
            ae.shutdown()


def test_associate_unknown_peer_flood_peer_echo_succeeds(node: NodeServer) -> None:
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            ae, assoc = associate(node.port, calling="INTRUDER")
            ae.shutdown()

    flooders = [threading.Thread(target=flood) for _ in range(4)]
    for thread in flooders:
        thread.start()
    statuses = []
    try:
        for _ in range(10):
            ae, assoc = associate(node.port)
            try:
                statuses.append(int(assoc.send_c_echo().Status) if assoc.is_established else -1)
                if assoc.is_established:
                    assoc.release()
            finally:
                ae.shutdown()
    finally:
        stop.set()
        for thread in flooders:
            thread.join(timeout=30)
    # Rejected unknown callers never hold a slot: every C-ECHO of SCANNER gets 0x0000.
    assert statuses == [0x0000] * 10


def test_associate_idle_connection_closed_after_identify_timeout(tmp_path: Path) -> None:
    server = NodeServer(make_settings(tmp_path / "storage", acse_timeout_s=60.0), pipeline=FakePipeline())
    server.start()
    try:
        assert server.scp is not None
        server.scp.identify_timeout_s = 0.5
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as connection:
            # recv returns b"" once the node closes the connection that sent nothing.
            assert connection.recv(1) == b""
        # Closed after about 0.5 s, far sooner than acse_timeout_s = 60.
        assert time.monotonic() - started < 10
    finally:
        server.stop()


def test_store_short_pixel_data_returns_c210_then_full_stored(node: NodeServer) -> None:
    datasets = make_ct_datasets(uid_seed="short-pixels")
    full = datasets[0]
    cut = make_ct_datasets(uid_seed="short-pixels")[0]
    # 32 x 32 pixels of 16 bits are 2048 bytes; the cut copy keeps 2048 - 200 = 1848.
    cut.PixelData = full.PixelData[:-200]

    statuses = store_all(node.port, [cut, full])

    assert statuses == [0xC210, 0x0000]
    assert node.jobs is not None
    record = node.jobs.find_instance(str(full.SOPInstanceUID))
    assert record is not None
    # The complete copy is the first one stored, so the series has no conflict.
    assert node.jobs.series_conflict(str(full.SeriesInstanceUID)) == ""
    assert pydicom.dcmread(node.store.absolute(record.path)).PixelData == full.PixelData


def test_store_broken_rle_fragment_returns_c210(node: NodeServer) -> None:
    dataset = make_ct_datasets(transfer_syntax=RLELossless, uid_seed="rle-broken")[0]
    # Keep the Basic Offset Table item and the first 8 bytes of the fragment's
    # item header, then declare 4 more bytes than follow.
    data = bytes(dataset.PixelData)
    table_length = int.from_bytes(data[4:8], "little")
    fragment = 8 + table_length
    declared = int.from_bytes(data[fragment + 4 : fragment + 8], "little")
    dataset.PixelData = data[: fragment + 4] + (declared + 4).to_bytes(4, "little") + data[fragment + 8 :]

    statuses = store_all(node.port, [dataset], contexts=[(CT_IMAGE_STORAGE, [RLELossless])])

    assert statuses == [0xC210]


def test_second_node_same_root_rejected(tmp_path: Path) -> None:
    import os

    from node.storage import StorageError

    first = NodeServer(make_settings(tmp_path / "storage"), pipeline=FakePipeline())
    first.start()
    try:
        second = NodeServer(make_settings(tmp_path / "storage"), pipeline=FakePipeline())
        with pytest.raises(StorageError, match=rf"another cacs-node serve \(process {os.getpid()}\) uses"):
            second.start()
        # The first node still receives.
        assert store_all(first.port, make_ct_datasets(uid_seed="locked")[:1]) == [0x0000]
    finally:
        first.stop()
    # Once the first node stopped, another one starts on the same root.
    third = NodeServer(make_settings(tmp_path / "storage"), pipeline=FakePipeline())
    third.start()
    third.stop()


def test_rejected_lossy_context_logged(node: NodeServer, caplog) -> None:
    from pydicom.uid import CTImageStorage

    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(CTImageStorage, [JPEGBaseline8Bit])
    with caplog.at_level("WARNING", logger="node.scp"):
        # With no context accepted, pynetdicom aborts the association itself.
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert not assoc.accepted_contexts
        wait_for(lambda: "rejected presentation context" in caplog.text, 5, "no log line for the rejected context")
    assert ("rejected presentation context(s) CT Image Storage with JPEG Baseline (Process 1): "
            "Transfer Syntax(es) Not Supported") in caplog.text
