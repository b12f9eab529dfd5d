"""Offline writer of a tiny, random-weight Wan2.1 text-to-video model.

The real Wan2.1 checkpoints are tens of gigabytes and live on a model hub that
tests and CI cannot reach.  This module builds a structurally faithful stand-in
in diffusers format -- UMT5 text encoder, T5-style tokenizer, WanTransformer3D
denoiser, Wan VAE and the UniPC flow scheduler Wan2.1 ships with -- small
enough to write in a second or two and to run a full ``WanPipeline`` on CPU.
Nothing here touches the network: the tokenizer is trained locally on an
embedded corpus and every weight comes from a seeded random initialisation, so
the same seed always yields byte-identical files.

Public API:

* :data:`TINY_MODEL_NAME` -- directory name under the model cache.
* :func:`write_tiny_model` -- write the model to a given directory.
* :func:`default_model_dir` -- ``$DIFFMESH_HOME/models/wan2.1-tiny``.
* :func:`ensure_tiny_model` -- write it once, safely under concurrency.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Iterator

import torch

__all__ = [
    "TINY_MODEL_NAME",
    "default_model_dir",
    "ensure_tiny_model",
    "write_tiny_model",
]

TINY_MODEL_NAME = "wan2.1-tiny"

# Vocabulary target; the UMT5 embedding table is sized from the trained
# tokenizer's real size, so this only needs to be roughly right.
_VOCAB_SIZE = 1000
_PAD, _EOS, _UNK = "<pad>", "</s>", "<unk>"
# Sub-directories WanPipeline.save_pretrained writes (transformer_2 is unused).
_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")
# T5 tokenizers have no bos and only append eos; max length matches what
# WanPipeline asks for by default, so truncation warnings never fire.
_MODEL_MAX_LENGTH = 512
# Gain on the cross-attention query/key RMS-norm weights (logits scale by its
# square).  WanPipeline pads every prompt to 512 (its default) zero embeddings
# and passes no mask, so a handful of real tokens compete with ~500 identical padding keys;
# with unit gain the prompt barely moves the output, at 2 it visibly does.
_CROSS_ATTN_QK_GAIN = 2.0
# Seeding works through torch's process-global RNG and default dtype, so two
# threads building at once would interleave draws; serialise them.
_BUILD_LOCK = threading.Lock()

# Embedded English training text for the tokenizer.  Prompt-like sentences so
# typical test prompts ("a cat", "blurry", ...) tokenize into whole words
# rather than characters; its exact content does not matter beyond that, but
# changing it changes the tokenizer and therefore every downstream output.
_CORPUS = """
a cat sitting on a wooden table in the warm afternoon sun
a small dog running across a green field of tall grass
a red fox jumping over a frozen river in the winter forest
an old man walking slowly along a quiet city street at night
a young woman reading a book beside a large window while it rains
two children playing with a blue ball on a sandy beach
a bird flying high above the mountains under a clear sky
a horse galloping through a golden desert at sunset
a boat sailing on the calm ocean with white clouds overhead
a train moving fast through a snowy valley in the early morning
a car driving down a long empty road between dark hills
a bright city skyline with tall buildings and shining lights
a cup of hot coffee with steam rising slowly into the air
a bowl of fresh fruit with apples oranges and bananas
a chef cooking food in a busy kitchen full of noise
a robot dancing in a colorful room with music and lights
a dragon breathing fire over an ancient stone castle
a butterfly resting on a pink flower in a spring garden
a fish swimming in clear water near the coral reef
a bear catching salmon in a fast mountain stream
a panda eating bamboo in a misty green forest
a lion sleeping under a tree on the hot dry savanna
an astronaut floating in space with the earth below
a rocket launching into the sky with smoke and fire
a waterfall falling into a deep blue lake surrounded by rocks
a storm with heavy rain thunder and lightning over the sea
a cozy cabin in the snow with smoke from the chimney
a busy market with people buying vegetables and bread
a musician playing guitar on a small stage at a festival
a dancer spinning gracefully in a long flowing dress
a close up of an eye with a reflection of the moon
a slow motion shot of water drops splashing on glass
a time lapse of clouds moving over a green valley
an aerial view of a winding river through the jungle
a cinematic shot of a knight riding into battle
a cartoon of a happy frog jumping between lily pads
a painting of a quiet village by a lake in autumn
a photo of a vintage car parked beside an old house
a video of waves crashing against the rocky shore
a portrait of a smiling girl with curly brown hair
the camera pans left to reveal a hidden door
the camera zooms in slowly on the face of a sleeping baby
the camera follows a cyclist down a steep hill
the scene is lit by soft golden light and long shadows
the picture is sharp detailed realistic and beautiful
high quality high resolution vivid colors natural motion
low quality blurry noisy distorted ugly bad anatomy
static frame still picture overexposed underexposed
worst quality jpeg artifacts extra fingers deformed hands
messy background crowded scene watermark text subtitles
a white rabbit hiding in the grass near a wooden fence
a black horse standing in the rain beside a barn
a yellow taxi waiting at a red light in the city
a green parrot talking on the shoulder of a pirate
an orange sunset reflected in the windows of a tower
a purple flower opening its petals in the morning light
a gray wolf howling at the full moon on a cold night
a brown owl watching from a branch in the dark woods
a silver airplane flying through thick white clouds
a golden retriever catching a frisbee in the park
people walking through a train station during rush hour
friends laughing together around a campfire under the stars
a teacher writing on a board in front of a class
a doctor talking with a patient in a bright hospital room
a farmer driving a tractor across a wide field of wheat
a painter mixing colors on a palette in a sunny studio
a baby elephant playing with water at the river bank
a kitten chasing a string of yarn across the floor
a turtle walking slowly on the warm sand toward the sea
a monkey swinging from tree to tree in the rainforest
snow falling gently on a quiet street with lamps glowing
leaves blowing in the wind on a cool autumn day
fireworks exploding in the night sky above the harbor
candles burning on a birthday cake in a dark room
ice melting on a window as the spring sun rises
"""


def _build_tokenizer():
    """Train a T5-style byte-pair tokenizer on the embedded corpus."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    # BPE rather than T5's Unigram: on a corpus this small the Unigram trainer
    # stops at ~430 pieces and splits common words into fragments, while BPE
    # reaches the target size with whole-word tokens.  Everything around the
    # model mirrors T5/UMT5's tokenizer.json (Metaspace "▁" word prefix,
    # whitespace squeezing, eos-appending template, no bos), so callers see the
    # same conventions as with the real tokenizer.
    tok = Tokenizer(BPE(unk_token=_UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        # Order fixes the ids: pad=0, eos=1, unk=2, as in T5.
        special_tokens=[_PAD, _EOS, _UNK],
        # Every printable ASCII character is kept as a piece, so words outside
        # the corpus (and upper case) fall back to characters, not <unk>.
        initial_alphabet=[chr(c) for c in range(33, 127)],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.strip().splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {_EOS}",
        pair=f"$A {_EOS} $B {_EOS}",
        special_tokens=[(_EOS, tok.token_to_id(_EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=_PAD,
        eos_token=_EOS,
        unk_token=_UNK,
        model_max_length=_MODEL_MAX_LENGTH,
        padding_side="right",
    )


def _build_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def _variance_preserving_init(model: torch.nn.Module) -> None:
    """Re-draw every linear/conv weight as N(0, 1/fan_in) and zero its bias.

    PyTorch's default init (std ~ 1/sqrt(3 * fan_in) plus random biases)
    shrinks activations by about sqrt(3) per layer; through the VAE's ~20
    convolutions that leaves decoded frames nearly independent of the latents,
    and in the transformer the random biases turn zero-padded text positions
    into keys that drown out the prompt.  Zero biases keep padding at exactly
    zero key and value.  Draws from torch's global RNG, which the caller seeds.
    """
    with torch.no_grad():
        for module in model.modules():
            # WanCausalConv3d subclasses nn.Conv3d, so this covers the VAE too.
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, 1.0 / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.zero_()


def _build_transformer(**overrides):
    """The tiny Wan2.1 transformer; ``overrides`` replace config entries (the Wan2.2 writers use them)."""
    from diffusers import WanTransformer3DModel

    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,  # divisible by 2 and 4, so every gang layout of up to 4 devices can shard heads
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,  # Wan2.1's own: positions for sizes up to 16384 px
    )
    model = WanTransformer3DModel(**{**config, **overrides})
    _variance_preserving_init(model)
    with torch.no_grad():
        for block in model.blocks:
            block.attn2.norm_q.weight.fill_(_CROSS_ATTN_QK_GAIN)
            block.attn2.norm_k.weight.fill_(_CROSS_ATTN_QK_GAIN)
    return model.eval()


def _build_vae(**overrides):
    """The tiny Wan2.1 VAE; ``overrides`` replace config entries (the Wan2.2 VAE's, for TI2V)."""
    from diffusers import AutoencoderKLWan

    config = dict(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    vae = AutoencoderKLWan(**{**config, **overrides})
    _variance_preserving_init(vae)
    return vae.eval()


def _build_scheduler(flow_shift: float = 3.0):
    from diffusers import UniPCMultistepScheduler

    # The scheduler config Wan2.1-T2V ships with (the Wan2.2 writers pass their own shift).
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=flow_shift,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build one component under a fixed seed and float32, leaking neither.

    The model constructors draw from torch's global generator and default
    dtype, so setting those is the only way to make their init deterministic
    and float32; both are restored so callers' own state is untouched.
    """
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bar for a one-shard save."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _make_readable(root: pathlib.Path, components: tuple[str, ...] = _COMPONENTS) -> None:
    """Give what save_pretrained wrote ordinary 755/644 permissions.

    safetensors >= 0.8 writes weights as 0600; the model cache may be shared by
    services running as other users, who must be able to read it.  Only the
    pipeline's own entries are touched, not unrelated files in ``root``.
    """
    (root / "model_index.json").chmod(0o644)
    for component in components:
        for dirpath, _dirnames, filenames in os.walk(root / component):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)


def write_tiny_model(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write the tiny Wan2.1 T2V model in diffusers format to ``path``.

    ``path`` is created if needed; existing files of the same name are
    overwritten.  The same ``seed`` gives byte-identical files.  Returns the
    directory as a :class:`pathlib.Path`.
    """
    from diffusers import WanPipeline

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    # A distinct seed per component, so resizing one never shifts another's
    # weights; spaced by 10 so neighbouring seeds never share a stream.
    with _BUILD_LOCK:
        with _seeded(seed * 10 + 1):
            text_encoder = _build_text_encoder(len(tokenizer))
        with _seeded(seed * 10 + 2):
            transformer = _build_transformer()
        with _seeded(seed * 10 + 3):
            vae = _build_vae()

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_build_scheduler(),
        transformer=transformer,
    )
    with _quiet_progress_bars():
        pipe.save_pretrained(out, safe_serialization=True)
    _make_readable(out)
    return out


def default_model_dir() -> pathlib.Path:
    """Return ``$DIFFMESH_HOME/models/wan2.1-tiny`` (home: ``~/.cache/diffmesh``)."""
    home = os.environ.get("DIFFMESH_HOME") or os.path.join("~", ".cache", "diffmesh")
    return pathlib.Path(home).expanduser() / "models" / TINY_MODEL_NAME


def ensure_tiny_model(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Return a directory holding the tiny model, writing it if absent.

    ``path`` defaults to :func:`default_model_dir`.  The model counts as present
    when ``model_index.json`` exists, and an existing model is never rewritten.
    Safe when several processes or threads call it at once: each writes into a
    private temporary directory beside the target and renames it into place,
    so no reader ever sees a half-written model; losers of the race discard
    theirs and use the winner's.
    """
    target = pathlib.Path(path) if path is not None else default_model_dir()
    if (target / "model_index.json").is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the rename stays on one filesystem and is atomic.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp makes it 0700; readers may be other users (see _make_readable).
        tmp.chmod(0o755)
        write_tiny_model(tmp)
        try:
            # POSIX rename replaces a missing or empty target directory but
            # fails on a non-empty one.
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its copy in first: theirs is complete
            # (rename is atomic) and identical in content, so use it.  A
            # non-empty target without model_index.json is not ours to delete.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
