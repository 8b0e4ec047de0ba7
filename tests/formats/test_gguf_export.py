"""GGUF export: draftlm's reader, the gguf package's reader and HF transformers' GGUF loader
all get the exported model back with the same logits and tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
import torch
from gguf_files import tiny_config, tiny_model, write_gguf

from draftlm.errors import DraftlmError
from draftlm.formats.gguf import gguf_name, read_gguf
from draftlm.formats.gguf_export import save_gguf

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))


def exported(tmp_path: Path, arch: str, tensor_type: str = "f32") -> tuple:
    """(model, path of its export): a tiny model with its tokenizer from a source file."""
    model = tiny_model(tiny_config(arch), seed=3)
    source = tmp_path / f"source-{arch}.gguf"
    write_gguf(source, tiny_model(tiny_config(arch), seed=9), arch=arch)
    path = save_gguf(tmp_path / f"draft-{arch}-{tensor_type}.gguf", model.config,
                     model.state_dict(), source, tensor_type=tensor_type)
    return model, path, source


def logits_of(ckpt) -> torch.Tensor:
    from draftlm.model import Transformer

    model = Transformer(ckpt.config).eval()
    model.load_state_dict(ckpt.tensors, strict=not ckpt.config.tie_embeddings)
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_draftlm_reads_back_the_same_model_and_tokenizer(tmp_path, arch) -> None:
    model, path, source = exported(tmp_path, arch)
    ckpt = read_gguf(path, progress=False)
    assert ckpt.config.n_layers == model.config.n_layers
    assert ckpt.config.qkv_bias == model.config.qkv_bias
    with torch.no_grad():
        torch.testing.assert_close(logits_of(ckpt), model(IDS), atol=1e-5, rtol=1e-5)
    original = read_gguf(source, progress=False).tokenizer
    for text in ("hello the world", "<|im_start|>in the<|im_end|>"):
        assert ckpt.tokenizer.encode(text) == original.encode(text)
    assert ckpt.tokenizer.chat_template == original.chat_template


def test_the_gguf_reader_sees_llama_cpps_names_types_and_layout(tmp_path) -> None:
    _, path, source = exported(tmp_path, "llama", "q8_0")
    reader = gguf.GGUFReader(str(path))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" in kinds  # llama: untied head
    src = gguf.GGUFReader(str(source))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.pre"):
        assert reader.fields[key].contents() == src.fields[key].contents()
        assert reader.fields[key].types == src.fields[key].types


def test_quantized_export_stays_close(tmp_path) -> None:
    model, path, _ = exported(tmp_path, "qwen2", "q8_0")
    with torch.no_grad():
        ref = model(IDS)
    got = logits_of(read_gguf(path, progress=False))
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_input_is_one_line(tmp_path) -> None:
    model, _, source = exported(tmp_path, "llama")
    with pytest.raises(DraftlmError, match="unknown GGUF tensor type"):
        save_gguf(tmp_path / "x.gguf", model.config, model.state_dict(), source,
                  tensor_type="q3")
    small = tiny_model(tiny_config("llama", spm=True))
    other = tmp_path / "spm.gguf"
    write_gguf(other, small, spm=True)
    with pytest.raises(DraftlmError, match="not this model's tokenizer"):
        save_gguf(tmp_path / "y.gguf", model.config, model.state_dict(), other)
    with pytest.raises(DraftlmError, match="has no GGUF name"):
        gguf_name("layers.0.self_attn.qkv_proj.weight")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="HF transformers (the dev extra) is not installed")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_transformers_loads_the_export_with_equal_logits(tmp_path, arch) -> None:
    from transformers import AutoModelForCausalLM

    model, path, _ = exported(tmp_path, arch)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS), atol=1e-4, rtol=1e-4)


def test_a_truncated_head_is_written_whole(tmp_path) -> None:
    """Rows of the head's tokens keep their weights, the others are zero."""
    from draftlm.model import Transformer
    from draftlm.training.draft import prune

    model, _, source = exported(tmp_path, "llama")
    ids = torch.tensor([0, 5, 17, 100, 263])
    draft = prune(model, [1], ids)
    path = save_gguf(tmp_path / "trunc.gguf", draft.config, draft.state_dict(), source,
                     tensor_type="f32")
    ckpt = read_gguf(path, progress=False)
    head = ckpt.tensors["lm_head.weight"]
    assert head.shape[0] == model.config.vocab_size and ckpt.config.n_layers == 1
    torch.testing.assert_close(head[ids], draft.lm_head.weight)
    assert head[[1, 2, 3]].abs().sum() == 0
    full = Transformer(ckpt.config).eval()
    full.load_state_dict(ckpt.tensors)
    with torch.no_grad():
        torch.testing.assert_close(full(IDS)[..., ids], draft(IDS), atol=1e-5, rtol=1e-5)
