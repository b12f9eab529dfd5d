"""The gang reads each family's ParallelPlan: a layout the model cannot take fails at start-up naming the model
and its numbers, and a family without a plan (or without TP) is refused before anything loads."""

from __future__ import annotations

import pytest

from services.common.models import resolve_model_dir
from services.common.tiny import write_tiny
from services.denoiser.gang.engine import check_gang_model
from services.denoiser.gang.layout import GangLayout, LayoutError


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return resolve_model_dir(write_tiny(tmp_path_factory.mktemp("m") / "wan-tiny", "wan"))


def test_the_wan_plan_declares_its_heads_and_widths(wan):
    plan = check_gang_model(wan, GangLayout(ulysses=2, tp=2))
    assert plan.heads == 4 and dict(plan.tp_widths) == {"ffn_dim": 32}
    assert plan.tensor_parallel is not None and plan.one_device is not None


def test_a_layout_the_model_cannot_take_names_the_model_and_its_numbers(wan):
    with pytest.raises(LayoutError) as raised:
        check_gang_model(wan, GangLayout(ulysses=8))
    assert "wan-tiny" in str(raised.value) and "4 attention heads" in str(raised.value)
    with pytest.raises(LayoutError, match="wan-tiny: the model has 4 attention heads, not divisible by .* tp 3"):
        check_gang_model(wan, GangLayout(tp=3))


@pytest.mark.parametrize("family", ["flux", "wan-i2v", "wan2.2-ti2v"])
def test_families_without_a_plan_are_refused_before_loading(tmp_path, family):
    model = resolve_model_dir(write_tiny(tmp_path / family, family))
    with pytest.raises(LayoutError, match="does not split this .* model yet; serve it on one device"):
        check_gang_model(model, GangLayout(ulysses=2))
