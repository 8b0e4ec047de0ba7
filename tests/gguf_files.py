"""Tiny GGUF files that tests write themselves: a small Llama or Qwen2 model with a byte-level
BPE or a SentencePiece vocabulary, stored as F32 or quantized blocks through the `gguf`
writer, laid out exactly as llama.cpp's converter lays out a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from draftlm.config import ModelConfig
from draftlm.formats.gguf import gguf_name, permute_qk, unpermute_qk
from draftlm.formats.gguf_tokenizer import bytes_to_unicode
from draftlm.model import Transformer

Q = gguf.GGMLQuantizationType

# ---- tiny vocabularies ------------------------------------------------------------------
BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in"]
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_TOKENS = BYTE_CHARS + ["Ġt", "he", "Ġthe", "in", "Ġin"] + BPE_SPECIALS + ["<think>"]
BPE_TYPES = [1] * 261 + [3, 3, 3, 4]
EOT, IM_START, IM_END, THINK = 261, 262, 263, 264

SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo",
              "▁hello", "▁w", "or", "▁wor", "ld", "▁world"]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
# Longer pieces score higher, so SentencePiece merges toward them.
SPM_SCORES = [0.0] * 259 + [float(len(p)) - i / 100 for i, p in enumerate(SPM_PIECES)]
CHAT = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"


def tiny_config(arch: str, spm: bool = False) -> ModelConfig:
    vocab = len(SPM_TOKENS) if spm else len(BPE_TOKENS)
    base = ModelConfig.from_name("tiny").with_(name="tiny", vocab_size=vocab)
    if spm:
        return base.with_(bos_id=1, eos_ids=(2,))
    if arch == "qwen2":  # Qwen2's shape: biases on q/k/v, tied head, eps 1e-6
        return base.with_(qkv_bias=True, tie_embeddings=True, norm_eps=1e-6, rope_theta=1e6,
                          bos_id=EOT, eos_ids=(IM_END, EOT))
    # <|endoftext|> ends generation too (llama.cpp's rule), though the file names only EOS.
    return base.with_(bos_id=IM_START, eos_ids=(IM_END, EOT))


def tiny_model(config: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(config)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight" or "bias" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def roundtrip(weight: np.ndarray, qtype: Q) -> np.ndarray:
    """What a reader gets back from `weight` stored as `qtype`."""
    if qtype == Q.F32:
        return weight
    return gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype).reshape(
        weight.shape)


def write_gguf(path: Path, model: Transformer, arch: str = "llama", qtype: Q = Q.F32,
               spm: bool = False, pre: str = "gpt-2", extra=None) -> dict[str, torch.Tensor]:
    """Write `model` as llama.cpp would (q/k permuted for arch llama, 1-D tensors in F32,
    tied head left out); returns the state the file holds after quantization."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    if spm:
        w.add_tokenizer_model("llama")
        w.add_token_list(SPM_TOKENS)
        w.add_token_scores(SPM_SCORES)
        w.add_token_types(SPM_TYPES)
        w.add_unk_token_id(0)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(BPE_TOKENS)
        w.add_token_types(BPE_TYPES)
        w.add_token_merges(BPE_MERGES)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT)
    w.add_bos_token_id(cfg.bos_id)
    w.add_eos_token_id(cfg.eos_ids[0])
    if arch == "qwen2":  # the llama file names EOS only: its other stop token comes by text
        w.add_eot_token_id(cfg.eos_ids[1])
    if extra is not None:
        extra(w)
    held = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        array = tensor.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            array = permute_qk(torch.from_numpy(array), cfg.n_heads).numpy()
        elif arch == "llama" and ".k_proj." in name:
            array = permute_qk(torch.from_numpy(array), cfg.n_kv_heads).numpy()
        kind = qtype if array.ndim == 2 else Q.F32
        if kind in (Q.F32, Q.F16):
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, kind))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, kind), raw_dtype=kind)
        held[name] = torch.from_numpy(roundtrip(array, kind).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # Undo the permutation in the expectation: the reader must hand back draftlm's layout.
    for name in held:
        if arch == "llama" and ".q_proj." in name:
            held[name] = unpermute_qk(held[name], cfg.n_heads)
        elif arch == "llama" and ".k_proj." in name:
            held[name] = unpermute_qk(held[name], cfg.n_kv_heads)
    return held
