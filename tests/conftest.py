"""Shared fixtures: a tiny random model with a byte-level tokenizer, built in milliseconds."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from draftlm.config import ModelConfig
from draftlm.cpu_kernels import has_cpp_compiler
from draftlm.gguf_tokenizer import bytes_to_unicode
from draftlm.load import LM
from draftlm.model import Transformer
from draftlm.tokenizer import Tokenizer

# torch.compile on a CPU writes and builds C++; without a compiler there is nothing to test.
needs_cpp_compiler = pytest.mark.skipif(
    not has_cpp_compiler(),
    reason="torch.compile on CPU needs a C++ compiler",
)


def byte_tokenizer(chat_template: str | None = None) -> Tokenizer:
    """One token per byte (256 ids, the `tiny` preset's vocabulary); id 0 doubles as EOS."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, eos_ids=(0,), chat_template=chat_template)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    return [bytes_to_unicode()[b] for b in range(256)]


def make_tiny_lm(seed: int = 0, **changes) -> LM:
    config = ModelConfig.from_name("tiny").with_(**changes)
    model = Transformer(config)
    model.init_weights(std=0.5, generator=torch.Generator().manual_seed(seed))
    chat = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>{% endif %}"
    return LM(model.eval(), byte_tokenizer(chat), config, f"tiny-{seed}")


@pytest.fixture
def tiny_lm() -> LM:
    return make_tiny_lm()
