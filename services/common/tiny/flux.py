"""Offline writers of tiny, random-weight FLUX.1 text-to-image models (diffusers `FluxPipeline` format).

* :func:`write_tiny_flux` -- FLUX.1 [dev]'s shape: the transformer embeds the guidance scale
  (`guidance_embeds=True`); the scheduler shifts its sigmas by the image's size (`use_dynamic_shifting`).
* :func:`write_tiny_flux_schnell` -- FLUX.1 [schnell]'s: no guidance embedding, a fixed shift of 1.

Both are structurally the real thing in miniature: a CLIP text model (pooled embedding) and a T5 encoder (token
embeddings) with their own tokenizer classes, a FluxTransformer2DModel on 2x2-packed latents, an AutoencoderKL
with 16 latent channels, 8x spatial and FLUX's scaling/shift factors, and FlowMatchEulerDiscreteScheduler with
FLUX.1's config. Nothing touches the network: both tokenizers are built from the Wan writer's embedded corpus
(services/common/tiny_model.py), every weight comes from a seeded random initialisation, so the same seed gives
byte-identical files, in a second or two, a few hundred kB in all.
"""

from __future__ import annotations

import collections
import math
import os
import pathlib

from services.common import tiny_model as wan21

__all__ = ["write_tiny_flux", "write_tiny_flux_schnell"]

CLIP_MAX_LENGTH = 77           # CLIP's positions; FluxPipeline pads CLIP prompts to tokenizer.model_max_length
T5_MAX_LENGTH = 512            # FluxPipeline's max_sequence_length default (and its limit)
LATENT_CHANNELS = 16           # FLUX.1's VAE
SCALING_FACTOR = 0.3611        # FLUX.1's VAE config
SHIFT_FACTOR = 0.1159
_COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_MERGES = 300


def _learn_merges(words: collections.Counter, count: int) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, ties to the smaller pair: plain BPE, made deterministic
    (the `tokenizers` trainer breaks ties by hash order, so its files differ from run to run)."""
    spelled = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: collections.Counter = collections.Counter()
        for word, symbols in spelled.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        for word, symbols in spelled.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spelled[word] = merged
    return merges


def _build_clip_tokenizer():
    """A CLIPTokenizer (byte-level BPE, "</w>" word ends, lower-cased) with merges learned from the corpus.

    The vocabulary holds every byte symbol alone and as a word end, so any text tokenizes without <unk>, then
    the merges' results, then CLIP's two special tokens last (as in CLIP, where they are 49406/49407). The
    corpus is lower-case ASCII words, whose byte-level symbols are the letters themselves.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(collections.Counter(wan21._CORPUS.lower().split()), _CLIP_MERGES)
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(symbol + "</w>" for symbol in alphabet), *(a + b for a, b in merges),
                  _CLIP_BOS, _CLIP_EOS]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _build_t5_tokenizer():
    """A T5TokenizerFast (Unigram, "▁" word prefix, eos appended) over the corpus's words.

    Each corpus word is one piece scored by its log frequency, and every printable ASCII character is a piece of
    low score, so corpus words stay whole and anything else falls back to characters. Built, not trained: the
    pieces and scores follow from the corpus alone.
    """
    from transformers import T5TokenizerFast

    counts = collections.Counter(wan21._CORPUS.split())
    total = sum(counts.values())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, math.log(count / total)) for word, count in sorted(counts.items())]
    pieces += [(chr(c), -20.0) for c in range(33, 127)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _build_clip_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
        # The pooled output is taken at the first eos token (CLIP pads with eos too).
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _build_t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",   # T5 v1.1, as FLUX.1 uses
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _build_transformer(guidance_embeds: bool):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,    # 2x2-packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,             # the T5's d_model
        pooled_projection_dim=32,           # the CLIP's hidden size
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),           # sums to attention_head_dim
    )
    return model.eval()


def _build_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,     # four levels: 8x spatial, as FLUX.1's
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        scaling_factor=SCALING_FACTOR,
        shift_factor=SHIFT_FACTOR,
        use_quant_conv=False,                             # FLUX.1's VAE has neither quant conv
        use_post_quant_conv=False,
    )
    # Default init leaves decoded frames nearly independent of the latents (see the Wan writer).
    wan21._variance_preserving_init(vae)
    return vae.eval()


def _build_scheduler(dynamic: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler config shifts by the image's token count; FLUX.1-schnell's is a fixed shift of 1.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if dynamic else 1.0, use_dynamic_shifting=dynamic, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


def _make_readable(root: pathlib.Path) -> None:
    """755/644 on what save_pretrained wrote (safetensors writes 0600; a shared cache has other readers)."""
    (root / "model_index.json").chmod(0o644)
    for component in _COMPONENTS:
        for dirpath, _dirnames, filenames in os.walk(root / component):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)


def _write(path: str | os.PathLike, seed: int, guidance_embeds: bool, dynamic_shifting: bool) -> pathlib.Path:
    from diffusers import FluxPipeline

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_2 = _build_clip_tokenizer(), _build_t5_tokenizer()
    # A distinct seed per component, spaced by 10 as in the Wan writer, so resizing one never shifts another.
    with wan21._BUILD_LOCK:
        with wan21._seeded(seed * 10 + 1):
            text_encoder = _build_clip_text_encoder(tokenizer)
        with wan21._seeded(seed * 10 + 2):
            text_encoder_2 = _build_t5_encoder(tokenizer_2)
        with wan21._seeded(seed * 10 + 3):
            transformer = _build_transformer(guidance_embeds)
        with wan21._seeded(seed * 10 + 4):
            vae = _build_vae()
    pipe = FluxPipeline(
        scheduler=_build_scheduler(dynamic_shifting), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    with wan21._quiet_progress_bars():
        pipe.save_pretrained(out, safe_serialization=True)
    _make_readable(out)
    return out


def write_tiny_flux(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny FLUX.1 [dev]-style model (guidance embedding, dynamic shifting) to ``path``."""
    return _write(path, seed, guidance_embeds=True, dynamic_shifting=True)


def write_tiny_flux_schnell(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny FLUX.1 [schnell]-style model (no guidance embedding, fixed shift 1) to ``path``."""
    return _write(path, seed, guidance_embeds=False, dynamic_shifting=False)
