"""SentencePiece `tokenizer.model` -> draftlm `Tokenizer` (a `tokenizers` BPE).

Llama-2, CodeLlama and AMD-Llama-135M ship a SentencePiece BPE model and no tokenizer.json.
Rather than keep SentencePiece as a second runtime tokenizer, we convert it once, the way
HF transformers' legacy `LlamaConverter` does, so every tokenizer in draftlm is one type:

- vocab: the pieces in id order; merges: every split of a normal piece into two normal
  pieces, ranked by the merged piece's score (SentencePiece BPE merges the adjacent pair whose
  union scores highest, which is exactly a BPE merge list ordered by that score);
- byte fallback: characters outside the vocab become `<0xNN>` byte pieces;
- normalizer: (precompiled charsmap, extra-space removal when the model asks for them), then
  prepend "▁" and replace " " by "▁" (the "legacy" Llama behaviour: every chunk between special
  tokens gets the dummy prefix); decoder: the reverse, stripping the one leading space;
- `<unk>` and control pieces (`<s>`, `</s>`) are special added tokens; user-defined pieces are
  added tokens that are never split.

Needs the `sentencepiece` and `protobuf` packages (`pip install 'draftlm[spm]'`), imported only
when a tokenizer.model is actually read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from draftlm.errors import DraftlmError
from draftlm.tokenizer import Tokenizer

# sentencepiece_model.proto: ModelPiece.Type and TrainerSpec.ModelType
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_MODEL_TYPE_BPE = 2


def _read_proto(path: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise DraftlmError(
            f"reading {path.name} needs the sentencepiece and protobuf packages: "
            "pip install 'draftlm[spm]'"
        ) from err
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf raises DecodeError and friends
        raise DraftlmError(f"{path} is not a SentencePiece model: {err}") from err
    if not proto.pieces:
        raise DraftlmError(f"{path} is not a SentencePiece model: it has no pieces")
    return proto


def _bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """Merges ranked like SentencePiece's BPE: best-scoring merged piece first, then by id."""
    normal = {
        p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL
    }
    ranked = []
    for piece, (score, piece_id) in normal.items():
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in normal and right in normal:
                ranked.append((-score, piece_id, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def convert_sentencepiece(path: str | Path, add_bos: bool = True) -> HFTokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece BPE `path`.

    With `add_bos`, its post-processor prepends BOS (as a HF Llama tokenizer.json does) so the
    saved tokenizer.json behaves the same in other tools; draftlm's own `Tokenizer.encode`
    adds BOS itself and never runs the post-processor."""
    path = Path(path)
    return _convert(path, _read_proto(path), add_bos)


def _convert(path: Path, proto: Any, add_bos: bool) -> HFTokenizer:
    if proto.trainer_spec.model_type != _MODEL_TYPE_BPE:
        raise DraftlmError(
            f"{path} is a SentencePiece model of type {proto.trainer_spec.model_type} "
            "(unigram/word/char); draftlm converts BPE models (Llama family) only"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    spec = proto.trainer_spec
    norm = proto.normalizer_spec
    unk_piece = proto.pieces[spec.unk_id].piece if 0 <= spec.unk_id < len(proto.pieces) else None
    backend = HFTokenizer(
        BPE(
            vocab=vocab,
            merges=_bpe_merges(proto),
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
            dropout=None,
        )
    )

    steps: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        # SentencePiece trims and squeezes spaces only, not newlines or tabs.
        steps += [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)

    decode_steps: list[decoders.Decoder] = [decoders.Replace("▁", " ")]
    if spec.byte_fallback:
        decode_steps.append(decoders.ByteFallback())
    decode_steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode_steps)

    specials = [
        AddedToken(p.piece, normalized=False, special=True)
        for p in proto.pieces
        if p.type in (_UNKNOWN, _CONTROL)
    ]
    backend.add_special_tokens(specials)
    user_defined = [
        AddedToken(p.piece, normalized=False, special=False)
        for p in proto.pieces
        if p.type == _USER_DEFINED
    ]
    if user_defined:
        backend.add_tokens(user_defined)

    if add_bos and 0 <= spec.bos_id < len(proto.pieces):
        bos = proto.pieces[spec.bos_id].piece
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, spec.bos_id)],
        )
    return backend


def _special_token_name(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_from_sentencepiece(
    path: str | Path,
    tokenizer_config: dict[str, Any] | None = None,
    chat_template: str | None = None,
    bos_id: int | None = None,
    eos_ids: Sequence[int] = (),
) -> Tokenizer:
    """A draftlm `Tokenizer` from a `tokenizer.model` and its folder's tokenizer_config.json.

    BOS/EOS come from tokenizer_config.json's names, else from the SentencePiece model's own
    ids, else from `bos_id`/`eos_ids` (config.json). add_bos defaults to True, as for Llama."""
    path = Path(path)
    config = tokenizer_config or {}
    add_bos = bool(config.get("add_bos_token", True))
    proto = _read_proto(path)
    backend = _convert(path, proto, add_bos)
    spec = proto.trainer_spec
    size = backend.get_vocab_size(with_added_tokens=True)

    def resolve(key: str, spm_id: int, fallback: int | None) -> int | None:
        name = _special_token_name(config, key)
        if name is not None and backend.token_to_id(name) is not None:
            return backend.token_to_id(name)
        if 0 <= spm_id < size:
            return spm_id
        return fallback

    bos = resolve("bos_token", spec.bos_id, bos_id)
    eos = resolve("eos_token", spec.eos_id, eos_ids[0] if eos_ids else None)
    pad_name = _special_token_name(config, "pad_token")
    pad = backend.token_to_id(pad_name) if pad_name is not None else None
    if pad is None and 0 <= spec.pad_id < size:
        pad = spec.pad_id
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    eos_all = tuple(dict.fromkeys(([eos] if eos is not None else []) + list(eos_ids)))
    return Tokenizer(
        backend,
        bos_id=bos,
        eos_ids=eos_all,
        add_bos=add_bos,
        chat_template=template if template is not None else chat_template,
        pad_id=pad,
    )
