"""Tests of node.config: the shipped node.toml, validation messages, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, NodeSettings, load_settings, parse_settings, settings_warnings
from tests.conftest import REPOSITORY_ROOT


def test_load_settings_shipped_file_matches_defaults() -> None:
    settings = load_settings(REPOSITORY_ROOT / "node.toml")
    defaults = NodeSettings()

    # The shipped file documents every key with its default value.
    assert settings.node == defaults.node
    assert settings.storage == defaults.storage
    assert settings.scoring == defaults.scoring
    assert [(peer.ae_title, peer.host) for peer in settings.peers] == [("SCANNER", "127.0.0.1")]
    assert settings.destinations[0].outputs == frozenset({"seg", "sr", "summary"})
    assert settings.destinations[0].retry_backoff_s == 10.0
    # Settings read from a file keep its path, so messages can name it. Settings built in code have none.
    assert settings.path == (REPOSITORY_ROOT / "node.toml").resolve()
    assert defaults.path is None


def test_parse_settings_many_problems_lists_all(tmp_path: Path) -> None:
    text = """
[node]
ae_title = "A_TITLE_OF_TWENTY_CH"
port = 0
max_pdu_size = 100
uid_root = "1.2.03."
colour = "red"
accept_unknown_peers = 1
[[peers]]
ae_title = "SCANNER"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "bad host!"
port = 4242
outputs = ["seg", "pdf"]
[scoring]
kvp_policy = "ignore"
device = "tpu"
quiet_period_s = 0
"""
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, base_dir=tmp_path, source="bad.toml")
    problems = caught.value.problems

    # One message per wrong key, each naming key and value.
    expected_fragments = [
        "[node] colour: unknown key",
        "[node] accept_unknown_peers = 1: expected true or false",
        "[node] ae_title = 'A_TITLE_OF_TWENTY_CH': 20 characters",
        "[node] port = 0: a TCP port is between 1 and 65535",
        "[node] max_pdu_size = 100",
        "[node] uid_root = '1.2.03.'",
        "[[peers]] #1 host: missing",
        "[[destinations]] #1 outputs = ['seg', 'pdf']: unknown output(s) pdf",
        "[[destinations]] #1 host = 'bad host!'",
        "[scoring] kvp_policy = 'ignore'",
        "[scoring] device = 'tpu'",
        "[scoring] quiet_period_s = 0.0: must be more than 0",
    ]
    for fragment in expected_fragments:
        assert any(fragment in problem for problem in problems), fragment
    assert len(problems) == len(expected_fragments)
    assert "bad.toml: 12 problem(s)" in str(caught.value)


def test_parse_settings_invalid_toml_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 2"):
        parse_settings("[node]\nport = = 3\n", base_dir=tmp_path)


def test_load_settings_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the settings file \(No such file or directory\); "
                                          r"check the path given with --config, else in \$CACS_NODE_CONFIG, "
                                          r"else ./node.toml"):
        load_settings(tmp_path / "absent.toml")


def test_parse_settings_relative_paths_resolve_against_file(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"weights")
    text = '[storage]\nroot = "data"\n[scoring]\nmodel_path = "model.pt"\nquiet_period_s = 2\n'

    settings = parse_settings(text, base_dir=tmp_path)

    assert settings.storage.root == tmp_path / "data"
    assert settings.scoring.model_path == tmp_path / "model.pt"
    # An integer in a float key is accepted and converted.
    assert settings.scoring.quiet_period_s == 2.0


def test_parse_settings_missing_model_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model_path = 'absent.pt': no file at .*absent.pt"):
        parse_settings('[scoring]\nmodel_path = "absent.pt"\n', base_dir=tmp_path)


def test_parse_settings_duplicate_destination_names_rejected(tmp_path: Path) -> None:
    text = (
        '[[destinations]]\nname = "pacs"\nae_title = "A"\nhost = "127.0.0.1"\nport = 104\n'
        '[[destinations]]\nname = "pacs"\nae_title = "B"\nhost = "127.0.0.1"\nport = 105\n'
    )
    with pytest.raises(ConfigError, match=r"name = 'pacs': used by an earlier destination"):
        parse_settings(text, base_dir=tmp_path)


def test_scoring_section_policies_reach_protocol_policy(tmp_path: Path) -> None:
    text = '[scoring]\nkvp_policy = "refuse"\ncontrast_policy = "flag"\nmass_calibration_factor = 0.8\n'

    scoring = parse_settings(text, base_dir=tmp_path).scoring

    assert scoring.protocol_policy().kvp == "refuse"
    assert scoring.protocol_policy().contrast == "flag"
    assert scoring.protocol_policy().thickness == "flag"
    assert scoring.scoring_parameters().mass_calibration_factor == 0.8


def test_parse_settings_non_finite_floats_rejected(tmp_path: Path) -> None:
    text = """
[node]
acse_timeout_s = inf
network_timeout_s = 1e400

[scoring]
quiet_period_s = nan
mass_calibration_factor = -inf
"""
    with pytest.raises(ConfigError) as raised:
        parse_settings(text, base_dir=tmp_path)
    problems = raised.value.problems
    # 1e400 overflows to inf when TOML is parsed, so it is reported as inf.
    assert problems == [
        "[node] acse_timeout_s = inf: expected a finite number; write a number such as 30.0",
        "[node] network_timeout_s = inf: expected a finite number; write a number such as 60.0",
        "[scoring] quiet_period_s = nan: expected a finite number; write a number such as 30.0",
        "[scoring] mass_calibration_factor = -inf: expected a finite number; write a number such as 0.743",
    ]


def test_parse_settings_invalid_dotted_address_and_repeated_output_rejected(tmp_path: Path) -> None:
    text = """
[node]
bind_address = "999.1.1.1"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
outputs = ["seg", "sr", "seg"]
"""
    with pytest.raises(ConfigError) as raised:
        parse_settings(text, base_dir=tmp_path)

    assert raised.value.problems == [
        "[node] bind_address = '999.1.1.1': not a valid IPv4 address; expected four numbers from 0 to 255 "
        "separated by dots, or a host name",
        "[[destinations]] #1 outputs = ['seg', 'sr', 'seg']: seg listed more than once; list each once",
    ]


def test_settings_warnings_lists_likely_mistakes(tmp_path: Path) -> None:
    text = f"""
[node]
ae_title = "CACS_NODE"
bind_address = "0.0.0.0"
port = 11112

[[destinations]]
name = "loop"
ae_title = "CACS_NODE"
host = "127.0.0.1"
port = 11112
outputs = ["sr", "region_seg"]

[storage]
root = "{tmp_path / 'data'}"
min_free_space_mb = 4000000000
"""
    settings = parse_settings(text, base_dir=tmp_path)
    warnings = settings_warnings(settings)

    assert warnings[0].startswith("no [[peers]] and accept_unknown_peers = false: every calling AE title is rejected")
    assert warnings[1].startswith("[[destinations]] #1 (loop) lists region_seg, but [scoring] write_region_seg = false")
    assert warnings[2].startswith("[[destinations]] #1 (loop) is this node itself (CACS_NODE@127.0.0.1:11112)")
    # 4e9 MiB (about 3.7 EiB) exceeds the free space of any test machine.
    assert warnings[3].startswith("[storage] min_free_space_mb = 4000000000, but only ")
    assert len(warnings) == 4


def test_settings_warnings_shipped_file_none() -> None:
    settings = load_settings(REPOSITORY_ROOT / "node.toml")
    # The shipped file has a peer, no region_seg output and a PACS on port 4242; its storage root may
    # not exist here, so the free space check is left out.
    warnings = [warning for warning in settings_warnings(settings) if "min_free_space_mb" not in warning]

    assert warnings == []


def test_parse_settings_runtime_onnx_on_cpu_accepted(tmp_path: Path) -> None:
    settings = parse_settings('[scoring]\nruntime = "onnx"\ndevice = "cpu"\n', base_dir=tmp_path)
    assert settings.scoring.runtime == "onnx"
    assert settings.scoring.device == "cpu"


def test_parse_settings_runtime_invalid_or_onnx_off_cpu_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as unknown:
        parse_settings('[scoring]\nruntime = "tensorrt"\n', base_dir=tmp_path)
    assert unknown.value.problems == [
        '[scoring] runtime = \'tensorrt\': allowed values are "auto", "torch" or "onnx"'
    ]

    # ONNX Runtime is installed with its CPU provider only, so "cuda" is rejected
    # before the first job fails. With this runtime, "auto" means the CPU.
    with pytest.raises(ConfigError) as off_cpu:
        parse_settings('[scoring]\nruntime = "onnx"\ndevice = "cuda:1"\n', base_dir=tmp_path)
    assert off_cpu.value.problems == [
        '[scoring] runtime = "onnx" runs on the CPU only, but device = \'cuda:1\'; '
        'set device = "cpu" or "auto", or runtime = "auto" to use ONNX Runtime only on the CPU'
    ]
    settings = parse_settings('[scoring]\nruntime = "onnx"\ndevice = "auto"\n', base_dir=tmp_path)
    assert (settings.scoring.runtime, settings.scoring.device) == ("onnx", "auto")


def test_parse_settings_runtime_defaults_to_auto(tmp_path: Path) -> None:
    settings = parse_settings("", base_dir=tmp_path)
    assert settings.scoring.runtime == "auto"
    assert settings.scoring.device == "auto"


def test_parse_settings_threads(tmp_path: Path) -> None:
    assert parse_settings("", base_dir=tmp_path).scoring.threads == 0
    assert parse_settings("[scoring]\nthreads = 2\n", base_dir=tmp_path).scoring.threads == 2
    with pytest.raises(ConfigError) as negative:
        parse_settings("[scoring]\nthreads = -1\n", base_dir=tmp_path)
    assert negative.value.problems == [
        "[scoring] threads = -1: give 0 to let torch choose (one per core) or a count from 1 to 1024"
    ]


def test_parse_settings_default_model_names(tmp_path: Path) -> None:
    for text in ('""', '"default"', '" default "'):
        settings = parse_settings(f"[scoring]\nmodel_path = {text}\n", base_dir=tmp_path)
        assert settings.scoring.model_path is None


def test_parse_settings_model_path_folder_named_a_folder(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with pytest.raises(ConfigError, match=r"model_path = 'models': a folder at .*models; give an existing model file"):
        parse_settings('[scoring]\nmodel_path = "models"\n', base_dir=tmp_path)


def test_parse_settings_onnx_invalid_device(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as invalid:
        parse_settings('[scoring]\nruntime = "onnx"\ndevice = "CUDA"\n', base_dir=tmp_path)
    assert invalid.value.problems == [
        '[scoring] device = \'CUDA\': allowed values are "auto", "cpu", "cuda" or "cuda:N"'
    ]


def test_parse_settings_threads_above_the_cap(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as huge:
        parse_settings("[scoring]\nthreads = 100000\n", base_dir=tmp_path)
    assert huge.value.problems == [
        "[scoring] threads = 100000: give 0 to let torch choose (one per core) or a count from 1 to 1024"
    ]


def test_storage_root_problem(tmp_path: Path) -> None:
    from node.config import storage_root_problem

    assert storage_root_problem(tmp_path / "new" / "root") is None
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    assert storage_root_problem(tmp_path / "file" / "root") == (
        f"[storage] root {tmp_path / 'file' / 'root'}: {tmp_path / 'file'} is not a folder"
    )
    problem = storage_root_problem(Path("/proc/cacs-node-root"))
    assert problem is not None and problem.startswith(
        "[storage] root /proc/cacs-node-root: this user cannot create /proc/cacs-node-root in /proc ("
    )
    assert list(tmp_path.glob(".cacs-node-check-*")) == []


def test_storage_root_through_symlink_loop_rejected(tmp_path: Path) -> None:
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")

    with pytest.raises(ConfigError) as raised:
        parse_settings('[storage]\nroot = "loop-a/data"\n', base_dir=tmp_path)

    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith("[storage] root = 'loop-a/data': the path cannot be resolved (")
    assert raised.value.problems[0].endswith("for example because a symbolic link in it points back into itself; "
                                             "fix the path or choose another folder")
    # The scoring section is valid, so check-config can still test the model.
    assert set(raised.value.valid_sections) == {"scoring"}


def test_peer_problems_all_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings('[[peers]]\nae_title = "A\\\\B"\n', base_dir=tmp_path)

    assert raised.value.problems == [
        "[[peers]] #1 host: missing; every peer needs ae_title and host",
        "[[peers]] #1 ae_title = 'A\\\\B': an AE title may contain only printable ASCII characters without "
        "backslash (PS3.5 VR AE); remove the other characters",
    ]
