"""Quantized linear layers: close to the float layer, batch-invariant (int8), and a
quantized target keeps greedy speculative decoding equal to greedy AR token for token."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import make_tiny_lm, needs_cpp_compiler

from draftlm.cli import main
from draftlm.errors import DraftlmError
from draftlm.formats.hf import save_hf_folder
from draftlm.generate import generate
from draftlm.load import LM, load
from draftlm.quant import layers as quantize
from draftlm.quant.layers import Int4Linear, Int8Linear, quantize_model
from draftlm.speculative.drafters import ModelDrafter, NgramDrafter

PROMPT = "def add(a, b):\n    return a + b\n\ndef add"


def random_linear(in_f: int = 256, out_f: int = 96, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())  # inputs come from no_grad or plain tensors


@pytest.fixture(params=["draftlm", "fbgemm"])
def int8_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Int8Linear's two kernels: draftlm's weight-only one, and fbgemm where it cannot be
    built."""
    if request.param == "fbgemm":
        monkeypatch.setattr(quantize, "cpu_kernels_available", lambda: False)
    elif not quantize.cpu_kernels_available():
        pytest.skip("draftlm's CPU kernels cannot be built here")
    return request.param


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_close_to_the_float_layer(bias: bool, int8_kernel: str) -> None:
    lin = random_linear(bias=bias)
    x = torch.randn(5, 3, 256)
    layer = Int8Linear(lin)
    assert layer.kernel == int8_kernel
    with torch.no_grad():
        error = relative_error(layer(x), lin(x))
    assert error < (0.01 if int8_kernel == "draftlm" else 0.02)  # 8-bit vs 7-bit weights


def test_int8_activations_cost_almost_nothing_beside_the_weights(int8_kernel: str) -> None:
    """draftlm's kernel keeps activations in float; fbgemm's two-part activations (8-bit row
    + 8-bit residual) are ~16-bit. Either way the layer's error is its weights' error, even
    for a row with one large outlier."""
    lin = random_linear(bias=False)
    layer = Int8Linear(lin)
    w = lin.weight.detach()
    top = Int8Linear.WEIGHT_MAX if int8_kernel == "draftlm" else Int8Linear.FBGEMM_WEIGHT_MAX
    scale = w.abs().amax(1, keepdim=True) / top
    weights_only = nn.Linear(256, 96, bias=False)
    weights_only.weight.data = (w / scale).round() * scale
    x = torch.randn(4, 256)
    x[:, 7] = 60.0  # an outlier channel: one 8-bit step per row would be ~0.5
    with torch.no_grad():
        assert relative_error(layer(x), weights_only(x)) < (1e-6 if int8_kernel == "draftlm"
                                                             else 2e-4)
        assert relative_error(layer(x), lin(x)) > 1e-3  # the weights' own error remains


def test_int8_rows_do_not_depend_on_the_batch(int8_kernel: str) -> None:
    """fbgemm quantizes a batch with one scale (the per-row pinning makes each row exact);
    draftlm's kernel computes each row with the same instructions at any batch size."""
    layer = Int8Linear(random_linear())
    x = torch.randn(6, 256)
    x[2] *= 100  # one row with a much larger range must not change the others
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(6)])
    assert torch.equal(together, alone)


def test_int8_keeps_the_input_dtype() -> None:
    layer = Int8Linear(random_linear())
    assert layer(torch.randn(2, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_is_close_to_the_float_layer(bias: bool) -> None:
    lin = random_linear(bias=bias)
    x = torch.randn(4, 256)
    with torch.no_grad():
        error = relative_error(Int4Linear(lin)(x), lin(x))
    assert error < 0.15  # 16 levels per group of 32


def test_int4_needs_whole_groups() -> None:
    with pytest.raises(DraftlmError, match="divisible by 32"):
        Int4Linear(nn.Linear(40, 8))


def test_int4_torch_kernel_needs_whole_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantize, "cpu_kernels_available", lambda: False)
    with pytest.raises(DraftlmError, match="out_features divisible by 16"):
        Int4Linear(nn.Linear(64, 8))


def test_unknown_mode_is_a_clear_error(tiny_lm: LM) -> None:
    with pytest.raises(DraftlmError, match="unknown --quantize 'int3'"):
        quantize_model(tiny_lm.model, "int3")


def quantized_tiny(mode: str, seed: int = 0) -> LM:
    lm = make_tiny_lm(seed, eos_ids=())
    lm.tokenizer.eos_ids = ()
    quantize_model(lm.model, mode)
    return lm


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_linear_is_replaced_and_logits_stay_close(mode: str) -> None:
    plain = make_tiny_lm(0)
    # Trained-model-like weights (the fixture's std 0.5 makes a chaotic random network).
    plain.model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    quant = copy.deepcopy(plain)
    quantize_model(quant.model, mode)
    assert not any(isinstance(m, nn.Linear) for m in quant.model.modules())
    ids = torch.tensor([list(PROMPT.encode())])
    with torch.no_grad():
        ref, got = plain.model(ids), quant.model(ids)
    assert relative_error(got, ref) < (0.05 if mode == "int8" else 0.3)
    assert quant.quantization == mode


def test_int4_mixed_keeps_the_head_and_what_a_file_stores_above_4_bits_in_int8() -> None:
    """As llama.cpp's Q4_K_M: layers with stored 4-bit codes stay 4-bit, a fused layer
    with a part the file keeps in more bits goes to int8, the head is always int8."""
    from draftlm.quant.int4 import Int4Groups

    lm = make_tiny_lm(0)
    model = lm.model
    layer0 = model.layers[0]
    stored = {f"layers.0.{part}.weight": Int4Groups.quantize(lin.weight.detach())
              for part, lin in (("self_attn.q_proj", layer0.self_attn.q_proj),
                                ("self_attn.k_proj", layer0.self_attn.k_proj),
                                ("mlp.gate_proj", layer0.mlp.gate_proj),
                                ("mlp.up_proj", layer0.mlp.up_proj))}
    quantize_model(model, "int4-mixed", stored)
    assert isinstance(model.layers[0].mlp.gate_up_proj, Int4Linear)  # both parts stored
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int8Linear)  # v_proj is not
    assert isinstance(model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)
    plain = make_tiny_lm(0).model
    quantize_model(plain, "int4-mixed")  # a float checkpoint: 4-bit but for the head
    assert isinstance(plain.lm_head, Int8Linear)
    assert isinstance(plain.layers[1].mlp.down_proj, Int4Linear)


def test_int8_verify_pass_equals_one_token_steps_bit_for_bit() -> None:
    """The property that makes quantized speculative decoding exact: a multi-token pass over
    the cache gives each token the logits a one-token decode step would."""
    model = quantized_tiny("int8").model
    ids = torch.tensor([list(PROMPT.encode())])
    model.setup_cache(1, 128)
    with torch.no_grad():
        model(ids[:, :20], start_pos=0)
        together = model(ids[:, 20:26], start_pos=20)
        model.rollback(20)
        steps = [model(ids[:, i : i + 1], start_pos=i) for i in range(20, 26)]
    assert torch.equal(together, torch.cat(steps, dim=1))


@pytest.mark.parametrize("k", [2, 5])
def test_int8_target_greedy_speculative_equals_greedy_ar(k: int) -> None:
    target = quantized_tiny("int8")
    draft = quantized_tiny("int8", seed=0)
    with torch.no_grad():  # a draft that disagrees sometimes
        for param in draft.model.parameters():
            param.add_(torch.randn_like(param) * 0.02 * param.std())
    expected = generate(target, PROMPT, max_new_tokens=40).token_ids
    got = generate(target, PROMPT, max_new_tokens=40,
                   drafter=ModelDrafter(draft, target, k, adaptive=False))
    assert got.token_ids == expected
    assert got.stats["target_forwards"] < 40
    ngram = generate(target, PROMPT, max_new_tokens=40, drafter=NgramDrafter(2, k))
    assert ngram.token_ids == expected


def test_load_and_cli_take_quantize(tmp_path, capsys) -> None:
    lm = make_tiny_lm(0)
    save_hf_folder(tmp_path / "m", lm.config, dict(lm.model.state_dict()), lm.tokenizer)
    assert load(tmp_path / "m", dtype="float32", quantize="int8").quantization == "int8"
    with pytest.raises(DraftlmError, match="unknown quantize"):
        load(tmp_path / "m", quantize="fp8")
    assert main(["generate", "--model", str(tmp_path / "m"), "--quantize", "int8",
                 "--max-new-tokens", "5", "--json", "--ngram", "2", "hello"]) == 0
    assert '"num_new_tokens": 5' in capsys.readouterr().out


def test_a_quantized_model_is_not_saved(tmp_path) -> None:
    lm = quantized_tiny("int8")
    with pytest.raises(DraftlmError, match="cannot save a quantized model"):
        save_hf_folder(tmp_path / "q", lm.config, lm.model, lm.tokenizer)
    assert not (tmp_path / "q").exists()


def test_fbgemm_packed_weights_are_freed_with_their_layer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    monkeypatch.setattr(quantize, "cpu_kernels_available", lambda: False)
    layer = Int8Linear(nn.Linear(64, 32))
    handle = layer._handle
    assert handle in quantize._PACKED
    del layer
    gc.collect()
    assert handle not in quantize._PACKED


@pytest.mark.slow
@needs_cpp_compiler
def test_int8_layer_compiles_to_the_same_bits(int8_kernel: str) -> None:
    """torch.compile reaches either kernel through an opaque op (draftlm_cpu's, or the
    draftlm::int8_linear custom op around fbgemm)."""
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(96, 48, bias=True))
    x = torch.randn(3, 96)
    with torch.inference_mode():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, dynamic=True)(x)
    assert torch.equal(eager, compiled)
