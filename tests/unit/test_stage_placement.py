"""`diffmesh up --encoder-devices/--denoiser-devices/--decoder-devices`: each stage's processes see only their
devices, through the platform layer's affinity variable (CUDA_VISIBLE_DEVICES, ZE_AFFINITY_MASK; XPU and CUDA faked:
no accelerator here), indices counted within what `up` itself sees; bad lists are one line and exit 2; CPU refuses
them. Nothing is started: `place_stages` and `stage_command` build what `up` would hand each child."""

from __future__ import annotations

import argparse
import pathlib

import pytest
import torch

from diffmesh import cli
from diffmesh.placement import place_stages
from services.common import platform, settings
from services.common.platform import PLATFORMS
from services.denoiser.gang.flags import add_gang_arguments, resolve_layout
from services.denoiser.gang.layout import GangLayout

AFFINITY = ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")


@pytest.fixture(autouse=True)
def _no_inherited_placement(monkeypatch):
    for name in (*AFFINITY, "DIFFMESH_DEVICE", "DIFFMESH_ENCODER_DEVICES", "DIFFMESH_DENOISER_DEVICES",
                 "DIFFMESH_DECODER_DEVICES"):
        monkeypatch.delenv(name, raising=False)


def fake_devices(monkeypatch, count: int) -> None:
    """Every accelerator platform reports `count` devices (the affinity variable, when set, is counted instead)."""
    monkeypatch.setattr(platform, "_accelerator_module",
                        lambda kind: type("FakeAccelerator", (), {"device_count": staticmethod(lambda: count)}))


def up_args(argv: list[str]) -> argparse.Namespace:
    args = cli.build_parser().parse_args(["up", *argv])
    return settings.resolve(args.parser, args)


def run_up(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = cli.main(["up", *argv])
    except SystemExit as exited:
        code = exited.code
    return code, capsys.readouterr().err


# --- the platform layer ---

@pytest.mark.parametrize("kind,variable", [("cuda", "CUDA_VISIBLE_DEVICES"), ("xpu", "ZE_AFFINITY_MASK")])
def test_affinity_env_names_the_platforms_variable_and_keeps_the_order_given(monkeypatch, kind, variable):
    fake_devices(monkeypatch, 4)
    chosen = PLATFORMS[kind]
    assert chosen.affinity_env((2,), {}) == {variable: "2"}
    assert chosen.affinity_env((3, 0), {}) == {variable: "3,0"}     # the child's device 0 is device 3


@pytest.mark.parametrize("kind,variable,inherited,expected", [
    ("cuda", "CUDA_VISIBLE_DEVICES", "2,3", "3"),
    ("cuda", "CUDA_VISIBLE_DEVICES", "GPU-8f1c,GPU-77aa", "GPU-77aa"),     # UUIDs pass through as they are
    ("xpu", "ZE_AFFINITY_MASK", "0.0,0.1,1.0", "0.1"),                      # device.sub-device entries too
])
def test_indices_count_within_the_devices_already_visible(monkeypatch, kind, variable, inherited, expected):
    fake_devices(monkeypatch, 8)      # the variable, not the machine, says what `up` sees
    assert PLATFORMS[kind].affinity_env((1,), {variable: inherited}) == {variable: expected}


def test_an_index_beyond_the_visible_devices_says_how_many_there_are(monkeypatch):
    fake_devices(monkeypatch, 4)
    with pytest.raises(ValueError, match=r"device 4 is not visible: 4 xpu device\(s\) are, indices 0-3"):
        PLATFORMS["xpu"].affinity_env((0, 4), {})
    with pytest.raises(ValueError, match=r"device 2 is not visible: 2 cuda device\(s\) are "
                                         r"\(CUDA_VISIBLE_DEVICES=5,6\), indices 0-1"):
        PLATFORMS["cuda"].affinity_env((2,), {"CUDA_VISIBLE_DEVICES": "5,6"})


def test_cpu_has_no_devices_to_choose():
    assert PLATFORMS["cpu"].visible_devices({"CUDA_VISIBLE_DEVICES": "0"}) is None
    with pytest.raises(ValueError, match="the cpu platform has no devices to choose from"):
        PLATFORMS["cpu"].affinity_env((0,), {})


# --- what `up` hands each stage ---

def test_up_gives_each_stage_only_its_devices_and_the_denoiser_a_gang_of_that_size(monkeypatch, tmp_path):
    fake_devices(monkeypatch, 4)
    args = up_args(["--denoiser-devices", "0,1", "--decoder-devices", "2", "--encoder-devices", "3"])
    placements = place_stages(args, PLATFORMS["xpu"], {})
    commands = {stage: cli.stage_command(args, stage, ["--model", "m"], tmp_path / stage, placements[stage])
                for stage in cli.STAGES}
    assert {stage: env for stage, (_, env) in commands.items()} == {
        "encoder": {"ZE_AFFINITY_MASK": "3"}, "denoiser": {"ZE_AFFINITY_MASK": "0,1"},
        "decoder": {"ZE_AFFINITY_MASK": "2"}}
    # Two devices listed: the denoiser runs two ranks, which its own flags read back as a gang of 2.
    denoiser_argv = commands["denoiser"][0]
    gang, _ = add_gang_arguments(argparse.ArgumentParser()).parse_known_args(denoiser_argv)
    assert resolve_layout(gang, None) == GangLayout(cfg=1, ring=1, ulysses=2, tp=1)
    assert "--devices" not in commands["decoder"][0] and "--devices" not in commands["encoder"][0]


def test_the_users_own_affinity_variable_is_the_set_indices_count_in(monkeypatch):
    fake_devices(monkeypatch, 8)
    args = up_args(["--denoiser-devices", "1,0", "--decoder-devices", "2"])
    placements = place_stages(args, PLATFORMS["cuda"], {"CUDA_VISIBLE_DEVICES": "4,5,6"})
    assert placements["denoiser"].env == {"CUDA_VISIBLE_DEVICES": "5,4"}
    assert placements["decoder"].env == {"CUDA_VISIBLE_DEVICES": "6"}
    assert placements["encoder"].env == {}        # not placed: inherits all three, as before


def test_several_decoder_devices_make_a_decoder_gang(monkeypatch, tmp_path):
    fake_devices(monkeypatch, 4)
    args = up_args(["--decoder-devices", "2,3"])
    argv, env = cli.stage_command(args, "decoder", [], tmp_path / "decoder",
                                  place_stages(args, PLATFORMS["cuda"], {})["decoder"])
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert argv[argv.index("--devices") + 1] == "2"


def test_an_explicit_devices_that_agrees_is_passed_once_and_one_that_disagrees_is_refused(monkeypatch, tmp_path):
    fake_devices(monkeypatch, 4)
    args = up_args(["--devices", "2", "--denoiser-devices", "0,1"])
    argv, _ = cli.stage_command(args, "denoiser", [], tmp_path / "d", place_stages(args, PLATFORMS["cuda"], {})[
        "denoiser"])
    assert argv.count("--devices") == 1 and argv[argv.index("--devices") + 1] == "2"
    with pytest.raises(ValueError, match="--devices 4 but --denoiser-devices 0,1 lists 2: the gang runs one rank"):
        place_stages(up_args(["--devices", "4", "--denoiser-devices", "0,1"]), PLATFORMS["cuda"], {})


def test_without_device_lists_no_stage_environment_changes(tmp_path):
    args = up_args([])
    placements = place_stages(args, None, {"CUDA_VISIBLE_DEVICES": "1"})      # no platform is even selected
    for stage in cli.STAGES:
        assert cli.stage_command(args, stage, [], tmp_path / stage, placements[stage])[1] == {}


def test_device_lists_come_from_the_environment_and_the_config_file(monkeypatch, tmp_path):
    fake_devices(monkeypatch, 4)
    config = tmp_path / "up.toml"
    config.write_text('denoiser_devices = [0, 1]\ndecoder_devices = 3\n')
    monkeypatch.setenv("DIFFMESH_ENCODER_DEVICES", "2")
    placements = place_stages(up_args(["--config", str(config)]), PLATFORMS["xpu"], {})
    assert {stage: dict(placed.env) for stage, placed in placements.items()} == {
        "encoder": {"ZE_AFFINITY_MASK": "2"}, "denoiser": {"ZE_AFFINITY_MASK": "0,1"},
        "decoder": {"ZE_AFFINITY_MASK": "3"}}
    assert placements["denoiser"].argv == ("--devices", "2")


def test_help_shows_each_flag_its_default_and_its_environment_variable(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["up", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert exited.value.code == 0
    assert ("--decoder-devices I[,I...] the decoder's devices, one rank each: 1,2 is a decoder gang of 2 (default: "
            "every device `up` sees; it uses the first; env DIFFMESH_DECODER_DEVICES)") in flat
    assert "0,1 means --devices 2 (default: every device `up` sees" in flat and "env DIFFMESH_ENCODER_DEVICES" in flat


# --- bad values: one line, exit 2, before anything is written or started ---

@pytest.mark.parametrize("argv,message", [
    (["--decoder-devices", "x"], "argument --decoder-devices: 'x' is not a list of device indices, e.g. 0 or 0,1"),
    (["--decoder-devices", "-1"], "argument --decoder-devices: '-1': device indices start at 0"),
    (["--denoiser-devices=0,-1"], "argument --denoiser-devices: '0,-1': device indices start at 0"),
    (["--denoiser-devices", "0,1,0"], "argument --denoiser-devices: '0,1,0' lists device 0 twice"),
    (["--decoder-devices", "0,,1"], "'0,,1' is not a list of device indices"),
    (["--encoder-devices", "0,1", "--device", "cuda"], "--encoder-devices 0,1: the encoder runs on one device"),
    (["--decoder-devices", "2", "--device", "cuda"],
     "--decoder-devices 2: device 2 is not visible: 2 cuda device(s) are, indices 0-1"),
    (["--devices", "1", "--denoiser-devices", "0,1", "--device", "cuda"], "--devices 1 but --denoiser-devices 0,1"),
    (["--decoder-devices", "1", "--device", "cpu"],
     "--decoder-devices 1: the cpu platform has no devices to choose from"),
])
def test_a_bad_device_list_is_one_line_and_exit_2(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # Were the list wrongly accepted, `up` would stop at this model directory (exit 1) rather than start a mesh.
    code, err = run_up(capsys, [*argv, "--model", "/nonexistent/model"])
    assert (code, err.count("\n")) == (2, 1), err
    assert err.startswith("diffmesh up: error: ") and message in err, err


def test_a_bad_list_from_the_environment_or_the_file_names_its_source(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFMESH_DECODER_DEVICES", "1,1")
    code, err = run_up(capsys, ["--model", "/nonexistent/model"])
    assert (code, err.count("\n")) == (2, 1)
    assert "DIFFMESH_DECODER_DEVICES='1,1' (for --decoder-devices): '1,1' lists device 1 twice" in err
    monkeypatch.delenv("DIFFMESH_DECODER_DEVICES")
    config = pathlib.Path(tmp_path / "up.toml")
    config.write_text("denoiser_devices = [0, -1]\n")
    code, err = run_up(capsys, ["--config", str(config), "--device", "cpu", "--model", "/nonexistent/model"])
    assert (code, err.count("\n")) == (2, 1)
    assert "--denoiser-devices: '0,-1': device indices start at 0" in err
