"""The gang reads each family's ParallelPlan: a layout the model cannot take fails at start-up naming the model
and its numbers, and a family without a plan (or without TP) is refused before anything loads."""

from __future__ import annotations

import pytest
import torch

from services.common.models import resolve_model_dir
from services.common.tiny import write_tiny
from services.denoiser.axes import AxisGroup
from services.denoiser.gang.engine import check_gang_model
from services.denoiser.gang.layout import GangLayout, LayoutError


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return resolve_model_dir(write_tiny(tmp_path_factory.mktemp("m") / "wan-tiny", "wan"))


def test_the_wan_plan_declares_its_heads_and_widths(wan):
    plan = check_gang_model(wan, GangLayout(ulysses=2, tp=2))
    assert plan.heads == 4 and dict(plan.tp_widths) == {"ffn_dim": 32}
    assert plan.tensor_parallel is not None


def test_a_layout_the_model_cannot_take_names_the_model_and_its_numbers(wan):
    with pytest.raises(LayoutError) as raised:
        check_gang_model(wan, GangLayout(ulysses=8))
    assert "wan-tiny" in str(raised.value) and "4 attention heads" in str(raised.value)
    with pytest.raises(LayoutError, match="wan-tiny: the model has 4 attention heads, not divisible by .* tp 3"):
        check_gang_model(wan, GangLayout(tp=3))


def test_a_family_without_a_plan_is_refused_before_loading(wan, monkeypatch):
    # Every served family has a plan now; a family's default (Family.parallel_plan) is None.
    from services.families.base import Family
    from services.families.wan import WanFamily

    monkeypatch.setattr(WanFamily, "parallel_plan", Family.parallel_plan)
    with pytest.raises(LayoutError, match="does not split this .* model yet; serve it on one device"):
        check_gang_model(wan, GangLayout(ulysses=2))


# Every Wan variant has the plan: Wan2.1 I2V (image cross-attention), Wan2.2 A14B T2V and I2V (two experts),
# TI2V-5B (per-token timesteps) in its WanPipeline directory and as a WanImageToVideoPipeline.
WAN_VARIANTS = ["wan-i2v", "wan2.2", "wan2.2-i2v", "wan2.2-ti2v", "wan2.2-ti2v-i2v"]


@pytest.mark.parametrize("family", WAN_VARIANTS)
def test_every_wan_variant_has_a_plan_read_from_its_config(tmp_path, family):
    model = resolve_model_dir(write_tiny(tmp_path / family, family))
    config = model.config("transformer")
    plan = check_gang_model(model, GangLayout(ulysses=2, tp=2))
    assert plan.heads == config["num_attention_heads"] and dict(plan.tp_widths) == {"ffn_dim": config["ffn_dim"]}
    assert plan.tensor_parallel is not None
    with pytest.raises(LayoutError, match=f"{family}: the model has 4 attention heads, not divisible by ulysses 8"):
        check_gang_model(model, GangLayout(ulysses=8))


def test_experts_of_other_widths_must_both_divide(tmp_path):
    """Two experts that differ: the layout must split each (the gang loads both through the plan)."""
    import json

    model_dir = write_tiny(tmp_path / "wan2.2-uneven", "wan2.2")
    config_file = model_dir / "transformer_2" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "ffn_dim": 33, "num_attention_heads": 6}))
    model = resolve_model_dir(model_dir)
    plan = check_gang_model(model, GangLayout(ulysses=2))
    assert plan.heads == 2 and dict(plan.tp_widths) == {"ffn_dim": 32, "transformer_2 ffn_dim": 33}
    with pytest.raises(LayoutError, match="the model has 2 attention heads, not divisible by ulysses 4"):
        check_gang_model(model, GangLayout(ulysses=4))
    with pytest.raises(LayoutError, match="wan2.2-uneven: the model.s transformer_2 ffn_dim 33 is not divisible by tp"):
        check_gang_model(model, GangLayout(tp=2))


@pytest.mark.parametrize("index", [0, 1])
def test_wan_i2v_tensor_parallel_shards_the_image_keys_like_the_text_keys(tmp_path, index):
    """Each TP rank reads its slice of add_k_proj / add_v_proj / norm_added_k, on the same heads as to_k / to_v /
    norm_k, and every parameter lands on the device (none left on the meta device it was built on)."""
    from safetensors.torch import load_file

    from services.denoiser.gang.tensor_parallel import ShardedRMSNorm
    from services.families.wan_parallel import load_wan_sharded

    model = resolve_model_dir(write_tiny(tmp_path / "wan-i2v", "wan-i2v"))
    tp = AxisGroup(group=None, ranks=[0, 1], index=index)
    sharded = load_wan_sharded(model.component_class("transformer"), model.path / "transformer", tp,
                               torch.float32, torch.device("cpu"))
    whole = load_file(model.path / "transformer" / "diffusion_pytorch_model.safetensors")
    attn = sharded.blocks[1].attn2
    assert attn.heads == 2 and isinstance(attn.norm_added_k, ShardedRMSNorm)
    for name in ("to_k", "add_k_proj", "add_v_proj", "norm_added_k"):
        half = whole[f"blocks.1.attn2.{name}.weight"].chunk(2, dim=0)[index]
        assert torch.equal(getattr(attn, name).weight, half), name
    assert all(p.device.type == "cpu" for p in sharded.parameters())
