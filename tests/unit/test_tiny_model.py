"""Tests for services.common.tiny_model, the offline tiny Wan2.1 writer."""

from __future__ import annotations

import pathlib
import socket
import threading

import numpy as np
import pytest
import torch

from services.common import tiny_model
from services.common.tiny_model import (
    TINY_MODEL_NAME,
    default_model_dir,
    ensure_tiny_model,
    write_tiny_model,
)

COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


def _tree(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _refuse_network(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"network access attempted: {args!r}")


def _block_network(mp: pytest.MonkeyPatch) -> None:
    # The hub libraries read HF_HUB_OFFLINE at import, possibly before this
    # runs, so also make any socket use fail loudly.
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", _refuse_network)
    mp.setattr(socket.socket, "connect_ex", _refuse_network)
    mp.setattr(socket, "getaddrinfo", _refuse_network)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / TINY_MODEL_NAME, seed=0)


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any network access fail loudly, on top of HF_HUB_OFFLINE."""
    _block_network(monkeypatch)


@pytest.fixture(scope="module")
def pipe(model_dir: pathlib.Path):
    from diffusers import WanPipeline

    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        pipeline = WanPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generate(pipeline, prompt: str, seed: int = 0) -> np.ndarray:
    return pipeline(
        prompt=prompt,
        negative_prompt="blurry",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames


# --- layout and determinism -------------------------------------------------


def test_layout(model_dir: pathlib.Path) -> None:
    assert (model_dir / "model_index.json").is_file()
    for name in COMPONENTS:
        assert (model_dir / name).is_dir(), name
    assert (model_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (model_dir / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (model_dir / "text_encoder" / "model.safetensors").is_file()
    # safetensors writes 0600 by itself; a shared cache needs others to read.
    for path in model_dir.rglob("*"):
        assert path.stat().st_mode & 0o004, path


def test_same_seed_is_byte_identical(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = _tree(write_tiny_model(tmp_path / "again", seed=0))
    first = _tree(model_dir)
    assert sorted(again) == sorted(first)
    for name, data in first.items():
        assert again[name] == data, name


def test_other_seed_changes_weights(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = _tree(write_tiny_model(tmp_path / "other", seed=1))
    first = _tree(model_dir)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights] != first[weights]
    # The tokenizer does not depend on the seed.
    assert other["tokenizer/tokenizer.json"] == first["tokenizer/tokenizer.json"]


def test_write_leaves_global_torch_state_alone(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    write_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_default_dtype() == torch.float32


# --- pipeline ---------------------------------------------------------------


def test_components_are_tiny_float32(pipe) -> None:
    from diffusers import UniPCMultistepScheduler

    for name in ("text_encoder", "transformer", "vae"):
        module = getattr(pipe, name)
        assert {p.dtype for p in module.parameters()} == {torch.float32}, name
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    assert pipe.scheduler.config.use_flow_sigmas
    assert pipe.scheduler.config.flow_shift == 3.0
    assert pipe.text_encoder.config.vocab_size >= len(pipe.tokenizer)
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model


@pytest.fixture(scope="module")
def cat_frames(pipe) -> np.ndarray:
    """One offline generation shared by the tests below (each costs ~0.1-1 s)."""
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        return _generate(pipe, "a cat")


def test_pipeline_runs_offline(cat_frames: np.ndarray) -> None:
    assert cat_frames.shape == (1, 5, 32, 32, 3)
    assert cat_frames.dtype == np.float32
    assert np.isfinite(cat_frames).all()
    # Not a flat image: the random VAE must pass the latents through.
    assert cat_frames.std() > 0.1


def test_pipeline_is_reproducible(pipe, cat_frames: np.ndarray, no_network: None) -> None:
    np.testing.assert_array_equal(_generate(pipe, "a cat"), cat_frames)


def test_prompt_and_seed_change_frames(pipe, cat_frames: np.ndarray, no_network: None) -> None:
    # Mean absolute difference, well clear of float noise.
    assert np.abs(cat_frames - _generate(pipe, "a dog running in the snow")).mean() > 0.01
    assert np.abs(cat_frames - _generate(pipe, "a cat", seed=1)).mean() > 0.01


def test_denoiser_depends_on_prompt_and_latents(pipe) -> None:
    # At the denoiser itself, not just after CFG's 5x amplification: the few
    # real tokens must not be drowned by the 500-odd zero-padded positions.
    with torch.no_grad():
        # 512 is what WanPipeline.__call__ pads to by default.
        kw = dict(do_classifier_free_guidance=False, max_sequence_length=512)
        cat, _ = pipe.encode_prompt("a cat", **kw)
        dog, _ = pipe.encode_prompt("a dog running", **kw)
        assert cat.shape == (1, 512, 32)
        x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500])
        out_cat = pipe.transformer(x, t, cat).sample
        out_dog = pipe.transformer(x, t, dog).sample
        out_x = pipe.transformer(2 * x, t, cat).sample
    assert out_cat.shape == x.shape
    assert (out_cat - out_dog).abs().mean() > 0.05
    assert (out_cat - out_x).abs().mean() > 0.05


# --- tokenizer --------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(model_dir: pathlib.Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir / "tokenizer")


def test_tokenizer_special_ids(tokenizer) -> None:
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == 1
    assert tokenizer.unk_token == "<unk>" and tokenizer.unk_token_id == 2
    assert 500 <= len(tokenizer) <= 2000


def test_tokenizer_appends_eos_and_pads_like_t5(tokenizer) -> None:
    prompts = ["a cat", "a dog running across a green field"]
    out = tokenizer(
        prompts,
        padding="max_length",
        max_length=512,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert out.input_ids.shape == out.attention_mask.shape == (2, 512)
    for row, prompt in enumerate(prompts):
        words = tokenizer(prompt, add_special_tokens=False).input_ids
        assert words and tokenizer.unk_token_id not in words
        n = len(words)
        ids, mask = out.input_ids[row].tolist(), out.attention_mask[row].tolist()
        assert ids[:n] == words
        assert ids[n] == tokenizer.eos_token_id
        assert ids[n + 1 :] == [0] * (511 - n)
        assert mask == [1] * (n + 1) + [0] * (511 - n)
    # Common words are single tokens, not character soup.
    assert len(tokenizer("a cat", add_special_tokens=False).input_ids) == 2


def test_tokenizer_truncation_keeps_eos(tokenizer) -> None:
    out = tokenizer(
        ["a cat " * 400],
        padding="max_length",
        max_length=512,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert out.input_ids.shape == (1, 512)
    assert out.input_ids[0, -1].item() == tokenizer.eos_token_id
    assert out.attention_mask.all()


def test_tokenizer_unseen_text_falls_back_to_characters(tokenizer) -> None:
    ids = tokenizer("Zyxqv, 42!", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "Zyxqv, 42!"


# --- default dir and ensure_tiny_model --------------------------------------


def test_default_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("DIFFMESH_HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / "models" / "wan2.1-tiny"
    monkeypatch.delenv("DIFFMESH_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / ".cache" / "diffmesh" / "models" / "wan2.1-tiny"


def test_ensure_writes_once(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "cache" / "models" / TINY_MODEL_NAME
    assert ensure_tiny_model(target) == target
    assert (target / "model_index.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    assert ensure_tiny_model(target) == target
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == stamps
    # The temporary directory was renamed, not left behind.
    assert [p.name for p in target.parent.iterdir()] == [TINY_MODEL_NAME]


def test_ensure_uses_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("DIFFMESH_HOME", str(tmp_path))
    target = ensure_tiny_model()
    assert target == tmp_path / "models" / TINY_MODEL_NAME
    assert (target / "model_index.json").is_file()


def test_ensure_fills_empty_directory(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    assert (ensure_tiny_model(target) / "model_index.json").is_file()


def test_ensure_loser_of_race_uses_winner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    target = tmp_path / "m"
    real_write = tiny_model.write_tiny_model

    def write_after_rival(path, seed=0):
        # A rival process finishes first, between our check and our rename.
        rival = real_write(tmp_path / "rival")
        rival.rename(target)
        (target / "rival-marker").write_text("")
        return real_write(path, seed)

    monkeypatch.setattr(tiny_model, "write_tiny_model", write_after_rival)
    assert ensure_tiny_model(target) == target
    assert (target / "rival-marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_ensure_concurrent_threads(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    target = tmp_path / "m"
    barrier = threading.Barrier(3)
    results: list[pathlib.Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(ensure_tiny_model(target))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [target] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert _tree(target) == _tree(model_dir)


def test_ensure_refuses_foreign_nonempty_dir(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "something-else").write_text("")
    with pytest.raises(OSError):
        ensure_tiny_model(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
