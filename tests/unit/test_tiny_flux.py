"""Tests for services.common.tiny.flux, the offline tiny FLUX.1 [dev] / [schnell] writers."""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys

import pytest

from services.common.tiny.flux import write_tiny_flux, write_tiny_flux_schnell


def tree(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refuse_network(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"network access attempted: {args!r}")


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse_network)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_network)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, no_network):
    first, second = tree(write_tiny_flux(tmp_path / "a")), tree(write_tiny_flux(tmp_path / "b"))
    assert first == second
    other = tree(write_tiny_flux(tmp_path / "c", seed=1))
    assert other.keys() == first.keys()
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights] != first[weights]
    assert other["tokenizer/tokenizer.json"] == first["tokenizer/tokenizer.json"]   # tokenizers hold no weights
    assert sum(len(data) for data in first.values()) < 4 << 20


def test_dev_and_schnell_configs_are_flux1s(tmp_path, no_network):
    dev, schnell = write_tiny_flux(tmp_path / "dev"), write_tiny_flux_schnell(tmp_path / "schnell")
    for path, guidance, dynamic in ((dev, True, True), (schnell, False, False)):
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == "FluxPipeline"
        assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
        assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
        transformer = json.loads((path / "transformer" / "config.json").read_text())
        scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
        assert transformer["guidance_embeds"] is guidance and scheduler["use_dynamic_shifting"] is dynamic
        assert transformer["in_channels"] == 4 * vae["latent_channels"] == 64
        assert len(vae["block_out_channels"]) == 4 and vae["shift_factor"] == 0.1159


def test_cli_writes_it(tmp_path):
    out = tmp_path / "cli-flux"
    done = subprocess.run([sys.executable, "-m", "diffmesh.cli", "tiny-model", str(out), "--family", "flux"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
