"""Tests of node.folder_scp, the folder-writing Storage SCP used by the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from node.config import Destination, NodeSection
from node.folder_scp import FolderStorageSCP
from node.scu import send_files
from tests.node.helpers import write_stand_in

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


def test_folder_scp_stores_file_named_by_uid(tmp_path: Path) -> None:
    path, sop_instance = write_stand_in(tmp_path, SR_STORAGE)

    with FolderStorageSCP(tmp_path / "received", ae_title="RESULTS") as scp:
        report = send_files(
            [path],
            Destination(name="results", ae_title="RESULTS", host="127.0.0.1", port=scp.port),
            calling_ae_title="CACS_NODE",
            node_section=NodeSection(),
        )
        received = scp.received

    assert report.all_sent
    assert [(item.sop_class_uid, item.sop_instance_uid) for item in received] == [(SR_STORAGE, sop_instance)]
    stored = tmp_path / "received" / f"{sop_instance}.dcm"
    assert received[0].path == stored
    assert dcmread(stored).SOPInstanceUID == sop_instance
    assert list((tmp_path / "received").glob("*.part")) == []


def test_folder_scp_rejected_sop_class_not_stored(tmp_path: Path) -> None:
    seg_path, _ = write_stand_in(tmp_path, SEG_STORAGE)
    sr_path, sr_instance = write_stand_in(tmp_path, SR_STORAGE)

    with FolderStorageSCP(tmp_path / "received", rejected_sop_classes=frozenset({SEG_STORAGE})) as scp:
        report = send_files(
            [seg_path, sr_path],
            Destination(name="results", ae_title="RESULTS", host="127.0.0.1", port=scp.port),
            calling_ae_title="CACS_NODE",
            node_section=NodeSection(),
        )
        received = scp.received

    assert [result.sent for result in report.instances] == [False, True]
    assert [item.sop_instance_uid for item in received] == [sr_instance]


def test_folder_scp_port_before_start_raises(tmp_path: Path) -> None:
    scp = FolderStorageSCP(tmp_path)

    with pytest.raises(RuntimeError, match="not started; call start"):
        _ = scp.port
