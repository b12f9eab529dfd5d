"""Every command's and stage's settings: flags > environment > the --config TOML file > defaults; a value from the
environment or the file is checked as the flag would be; a bad one is one line naming where it came from; every
flag's help shows its default (services/common/settings.py)."""

from __future__ import annotations

import argparse
import functools
import os

import pytest

from diffmesh import cli
from services.common import settings
from services.denoiser.gang.flags import positive_seconds


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("DIFFMESH_"):
            monkeypatch.delenv(name)


def toy() -> settings.Parser:
    parser = settings.Parser(prog="toy")
    settings.add_config_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address")
    parser.add_argument("--port", type=int, default=1, help="port")
    parser.add_argument("--mode", choices=["slow", "fast"], default="slow", help="mode")
    parser.add_argument("--timeout", type=positive_seconds, default=60.0, help="seconds")
    parser.add_argument("--key", action="append", default=None, help="keys (default: none)")
    parser.add_argument("--verbose", action="store_true", help="say more")
    parser.add_argument("--compile", nargs="?", const="default", default=None, help="compile (default: off)")
    parser.add_argument("--prompt", required=True, help="what to make")
    return settings.bind_env(parser, host="DIFFMESH_HOST", port="DIFFMESH_PORT", key="DIFFMESH_KEYS",
                             verbose="DIFFMESH_VERBOSE")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return str(path)


def test_flags_beat_env_beat_file_beat_defaults(tmp_path, monkeypatch):
    config = write(tmp_path, 'host = "file-host"\nport = 2\nprompt = "from the file"\n')
    assert settings.parse_args(toy(), ["--prompt", "p"]).port == 1                             # default
    assert settings.parse_args(toy(), ["--config", config]).port == 2                          # file
    monkeypatch.setenv("DIFFMESH_PORT", "3")
    args = settings.parse_args(toy(), ["--config", config])
    assert (args.port, args.host, args.prompt) == (3, "file-host", "from the file")           # env, file, file
    args = settings.parse_args(toy(), ["--config", config, "--port", "4", "--host", "flag-host"])
    assert (args.port, args.host) == (4, "flag-host")                                          # flags
    # A flag given as its default still wins: given is given.
    assert settings.parse_args(toy(), ["--config", config, "--port", "1"]).port == 1


def test_env_and_file_values_are_what_the_same_flag_text_would_give(tmp_path, monkeypatch):
    config = write(tmp_path, 'prompt = "x"\ntimeout = 30\ncompile = true\nmode = "fast"\nkey = ["a", "b"]\n')
    args = settings.parse_args(toy(), ["--config", config])
    assert (args.timeout, args.compile, args.mode, args.key) == (30.0, "default", "fast", ["a", "b"])
    # In the file, one string is one value of a repeatable flag; in the environment, values are comma-separated.
    assert settings.parse_args(toy(), ["--config", write(tmp_path, 'prompt = "x"\nkey = "one"\n')]).key == ["one"]
    monkeypatch.setenv("DIFFMESH_KEYS", "k1, k2,")
    monkeypatch.setenv("DIFFMESH_VERBOSE", "1")
    args = settings.parse_args(toy(), ["--config", config])
    assert (args.key, args.verbose) == (["k1", "k2"], True)
    assert settings.parse_args(toy(), ["--config", config, "--key", "only"]).key == ["only"]


def test_resolving_a_resolved_namespace_changes_nothing(tmp_path):
    args = settings.parse_args(toy(), ["--config", write(tmp_path, 'prompt = "x"\nport = 9\n')])
    assert settings.resolve(toy(), args) is args


@pytest.mark.parametrize(("env", "text", "expected"), [
    ({"DIFFMESH_PORT": "abc"}, 'prompt = "x"', "toy: error: DIFFMESH_PORT='abc' (for --port): Input should be a valid"),
    ({}, 'prompt = "x"\nport = "x"', ": port = 'x': Input should be a valid integer"),
    ({}, 'prompt = "x"\nmode = "quick"', ": mode = 'quick': Input should be 'slow' or 'fast'"),
    ({}, 'prompt = "x"\ntimeout = -5', ": timeout = -5: -5 is not a positive number of seconds"),
    ({}, 'prompt = "x"\nprot = 5', ": unknown setting 'prot' (the keys are the flags' names)"),
    ({}, 'prompt = "x"\nport = ', ": not valid TOML"),
    ({}, "port = 5", "--prompt is required (on the command line or in the --config file)"),
])
def test_a_bad_value_from_any_source_is_one_line_naming_it(tmp_path, monkeypatch, capsys, env, text, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        settings.parse_args(toy(), ["--config", write(tmp_path, text)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_a_missing_config_file_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        settings.parse_args(toy(), ["--prompt", "x", "--config", "/nonexistent/diffmesh.toml"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "toy: error: --config /nonexistent/diffmesh.toml: No such file or directory\n"


def test_help_shows_defaults_and_environment_variables():
    text = " ".join(toy().format_help().split())
    for shown in ("address (default: 127.0.0.1; env DIFFMESH_HOST)", "port (default: 1; env DIFFMESH_PORT)",
                  "mode (default: slow)", "seconds (default: 60)", "keys (default: none; env DIFFMESH_KEYS)",
                  "say more (default: off; env DIFFMESH_VERBOSE)", "what to make (required)"):
        assert shown in text, shown


@functools.cache
def every_parser() -> dict[str, argparse.ArgumentParser]:
    """Each parser a user meets: diffmesh's commands, each stage's, the gateway's."""
    from services.common.stage import stage_parser
    from services.decoder.server import SPEC as DECODER
    from services.denoiser.server import SPEC as DENOISER
    from services.encoder.server import SPEC as ENCODER
    from services.gateway.config import gateway_parser

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    parsers = {f"diffmesh {name}": parser for name, parser in commands.items() if name != "serve"}
    for spec in (ENCODER, DENOISER, DECODER):
        parsers[f"serve {spec.name}"] = settings.seal(stage_parser(spec))
    parsers["serve gateway"] = gateway_parser()
    return parsers


@pytest.mark.parametrize("name", ["diffmesh up", "diffmesh generate", "diffmesh dev-ca", "diffmesh tiny-model",
                                  "serve encoder", "serve denoiser", "serve decoder", "serve gateway"])
def test_every_flag_help_says_its_default(name):
    parser = every_parser()[name]
    formatter = parser._get_formatter()
    flags = [action for action in parser._actions if settings._is_setting(action)]
    assert len(flags) >= 2
    for action in flags:
        text = formatter._expand_help(action)
        assert "default" in text.lower() or "(required" in text, f"{name} {action.option_strings}: {text!r}"
        assert "None" not in text, f"{name} {action.option_strings}: {text!r}"


def test_a_stage_reads_its_config_file(tmp_path, monkeypatch):
    from services.common.stage import stage_parser
    from services.decoder.server import SPEC as DECODER
    from services.denoiser.server import SPEC as DENOISER

    config = write(tmp_path, 'port = 6001\nmax-queue = 3\nvae_tiling = "on"\nmetrics_port = 9464\n'
                   'dtype = "float32"\ndevice = "cpu"\n')
    args = settings.parse_args(stage_parser(DECODER), ["--config", config])
    assert (args.port, args.max_queue, args.vae_tiling, args.metrics_port, args.dtype, args.device) == (
        6001, 3, "on", 9464, "float32", "cpu")
    monkeypatch.setenv("DIFFMESH_METRICS_PORT", "9500")
    monkeypatch.setenv("DIFFMESH_DEVICE", "xpu")
    args = settings.parse_args(stage_parser(DECODER), ["--config", config, "--port", "7001"])
    assert (args.port, args.metrics_port, args.device, args.grace) == (7001, 9500, "xpu", 30.0)
    gang = write(tmp_path, 'devices = 2\ncfg_parallel = true\ngang_timeout = 30\ncompile = "max-autotune"\n'
                 'warmup_sizes = "64x32,32x32x5"\n')
    args = settings.parse_args(stage_parser(DENOISER), ["--config", gang])
    assert (args.devices, args.cfg_parallel, args.gang_timeout, args.compile, args.warmup_sizes) == (
        2, True, 30.0, "max-autotune", ((64, 32, 1), (32, 32, 5)))


def test_the_cli_names_the_services_environment_variables():
    """`diffmesh` keeps these literal (its help must not import torch): they must be the services' own."""
    from services.common.attention import ATTENTION_ENV
    from services.common.logs import LOG_FORMAT_ENV
    from services.common.models import MODEL_ENV
    from services.common.platform import DEVICE_ENV
    from services.denoiser.gang.distributed import DEFAULT_COLLECTIVE_TIMEOUT

    assert (cli.MODEL_ENV, cli.DEVICE_ENV, cli.ATTENTION_ENV, cli.LOG_FORMAT_ENV) == (
        MODEL_ENV, DEVICE_ENV, ATTENTION_ENV, LOG_FORMAT_ENV)
    assert cli.GANG_TIMEOUT_S == DEFAULT_COLLECTIVE_TIMEOUT.total_seconds()
