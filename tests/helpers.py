"""Test helpers: a tiny random model with a byte-level tokenizer, built in milliseconds."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from draftlm.config import ModelConfig
from draftlm.formats.gguf_tokenizer import bytes_to_unicode
from draftlm.load import LM
from draftlm.model import Transformer
from draftlm.quant.kernels import has_cpp_compiler
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


# ---- speculative decoding: drafts that agree with a target, and a distribution test --
PROMPT = "def add(a, b):\n    return a + b\n\ndef add"


def no_eos_lm(seed: int = 0, **changes) -> LM:
    lm = make_tiny_lm(seed, eos_ids=(), **changes)
    lm.tokenizer.eos_ids = ()
    return lm


def noisy_copy(lm: LM, noise: float = 0.02, seed: int = 1) -> LM:
    """A draft that agrees with the target often but not always: its weights plus noise."""
    model = copy.deepcopy(lm.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    return LM(model, lm.tokenizer, lm.config, f"{lm.name}-noisy")


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed `counts` against `probs`; cells expecting < 5 are pooled."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat((counts[big].double(), counts[~big].double().sum().view(1)))
    exp = torch.cat((expected[big], expected[~big].sum().view(1)))
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    # Mass where the target puts none is an immediate failure.
    if counts[probs == 0].sum() > 0:
        return 0.0
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def permuted_byte_tokenizer(seed: int = 0) -> Tokenizer:
    """One token per byte, like the target's, but every id shuffled: another tokenizer."""
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(seed)).tolist()
    vocab = {char: perm[b] for b, char in enumerate(_bytes_to_unicode())}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend)


def permuted_draft(target: LM, noise: float) -> LM:
    """The target's own model re-indexed to the permuted tokenizer, plus noise: drafts the
    same text through different token ids."""
    tokenizer = permuted_byte_tokenizer()
    perm = torch.tensor([tokenizer.token_to_id(c) for c in _bytes_to_unicode()])
    model = copy.deepcopy(noisy_copy(target, noise).model)
    with torch.no_grad():
        for weight in (model.embed_tokens.weight, model.lm_head.weight):
            weight[perm] = weight.clone()
    return LM(model, tokenizer, target.config, "permuted")


# ---- bench peers run in a child process: importable stand-ins for them ----------------------
def crashing_peer(*args) -> list:
    """A native peer that segfaults (as llama.cpp's repacked-weights path did)."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)
    return []


def failing_peer(*args) -> list:
    from draftlm.errors import DraftlmError

    raise DraftlmError("--peer test needs a package that is not installed")


def counting_peer(num_tokens: int) -> list:
    from draftlm.bench.records import BenchConfig, BenchRow

    return [BenchRow(BenchConfig("hf"), num_prompts=1, num_new_tokens=num_tokens,
                     elapsed_s=2.0, outputs=[[1] * num_tokens])]
