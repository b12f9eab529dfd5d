"""The attention kernel is the platform's choice, overridable by flag and env, and every choice computes attention."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from services.common import attention as attention_module
from services.common.attention import ATTENTION_ENV, CHOICES, resolve_attention
from services.common.platform import PLATFORMS
from services.common.tiny_model import write_tiny_model
from services.denoiser.engine import DenoiserEngine
from services.families.base import Sampling


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    yield
    attention_module._current = None


def test_auto_is_the_platforms_default_and_flag_beats_env(monkeypatch):
    cpu = PLATFORMS["cpu"]
    assert resolve_attention(cpu).name == cpu.attention
    assert resolve_attention(dataclasses.replace(cpu, attention="math")).name == "math"
    monkeypatch.setenv(ATTENTION_ENV, "efficient")
    assert resolve_attention(cpu).name == "efficient"
    assert resolve_attention(cpu, "flash").name == "flash"
    for kind in ("xpu", "cuda", "cpu"):         # every platform's default is a valid choice
        assert PLATFORMS[kind].attention in CHOICES


def test_a_chosen_kernel_goes_first_and_the_rest_stay_as_fallbacks():
    choice = resolve_attention(PLATFORMS["cpu"], "math")
    assert choice.sdpa_order[0] == SDPBackend.MATH
    assert sorted(map(int, choice.sdpa_order)) == list(range(5))
    with choice.scope():
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.MATH)
    assert resolve_attention(PLATFORMS["cpu"], "native").sdpa_order is None


def test_unknown_or_missing_kernels_fail_naming_them():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'.*expected one of"):
        resolve_attention(PLATFORMS["cpu"], "fast")
    with pytest.raises(ValueError, match="'sage' needs the 'sageattention' package"):
        resolve_attention(PLATFORMS["cpu"], "sage")
    assert resolve_attention.__module__ == "services.common.attention"


def test_flash_attention_4_needs_its_package_and_flash_attn_2_is_not_fa4s_namespace(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'flash-attn-4' needs the 'flash_attn.cute.interface' module"):
        resolve_attention(PLATFORMS["cpu"], "flash-attn-4")
    # FlashAttention 4's wheel installs flash_attn/ as a namespace package holding only cute/.
    fake_fa4_package(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="'flash-attn' needs the 'flash_attn_2_cuda' package"):
        resolve_attention(PLATFORMS["cpu"], "flash-attn")
    choice = resolve_attention(PLATFORMS["cpu"], "flash-attn-4")
    assert (choice.flash_impl, choice.sdpa_order[0], choice.lossy) == ("diffmesh-FA4", SDPBackend.FLASH_ATTENTION,
                                                                      False)
    assert (choice.kernel, choice.short_kernel, choice.long_from) == ("flash", "cudnn", 16384)


def fake_fa4_package(tmp_path, monkeypatch) -> None:
    """flash-attn-4's layout (flash_attn/ a namespace package holding only cute/), importable, kernels absent."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "cute" / "interface.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize(("capability", "installed", "expected"), [
    ((9, 0), True, "flash-attn-4"),         # Hopper (H100, H200) with FA4 installed
    ((10, 0), True, "flash-attn-4"),        # Blackwell
    ((9, 0), False, "native"),              # not installed: PyTorch's own, nothing to fail
    ((8, 0), True, "native"),               # Ampere: FA4 does not serve it
    ((12, 0), True, "native"),              # consumer Blackwell (sm_120): not FA4's
])
def test_auto_takes_flash_attention_4_on_hopper_and_blackwell_where_installed(capability, installed, expected,
                                                                               tmp_path, monkeypatch):
    """CUDA faked (no GPU here): the platform layer's list for `auto`, resolved against what is installed."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    for name in [name for name in sys.modules if name.split(".")[0] == "flash_attn"]:   # another test's stand-in
        monkeypatch.delitem(sys.modules, name)
    if installed:
        fake_fa4_package(tmp_path, monkeypatch)
    choice = resolve_attention(PLATFORMS["cuda"])
    assert choice.name == expected
    if expected == "flash-attn-4":
        assert (choice.flash_impl, choice.short_kernel, choice.long_from) == ("diffmesh-FA4", "cudnn", 16384)
    # Named, the platform's list does not matter; elsewhere auto is the platform's own pick.
    assert resolve_attention(PLATFORMS["cuda"], "cudnn").name == "cudnn"
    assert PLATFORMS["xpu"].auto_attention() == (PLATFORMS["xpu"].attention,)
    assert PLATFORMS["cpu"].auto_attention() == (PLATFORMS["cpu"].attention,)


def test_a_flash_impl_choice_activates_it_in_pytorchs_registry_and_others_restore_pytorchs(monkeypatch):
    """Through PyTorch's real registry, with an implementation registered for the test: the choice's scope makes it
    PyTorch's flash kernel, and any other choice's scope puts PyTorch's own back (one process, many choices, as
    bench/attention.py runs them)."""
    registry = torch.nn.attention
    activations: list[str] = []

    class Handle:
        def remove(self) -> None:
            activations.append("removed")

    def register() -> Handle:
        activations.append("activated")
        return Handle()

    registry.register_flash_attention_impl("DIFFMESH_TEST", register_fn=register)
    monkeypatch.setitem(attention_module.FLASH_IMPLS, "test-flash",
                        attention_module.FlashImpl("torch", "DIFFMESH_TEST"))
    monkeypatch.setattr(attention_module, "CHOICES", (*attention_module.CHOICES, "test-flash"))
    try:
        choice = resolve_attention(PLATFORMS["cpu"], "test-flash")
        with choice.scope():
            assert registry.current_flash_attention_impl() == "DIFFMESH_TEST"
            assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.FLASH_ATTENTION)
        with choice.scope():        # already active: not activated again
            pass
        assert activations == ["activated"]
        with resolve_attention(PLATFORMS["cpu"], "native").scope():
            assert registry.current_flash_attention_impl() is None
        assert activations == ["activated", "removed"]
    finally:
        registry.restore_flash_attention_impl(_raise_warn=False)
        registry._registry._FLASH_ATTENTION_IMPLS.pop("DIFFMESH_TEST", None)


def test_pytorchs_fa4_glue_takes_any_flash_attn_4_release_through_diffmesh_s_adapter(monkeypatch):
    """PyTorch's FA4 glue unpacks `_flash_attn_fwd` as (out, lse); flash-attn-4 from 4.0.0b19 returns five values.
    With a stand-in FA4 module of today's shape, the adapter PyTorch's glue is pointed at hands it the pair."""
    fa4_glue = pytest.importorskip("services.common.fa4_glue")
    torch_glue = pytest.importorskip("torch.nn.attention._fa4")
    calls = []

    def fa4_forward(query, key, value, **kwargs):
        calls.append(kwargs["return_lse"])
        return query * 2, torch.ones(3), None, None, None     # out, lse, p, row_max, o_lo

    interface = type(sys)("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fa4_forward, lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, fa4_glue.FA4_MODULE, interface)
    registry = torch.nn.attention
    assert fa4_glue.offer() and fa4_glue.REGISTRY_NAME in registry.list_flash_attention_impls()
    try:
        registry.activate_flash_attention_impl(fa4_glue.REGISTRY_NAME)
        query = torch.randn(1, 4, 2, 8)
        out, lse = torch_glue._fa4_run_forward(query, query, query, None, None, None, None, None, False, None, None,
                                               None)
        torch.testing.assert_close(out, query * 2)
        assert lse.shape == (3,) and calls == [True]
    finally:
        registry.restore_flash_attention_impl(_raise_warn=False)


@pytest.mark.parametrize("name", ["native", "math", "flash"])
def test_every_cpu_choice_computes_attention(name):
    q, k, v = (torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    choice = resolve_attention(PLATFORMS["cpu"], name)
    with choice.scope():
        got = choice(q, k, v)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def _recording_backend(traced: list[set[str]]):
    """A torch.compile backend that runs each graph as traced (aot_eager) and records the ops its forward calls."""
    from torch._functorch.aot_autograd import aot_module_simplified

    def backend(graph_module, example_inputs):
        def forward_compiler(graph, inputs):
            traced.append({str(node.target) for node in graph.graph.nodes if node.op == "call_function"})
            return graph
        return aot_module_simplified(graph_module, example_inputs, fw_compiler=forward_compiler)
    return backend


def test_a_compiled_graph_names_the_chosen_kernel_whatever_was_traced_before():
    """A graph traced through F.scaled_dot_product_attention keeps whatever kernel tracing picked (here not even the
    scope's first choice: tracing ignores the priority order) and no guard retraces it under another choice; a named
    choice puts its own op in the graph instead."""
    traced: list[set[str]] = []
    recording_backend = _recording_backend(traced)

    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    plain = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend=recording_backend)
    with torch.inference_mode():
        with resolve_attention(PLATFORMS["cpu"], "math").scope():
            plain(q, k, v)
        with resolve_attention(PLATFORMS["cpu"], "flash").scope():
            plain(q, k, v)
    assert len(traced) == 1 and "aten.bmm.default" not in traced[0]   # not math's kernel, and one graph for both
    for name, op in (("flash", "aten._scaled_dot_product_flash_attention_for_cpu.default"),
                     ("math", "aten.bmm.default")):                  # math's op traces into its matmuls
        torch._dynamo.reset()
        traced.clear()
        choice = resolve_attention(PLATFORMS["cpu"], name)
        with torch.inference_mode(), choice.scope():
            got = torch.compile(lambda q, k, v: choice(q, k, v), backend=recording_backend)(q, k, v)
        assert any(op in graph for graph in traced), (name, traced)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_a_choice_with_a_short_kernel_takes_it_below_its_length_and_its_own_from_there():
    """As `flash-attn-4` does (cuDNN below 16,384 keys), here on CPU: math below 64 keys, flash from 64 on; each
    compiled graph names the kernel its length takes, and both compute attention."""
    traced: list[set[str]] = []
    recording_backend = _recording_backend(traced)

    choice = attention_module.AttentionChoice("test", kernel="flash", short_kernel="math", long_from=64)
    for tokens, op in ((16, "aten.bmm.default"), (64, "aten._scaled_dot_product_flash_attention_for_cpu.default")):
        q, k, v = (torch.randn(1, 2, tokens, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
        torch._dynamo.reset()
        traced.clear()
        with torch.inference_mode():
            got = torch.compile(lambda q, k, v: choice(q, k, v), backend=recording_backend)(q, k, v)
        assert len(traced) == 1 and op in traced[0], (tokens, traced)
        assert ("aten._scaled_dot_product_flash_attention_for_cpu.default" in traced[0]) == (tokens >= 64)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_the_denoiser_runs_the_chosen_kernel(tmp_path, monkeypatch):
    """The engine's steps run inside the choice's scope, one scope per step; a kernel PyTorch does not pick by
    itself on CPU (math) leaves the latents within float32 rounding of the default's."""
    from services.common.models import resolve_model_dir
    from services.encoder.engine import EncodeParams, EncoderEngine

    cpu = PLATFORMS["cpu"]
    model = resolve_model_dir(write_tiny_model(tmp_path / "wan"))
    tensors = EncoderEngine(model, cpu).encode(EncodeParams("r", "a cat", "", 5.0))
    params = Sampling("r", 32, 32, 1, 2, 5.0, 3)
    seen: list[str] = []
    real_scope = attention_module.AttentionChoice.scope

    def spy(self):
        seen.append(self.name)
        return real_scope(self)

    monkeypatch.setattr(attention_module.AttentionChoice, "scope", spy)
    latents = {}
    for name in ("native", "math"):
        attention_module.set_attention(cpu, name)
        latents[name] = DenoiserEngine(model, cpu).denoise(params, tensors)
    assert seen == ["native", "native", "math", "math"]
    torch.testing.assert_close(latents["math"], latents["native"], atol=1e-4, rtol=1e-4)
