"""Activation statistics for the 4-bit search: what they measure, their cache, when they run."""

from __future__ import annotations

import torch
import torch.nn as nn
from helpers import make_tiny_lm

from draftlm.formats.hf import save_hf_folder
from draftlm.quant.calibrate import (
    CALIBRATION_MODULES,
    activation_importance,
    cached_importance,
    calibration_windows,
)
from draftlm.quant.layers import Int4Linear, quantize_model


def test_importance_is_the_mean_squared_input_of_each_linear() -> None:
    lm = make_tiny_lm(0)
    windows = [torch.tensor([list(b"def f(x):\n    return x\n")]), torch.tensor([list(b"ab")])]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].reshape(
            -1, args[0].shape[-1]))) for name, m in lm.model.named_modules()
        if isinstance(m, nn.Linear)]
    importance = activation_importance(lm.model, windows)
    for h in hooks:
        h.remove()
    assert set(importance) == {n for n, m in lm.model.named_modules() if isinstance(m, nn.Linear)}
    for name, inputs in seen.items():
        rows = torch.cat(inputs)  # every row of every window, weighted alike
        assert torch.allclose(importance[name], (rows * rows).mean(0), rtol=1e-5)


def test_calibration_text_is_the_start_of_each_module() -> None:
    lm = make_tiny_lm(0)
    windows = calibration_windows(lm.tokenizer, num_tokens=8 * len(CALIBRATION_MODULES))
    assert len(windows) == len(CALIBRATION_MODULES)
    assert all(w.shape == (1, 8) for w in windows)


def test_cache_is_reused_and_follows_the_source(tmp_path, monkeypatch) -> None:
    lm = make_tiny_lm(0)
    source = tmp_path / "m"
    save_hf_folder(source, lm.config, dict(lm.model.state_dict()), lm.tokenizer)
    first = cached_importance(lm.model, lm.tokenizer, source, cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "importance").glob("*.safetensors"))) == 1
    calls = []
    monkeypatch.setattr("draftlm.quant.calibrate.activation_importance",
                        lambda *a: calls.append(a) or {})
    again = cached_importance(lm.model, lm.tokenizer, source, cache=tmp_path / "cache")
    assert not calls and all(torch.equal(first[k], again[k]) for k in first)
    (source / "config.json").write_text((source / "config.json").read_text() + "\n")
    cached_importance(lm.model, lm.tokenizer, source, cache=tmp_path / "cache")
    assert len(calls) == 1  # a changed checkpoint is measured again


def test_quantize_model_measures_only_when_it_quantizes_floats_to_4_bits(monkeypatch) -> None:
    calls = []

    def importance() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {}

    quantize_model(make_tiny_lm(0).model, "int8", importance=importance)
    assert not calls
    model = make_tiny_lm(0).model
    rows = {name: m.out_features for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    torch.manual_seed(0)
    stats = {name: torch.rand(m.in_features) for name, m in model.named_modules()
             if isinstance(m, nn.Linear)}
    recorded = []
    original = Int4Linear.__init__

    def spy(self, linear, importance=None):
        recorded.append((linear.out_features, importance))
        original(self, linear, importance)

    monkeypatch.setattr(Int4Linear, "__init__", spy)
    quantize_model(model, "int4", importance=lambda: calls.append(1) or stats)
    assert calls == [1]
    assert all(imp is not None for _, imp in recorded)
    # The fused q/k/v layer, and only it, takes the statistics of its shared input (q_proj's).
    qkv_rows = sum(rows[f"layers.0.self_attn.{p}_proj"] for p in "qkv")
    q_stats = stats["layers.0.self_attn.q_proj"]
    assert [n for n, imp in recorded if imp is q_stats] == [qkv_rows]
