"""Tests for services.gateway.config: flag > environment > TOML file > default, bad values named, and size parsing."""

from __future__ import annotations

import argparse
import os

import pytest

from services.common.errors import InvalidArgument
from services.gateway.config import (
    DEFAULT_STAGE_ADDRESSES,
    GatewayConfig,
    ModelStages,
    add_arguments,
    load_config,
    parse_config,
    parse_size,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("DIFFMESH_"):
            monkeypatch.delenv(name)


def _load(*argv: str) -> GatewayConfig:
    return load_config(add_arguments(argparse.ArgumentParser()).parse_args(list(argv)))


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(
        "\n".join(
            [
                'host = "10.0.0.1"',
                "grpc_port = 6001",
                "http_port = 6002",
                'encoder = ["file-enc-a:1", "file-enc-b:2"]',
                'denoiser = "file-den-a:3, file-den-b:4"',
                'decoder = "file-dec:5"',
                'model_name = "file-model"',
                'default_size = "640x320"',
                "default_steps = 7",
                "max_queued_jobs = 3",
                'data_dir = "/srv/diffmesh"',
                'retention_age = "7d"',
                'retention_bytes = "500M"',
            ]
        )
    )
    return str(path)


def test_defaults_without_flags_env_or_file():
    config = _load()
    assert config.host == "127.0.0.1"
    assert config.grpc_port == 50051
    assert config.http_port == 8000
    for stage, address in DEFAULT_STAGE_ADDRESSES.items():
        assert getattr(config.models[0], stage) == (address,)
    # No gateway-wide defaults: each model's own (from its family's limits) apply.
    assert (config.defaults.width, config.defaults.height) == (None, None)
    assert config.defaults.num_inference_steps is None


def test_file_overrides_defaults(toml_file):
    config = _load("--config", toml_file)
    assert config.host == "10.0.0.1"
    assert config.grpc_port == 6001
    assert config.http_port == 6002
    assert config.models[0].encoder == ("file-enc-a:1", "file-enc-b:2")  # TOML list
    assert config.models[0].denoiser == ("file-den-a:3", "file-den-b:4")  # comma-separated string
    assert config.models[0].decoder == ("file-dec:5",)
    assert config.model_name == "file-model"
    assert (config.defaults.width, config.defaults.height) == (640, 320)
    assert config.defaults.num_inference_steps == 7
    assert config.max_queued_jobs == 3
    assert config.data_dir == "/srv/diffmesh"
    assert (config.retention_age_s, config.retention_bytes) == (7 * 86400, 500 << 20)


def test_config_file_can_come_from_env(monkeypatch, toml_file):
    monkeypatch.setenv("DIFFMESH_GATEWAY_CONFIG", toml_file)
    assert _load().grpc_port == 6001


def test_env_overrides_file(monkeypatch, toml_file):
    monkeypatch.setenv("DIFFMESH_ENCODER_ADDR", "env-enc-a:11,env-enc-b:12")
    monkeypatch.setenv("DIFFMESH_DENOISER_ADDR", " env-den:13 ")
    monkeypatch.setenv("DIFFMESH_HOST", "0.0.0.0")
    monkeypatch.setenv("DIFFMESH_MODEL_NAME", "env-model")
    config = _load("--config", toml_file)
    assert config.models[0].encoder == ("env-enc-a:11", "env-enc-b:12")
    assert config.models[0].denoiser == ("env-den:13",)
    assert config.models[0].decoder == ("file-dec:5",)  # no env for it: the file still applies
    assert config.host == "0.0.0.0"
    assert config.model_name == "env-model"


def test_env_overrides_default_without_file(monkeypatch):
    monkeypatch.setenv("DIFFMESH_DECODER_ADDR", "env-dec:21")
    config = _load()
    assert config.models[0].decoder == ("env-dec:21",)
    assert config.models[0].encoder == (DEFAULT_STAGE_ADDRESSES["encoder"],)


def test_empty_env_value_is_ignored(monkeypatch, toml_file):
    monkeypatch.setenv("DIFFMESH_ENCODER_ADDR", "")
    assert _load("--config", toml_file).models[0].encoder == ("file-enc-a:1", "file-enc-b:2")


def test_flag_overrides_env_and_file(monkeypatch, toml_file):
    monkeypatch.setenv("DIFFMESH_ENCODER_ADDR", "env-enc:11")
    monkeypatch.setenv("DIFFMESH_DENOISER_ADDR", "env-den:13")
    monkeypatch.setenv("DIFFMESH_HOST", "0.0.0.0")
    config = _load(
        "--config", toml_file,
        "--encoder", "flag-enc-a:31, flag-enc-b:32,",
        "--denoiser", "flag-den:33",
        "--host", "192.168.1.1",
        "--grpc-port", "7001",
        "--http-port", "7002",
        "--default-size", "256x128",
        "--default-steps", "3",
    )
    assert config.models[0].encoder == ("flag-enc-a:31", "flag-enc-b:32")  # spaces and a trailing comma dropped
    assert config.models[0].denoiser == ("flag-den:33",)
    assert config.models[0].decoder == ("file-dec:5",)
    assert config.host == "192.168.1.1"
    assert config.grpc_port == 7001
    assert config.http_port == 7002
    assert (config.defaults.width, config.defaults.height) == (256, 128)
    assert config.defaults.num_inference_steps == 3


def test_port_zero_flag_is_kept_not_treated_as_unset(toml_file):
    config = _load("--config", toml_file, "--grpc-port", "0", "--http-port", "0")
    assert (config.grpc_port, config.http_port) == (0, 0)


def test_ports_are_ints_and_stage_lists_are_tuples(toml_file):
    config = _load("--config", toml_file)
    assert isinstance(config.grpc_port, int) and isinstance(config.http_port, int)
    for stage in ("encoder", "denoiser", "decoder"):
        assert isinstance(getattr(config.models[0], stage), tuple)


def test_bad_default_size_flag_names_the_field():
    with pytest.raises(InvalidArgument) as info:
        _load("--default-size", "big")
    assert info.value.field == "default_size"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("832x480", (832, 480)), ("832X480", (832, 480)), (" 64 x 32 ", (64, 32)), ("16x4096", (16, 4096))],
)
def test_parse_size_reads_width_and_height(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "832", "832x", "x480", "axb", "832*480", "-832x480", "832x-480", "8.5x4",
                                  "1x2x3"])
def test_parse_size_rejects_malformed_text_naming_the_field(text):
    with pytest.raises(InvalidArgument) as info:
        parse_size(text, "size")
    assert info.value.field == "size"
    assert repr(text) in info.value.message
    with pytest.raises(InvalidArgument) as info:
        parse_size(text, "default_size")
    assert info.value.field == "default_size"


def test_stage_stall_timeout_flag_overrides_file_and_default(tmp_path):
    assert _load().stage_stall_timeout_s == 300.0
    path = tmp_path / "gateway.toml"
    path.write_text("stage_stall_timeout = 45\n")
    assert _load("--config", str(path)).stage_stall_timeout_s == 45.0
    assert _load("--config", str(path), "--stage-stall-timeout", "2.5").stage_stall_timeout_s == 2.5


def test_routes_serve_several_models_the_first_by_default():
    config = _load("--route", "wan encoder=e1:1,e2:2 denoiser=d1:3 decoder=c1:4",
                   "--route", "flux decoder=c2:8 encoder=e3:5 denoiser=d2:6")
    assert config.models == (ModelStages("wan", ("e1:1", "e2:2"), ("d1:3",), ("c1:4",)),
                             ModelStages("flux", ("e3:5",), ("d2:6",), ("c2:8",)))
    assert config.model_name == "wan"


def test_models_tables_in_the_file(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('''
[[models]]
name = "wan"
encoder = ["e1:1"]
denoiser = "d1:2, d2:3"
decoder = ["c1:4"]

[[models]]
name = "flux"
encoder = ["e2:5"]
denoiser = ["d3:6"]
decoder = ["c2:7"]
''')
    config = _load("--config", str(path))
    assert [m.name for m in config.models] == ["wan", "flux"]
    assert config.models[0].denoiser == ("d1:2", "d2:3")
    assert config.models[1].decoder == ("c2:7",)


@pytest.mark.parametrize("route", ["wan encoder=e:1 denoiser=d:2", "wan encoder=e:1 denoiser=d:2 decoder=c:3 vae=v:4",
                                   "wan encoder=e:1 encoder=e:2 denoiser=d:2 decoder=c:3", "wan encoder= denoiser=d:2"])
def test_a_malformed_route_is_refused(route):
    with pytest.raises(ValueError, match="--route"):
        _load("--route", route)


def test_a_model_routed_twice_is_refused():
    with pytest.raises(ValueError, match="routed twice"):
        _load("--route", "wan encoder=e:1 denoiser=d:2 decoder=c:3",
              "--route", "wan encoder=e:4 denoiser=d:5 decoder=c:6")


def test_job_storage_defaults_and_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFMESH_HOME", str(tmp_path))
    config = _load()
    assert config.data_dir == str(tmp_path / "data")
    assert config.database_url == ""                       # SQLite under the data dir
    assert (config.retention_age_s, config.retention_bytes) == (86400, 10 << 30)
    assert config.max_queued_jobs == 256
    monkeypatch.setenv("DIFFMESH_DATABASE_URL", "postgresql://gw@db/jobs")
    monkeypatch.setenv("DIFFMESH_DATA_DIR", str(tmp_path / "env"))
    config = _load("--retention-age", "90", "--retention-bytes", "0", "--max-queued-jobs", "8")
    assert (config.database_url, config.data_dir) == ("postgresql://gw@db/jobs", str(tmp_path / "env"))
    assert (config.retention_age_s, config.retention_bytes, config.max_queued_jobs) == (90.0, 0, 8)
    for bad in (("--retention-age", "soon"), ("--retention-bytes", "lots"), ("--max-queued-jobs", "0")):
        with pytest.raises(ValueError):
            _load(*bad)


def test_input_limits_defaults_flags_and_file(tmp_path):
    base = _load()
    assert (base.max_steps, base.max_body_bytes, base.idle_timeout_s, base.header_timeout_s) == (200, 32 << 20, 60, 10)
    path = tmp_path / "limits.toml"
    path.write_text("max_steps = 8\nmax_body_bytes = 1024\nidle_timeout = 5\nheader_timeout = 2.5\n")
    from_file = _load("--config", str(path))
    assert (from_file.max_steps, from_file.max_body_bytes, from_file.idle_timeout_s, from_file.header_timeout_s) == (
        8, 1024, 5.0, 2.5)
    flags = _load("--config", str(path), "--max-steps", "2", "--max-body-bytes", "99", "--idle-timeout", "1",
                  "--header-timeout", "0.5")
    assert (flags.max_steps, flags.max_body_bytes, flags.idle_timeout_s, flags.header_timeout_s) == (2, 99, 1, 0.5)


@pytest.mark.parametrize("argv", [("--max-steps", "0"), ("--max-body-bytes", "0"), ("--idle-timeout", "0"),
                                  ("--header-timeout", "-1")])
def test_input_limits_must_be_positive(argv):
    with pytest.raises(ValueError):
        _load(*argv)


def test_one_setting_at_every_level_flag_env_file_default(monkeypatch, tmp_path):
    """The order for a setting that has all four: --rate-limit, DIFFMESH_RATE_LIMIT, `rate_limit` in the file, none."""
    path = tmp_path / "gateway.toml"
    path.write_text("rate_limit = 10\n")
    assert _load().rate_limit_per_minute is None
    assert _load("--config", str(path)).rate_limit_per_minute == 10.0
    monkeypatch.setenv("DIFFMESH_RATE_LIMIT", "20")
    assert _load("--config", str(path)).rate_limit_per_minute == 20.0
    assert _load("--config", str(path), "--rate-limit", "30").rate_limit_per_minute == 30.0


def test_keys_and_served_names_from_the_file(tmp_path, monkeypatch):
    path = tmp_path / "gateway.toml"
    path.write_text('api_keys = "k1,k2"\nserved_model_name = ["wan", "wan-latest"]\n')
    config = _load("--config", str(path))
    assert config.api_keys == ("k1", "k2")
    assert (config.models[0].name, config.models[0].aliases) == ("wan", ("wan-latest",))
    monkeypatch.setenv("DIFFMESH_API_KEYS", "env-key")
    assert _load("--config", str(path)).api_keys == ("env-key",)
    assert _load("--config", str(path), "--api-key", "flag-key").api_keys == ("flag-key",)


@pytest.mark.parametrize(("file_text", "env", "message"), [
    ("max_step = 3\n", {}, "unknown setting 'max_step'"),
    ("grpc_port = \"many\"\n", {}, "grpc_port = 'many': Input should be a valid integer"),
    ("", {"DIFFMESH_RATE_LIMIT": "fast"}, "DIFFMESH_RATE_LIMIT='fast' (for --rate-limit)"),
])
def test_a_bad_file_key_or_env_value_is_refused_naming_it(tmp_path, monkeypatch, file_text, env, message):
    path = tmp_path / "gateway.toml"
    path.write_text(file_text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as info:
        _load("--config", str(path))
    assert message in str(info.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["--default-size", "64"], "--default-size: '64' is not of the form WIDTHxHEIGHT"),
    (["--max-steps", "0"], "max_steps must be at least 1"),
    (["--config", "/nonexistent/gateway.toml"], "--config /nonexistent/gateway.toml: No such file"),
])
def test_serve_gateway_reports_a_bad_value_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        parse_config(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("diffmesh serve gateway: error: ") and message in err and err.count("\n") == 1, err
