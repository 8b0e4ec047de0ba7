"""A GGUF file's tokenizer (its `tokenizer.ggml.*` metadata) rebuilt as a `tokenizers` model.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and
the name of the pre-tokenizer, and its own runtime supplies the rest. We supply the same
rest, following llama.cpp (`llama-vocab.cpp`), the runtime these files are made for:

- `gpt2` vocabularies are byte-level BPE. The text is split by the regex that
  `tokenizer.ggml.pre` names before the byte-level mapping; the wrong split silently changes
  token ids (SmolLM2 splits digits one by one, Qwen2 keeps letters after punctuation, ...).
- `llama` vocabularies are SentencePiece BPE: merges ranked by piece score, byte fallback
  through the `<0xNN>` pieces, "▁" for spaces and a space prefixed to every run of plain
  text (llama.cpp prefixes after each special token too, like SentencePiece's legacy mode).
- control tokens (type 3) become special added tokens and user-defined ones (type 4) plain
  added tokens: text such as `<|im_start|>` is then one token, never split into pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from draftlm.errors import DraftlmError
from draftlm.tokenizer import Tokenizer

# llama_token_type in llama.cpp (gguf's TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of llama.cpp's pre-tokenizer types (llama-vocab.cpp); each is applied before
# the byte-level mapping.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# pre-tokenizer name -> (split digits one by one first, regex, whole words skip merges).
# llama.cpp's StarCoder family splits every \p{N} on its own, then applies the GPT-2 regex;
# Llama 3 vocabularies look a whole word up before merging (tokenizer.json "ignore_merges").
_PRE_TOKENIZERS: dict[str, tuple[bool, str, bool]] = {
    "default": (False, _GPT2_SPLIT, False),
    "gpt-2": (False, _GPT2_SPLIT, False),
    "mpt": (False, _GPT2_SPLIT, False),
    "olmo": (False, _GPT2_SPLIT, False),
    "smollm": (True, _GPT2_SPLIT, False),
    "starcoder": (True, _GPT2_SPLIT, False),
    "refact": (True, _GPT2_SPLIT, False),
    "codeshell": (True, _GPT2_SPLIT, False),
    "qwen2": (False, _QWEN2_SPLIT, False),
    "stablelm2": (False, _QWEN2_SPLIT, False),
    "deepseek-r1-qwen": (False, _QWEN2_SPLIT, False),
    "llama-bpe": (False, _LLAMA3_SPLIT, True),
    "llama3": (False, _LLAMA3_SPLIT, True),
    "llama-v3": (False, _LLAMA3_SPLIT, True),
    "smaug-bpe": (False, _LLAMA3_SPLIT, True),
    "dbrx": (False, _LLAMA3_SPLIT, True),
    "falcon3": (False, _LLAMA3_SPLIT, True),
    "gpt-4o": (False, _GPT4O_SPLIT, False),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: how byte-level vocabularies spell tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


# Token texts llama.cpp treats as end of generation whatever the metadata says
# (llama-vocab.cpp): Qwen files name only <|im_end|> as EOS, yet a base-style completion
# ends with <|endoftext|>.
_END_OF_GENERATION_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "<|end_of_text|>",
})


def end_of_generation_ids(meta: Mapping[str, Any]) -> tuple[int, ...]:
    """EOS, EOT and EOM ids from the metadata first (EOS leads: chat templates render it),
    then every control token llama.cpp stops at by its text."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    named = _special_ids(meta, len(tokens))
    ids = [named[key] for key in ("eos", "eot", "eom") if named[key] is not None]
    ids += [i for i, (tok, ty) in enumerate(zip(tokens, types, strict=False))
            if ty == _CONTROL and tok in _END_OF_GENERATION_TEXTS]
    return tuple(dict.fromkeys(ids))


def _special_ids(meta: Mapping[str, Any], size: int) -> dict[str, int | None]:
    def get(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < size else None

    return {key: get(f"{key}_token_id") for key in ("bos", "eos", "eot", "eom", "padding",
                                                      "unknown")}


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> HFTokenizer:
    pre_name = meta.get("tokenizer.ggml.pre") or "default"
    if pre_name not in _PRE_TOKENIZERS:
        raise DraftlmError(
            f"unsupported GGUF pre-tokenizer {pre_name!r}; draftlm knows "
            f"{', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    split_digits, regex, ignore_merges = _PRE_TOKENIZERS[pre_name]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Real tokens are stored in the byte alphabet already; a few converters store added
    # tokens as raw text, which we spell the way the BPE model will see them.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode()): i
        for i, tok in enumerate(tokens)
    }
    merges_raw = meta.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise DraftlmError("GGUF byte-level tokenizer has no tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    backend = HFTokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    steps: list[pre_tokenizers.PreTokenizer] = []
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a converter's mislabel (HF does the same
    # check); as an added token it could never come out of the model's embedding anyway.
    _add_tokens(backend, tokens, types, lambda tok: set(tok) <= alphabet)
    return backend


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]
               ) -> list[tuple[str, str]]:
    """SentencePiece BPE as a merge list: every split of a normal piece into two normal
    pieces, best-scoring merged piece first (SentencePiece merges the adjacent pair whose
    union scores highest), ties by id."""
    rows = enumerate(zip(tokens, scores, types, strict=True))
    normal = {tok: (score, i) for i, (tok, score, ty) in rows if ty == _NORMAL}
    ranked = []
    for piece, (score, piece_id) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, piece_id, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int],
                       unk_id: int | None) -> HFTokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    merges_raw = meta.get("tokenizer.ggml.merges")
    if merges_raw is not None:
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    elif scores is not None:
        if len(scores) != len(tokens):
            raise DraftlmError("GGUF tokenizer: scores and tokens differ in length")
        merges = spm_merges(tokens, scores, types)
    else:
        raise DraftlmError("GGUF SentencePiece tokenizer has neither scores nor merges")
    backend = HFTokenizer(BPE(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=_BYTE in types,
    ))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode)
    _add_tokens(backend, tokens, types, lambda tok: True, unknown_is_special=True)
    return backend


def _add_tokens(backend: HFTokenizer, tokens: list[str], types: list[int], keep: Any,
                unknown_is_special: bool = False) -> None:
    special_types = {_CONTROL, _UNKNOWN} if unknown_is_special else {_CONTROL}
    specials = [AddedToken(tok, normalized=False, special=True)
                for tok, ty in zip(tokens, types, strict=True) if ty in special_types and keep(tok)]
    backend.add_special_tokens(specials)
    vocab = backend.get_vocab()
    user = [AddedToken(tok, normalized=False, special=False)
            for tok, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED and tok in vocab]
    if user:
        backend.add_tokens(user)


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer:
    """The draftlm `Tokenizer` a GGUF's metadata describes.

    `meta` maps keys to plain values (lists for arrays), as `formats.gguf.read_metadata`
    returns them."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise DraftlmError("the GGUF file has no tokenizer (tokenizer.ggml.model/tokens)")
    tokens = list(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise DraftlmError("GGUF tokenizer: token_type and tokens differ in length")
    ids = _special_ids(meta, len(tokens))
    if model == "gpt2":
        backend = _byte_level_bpe(meta, tokens, types)
        add_bos_default = False
    elif model == "llama":
        backend = _sentencepiece_bpe(meta, tokens, types, ids["unknown"])
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise DraftlmError(
            f"unsupported GGUF tokenizer model {model!r}; draftlm reads gpt2 (byte-level BPE) "
            "and llama (SentencePiece BPE)"
        )
    return Tokenizer(
        backend,
        bos_id=ids["bos"],
        eos_ids=end_of_generation_ids(meta),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        chat_template=meta.get("tokenizer.chat_template"),
        pad_id=ids["padding"],
    )
