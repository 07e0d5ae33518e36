"""Tests of node.storage: UID path cleaning, root confinement, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.storage import TEMPORARY_PREFIX, InstanceStore, StorageError, clean_path_part, is_valid_uid


def test_clean_path_part_separators_replaced() -> None:
    assert clean_path_part("1.2/../3") == "1.2_.._3"
    assert clean_path_part("1.2.840.10008") == "1.2.840.10008"


@pytest.mark.parametrize("value", ["", "..", ".", "  "])
def test_clean_path_part_dot_names_rejected(value: str) -> None:
    with pytest.raises(StorageError, match="cannot be used as a file or folder name"):
        clean_path_part(value)


def test_is_valid_uid_examples() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2")
    assert not is_valid_uid("1.2..3")
    assert not is_valid_uid("1.2.3a")
    # 65 characters: one more than PS3.5 allows.
    assert not is_valid_uid("1." + "2" * 63)


def test_instance_path_stays_under_root(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "root", 0)
    store.create_layout()

    path = store.instance_path("1.2", "1.2.3", "1.2.3.4")

    assert path == (tmp_path / "root" / "incoming" / "1.2" / "1.2.3" / "1.2.3.4.dcm").resolve()
    with pytest.raises(StorageError, match="outside the storage root"):
        store.checked(tmp_path / "root" / ".." / "elsewhere.dcm")


def test_instance_path_symlink_out_of_root_rejected(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "root", 0)
    store.create_layout()
    (store.incoming / "1.2").symlink_to(tmp_path)

    with pytest.raises(StorageError, match="outside the storage root"):
        store.instance_path("1.2", "1.2.3", "1.2.3.4")


def test_removed_path_differs_per_content(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "root", 1)
    first = store.removed_path("1.2.3", "1.2.3.4", "a" * 64)
    second = store.removed_path("1.2.3", "1.2.3.4", "b" * 64)

    # Two copies of one instance set aside one after the other are both kept.
    assert first == store.root / "removed" / "1.2.3" / f"1.2.3.4.{'a' * 16}.dcm"
    assert second == store.root / "removed" / "1.2.3" / f"1.2.3.4.{'b' * 16}.dcm"


def test_write_atomically_leaves_only_final_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, 0)
    store.create_layout()
    target = store.incoming / "a" / "b.dcm"

    store.write_atomically(target, b"x" * 1000)

    assert target.read_bytes() == b"x" * 1000
    assert [path.name for path in target.parent.iterdir()] == ["b.dcm"]


def test_remove_stale_temporaries_counts_deleted(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, 0)
    store.create_layout()
    (store.incoming / f"{TEMPORARY_PREFIX}abc.tmp").write_bytes(b"partial")
    (store.incoming / "kept.dcm").write_bytes(b"complete")

    assert store.remove_stale_temporaries() == 1
    assert [path.name for path in store.incoming.iterdir()] == ["kept.dcm"]


def test_has_free_space_huge_minimum_false(tmp_path: Path) -> None:
    # 2**40 MiB is one exbibyte, more than any test machine has free.
    assert not InstanceStore(tmp_path, 2**40).has_free_space()
    assert InstanceStore(tmp_path, 0).has_free_space()


def test_node_lock_excludes_second_node(tmp_path: Path) -> None:
    import os

    from node.storage import NodeLock, StorageError

    assert NodeLock.holder(tmp_path) is None
    first = NodeLock(tmp_path)
    first.acquire()
    try:
        assert NodeLock.holder(tmp_path) == os.getpid()
        with pytest.raises(StorageError, match=rf"another cacs-node serve \(process {os.getpid()}\) uses the "
                                               rf"storage root {tmp_path}; stop it"):
            NodeLock(tmp_path).acquire()
    finally:
        first.release()
    # The file stays, but no process has it locked.
    assert (tmp_path / "node.lock").read_text() == f"{os.getpid()}\n"
    assert NodeLock.holder(tmp_path) is None
    second = NodeLock(tmp_path)
    second.acquire()
    second.release()


def test_serve_locked_root_exits_early(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import node.pipeline
    from node.cli import main
    from tests.node.helpers import held_storage_root

    def fail_if_called(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(node.pipeline.ScoringPipeline, "check_model", fail_if_called)
    root = tmp_path / "storage"
    root.mkdir()
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nbind_address = "127.0.0.1"\nport = 21999\n[storage]\nroot = "{root}"\n', encoding="utf-8")
    with held_storage_root(root):
        assert main(["serve", "--config", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"cacs-node serve: not starting: another cacs-node serve (process {os.getpid()}) uses the storage "
        f"root {root}; stop it, or give this node its own [storage] root\n"
    )
