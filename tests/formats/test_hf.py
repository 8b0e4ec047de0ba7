"""HF folders: draftlm writes what transformers loads as the same model, reads what it writes,
and converts SentencePiece tokenizers exactly; broken folders fail with one clear message."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.formats import hf as hf_checkpoint
from draftlm.formats.hf import read_hf_folder, save_hf_folder
from draftlm.model import Transformer
from draftlm.tokenizer import Tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Speculative decoding drafts tokens with a small model.",
    "naïve café über straße, 東京 and 😀 emoji",
    "for i in range(10): print(i * 42)",
]
TEXTS = [
    "The lazy fox returns.",
    "def f(x):\n    return x  # two  spaces\n",
    "café 東京 12345 😀 ☃",
    "",
]


# ---- fixtures ---------------------------------------------------------------------------
def _small_tokenizer(vocab_size: int = 200) -> Tokenizer:
    """A word-piece-free BPE over Metaspace, trained here on a few sentences."""
    backend = HFTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(SENTENCES * 4, trainer)
    return Tokenizer(backend, bos_id=1, eos_ids=(2,), add_bos=True)


QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qwen_style_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE shaped like Qwen2's (NFC, Qwen split regex, no BOS).

    transformers 5 always rebuilds a `model_type: qwen2` folder's tokenizer as its own
    Qwen2Tokenizer (keeping only vocab and merges), so only a Qwen-shaped tokenizer can give
    equal ids there; llama folders keep tokenizer.json as written."""
    backend = HFTokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(SENTENCES * 4, trainer)
    return Tokenizer(backend, bos_id=None, eos_ids=(2, 0), add_bos=False, pad_id=0)


def _random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights everywhere, norms and biases included, so every tensor is checked."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


LLAMA = ModelConfig.from_name("tiny").with_(
    bos_id=1, eos_ids=(2,), rope_theta=50_000.0, norm_eps=1e-6
)
QWEN = LLAMA.with_(
    vocab_size=320, qkv_bias=True, tie_embeddings=True, bos_id=None, eos_ids=(2, 0)
)


def _tokenizer_for(config: ModelConfig) -> Tokenizer:
    return _qwen_style_tokenizer() if config.qkv_bias else _small_tokenizer()


def _ids(n: int = 12, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def _load(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected
    assert missing == (["lm_head.weight"] if config.tie_embeddings else [])
    return model.eval()


def _transformers():
    return pytest.importorskip("transformers", reason="HF transformers is the peer to compare")


# ---- draftlm -> HF transformers -----------------------------------------------------------
@pytest.mark.parametrize("config", [LLAMA, QWEN], ids=["llama-untied", "qwen2-tied-bias"])
def test_saved_folder_loads_in_transformers_with_equal_logits_and_ids(tmp_path, config):
    transformers = _transformers()
    model = _random_model(config)
    tokenizer = _tokenizer_for(config)
    folder = save_hf_folder(tmp_path / "ckpt", config, model, tokenizer)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _ids(vocab=config.vocab_size)
    with torch.no_grad():
        expected = model(ids)
        got = hf_model(ids).logits
    assert (got - expected).abs().max().item() < 1e-5

    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert hf_tok.encode(text) == tokenizer.encode(text)

    hf_config = json.loads((folder / "config.json").read_text())
    assert hf_config["torch_dtype"] == "float32"
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == (list(config.eos_ids) if len(config.eos_ids) > 1 else 2)
    assert gen["bos_token_id"] == config.bos_id
    with_head = "lm_head.weight" in load_file(folder / "model.safetensors")
    assert with_head == (not config.tie_embeddings)


@pytest.mark.parametrize("config", [LLAMA, QWEN], ids=["llama-untied", "qwen2-tied-bias"])
def test_round_trip_gives_identical_tensors_config_and_tokenizer(tmp_path, config):
    model = _random_model(config)
    tokenizer = _tokenizer_for(config)
    folder = save_hf_folder(tmp_path / "rt", config, model, tokenizer)
    ckpt = read_hf_folder(folder)
    assert ckpt.config == config.with_(name="rt")
    state = {k: v for k, v in model.state_dict().items()
             if not (config.tie_embeddings and k == "lm_head.weight")}
    assert list(ckpt.tensors) == list(state)
    for name, tensor in state.items():
        assert torch.equal(ckpt.tensors[name], tensor), name
    for text in TEXTS:
        assert ckpt.tokenizer.encode(text) == tokenizer.encode(text)
    assert ckpt.tokenizer.backend.get_vocab() == tokenizer.backend.get_vocab()
    assert (ckpt.tokenizer.bos_id, ckpt.tokenizer.eos_ids, ckpt.tokenizer.add_bos) == (
        tokenizer.bos_id, tokenizer.eos_ids, tokenizer.add_bos
    )


def test_dtype_on_save_and_on_read(tmp_path):
    model = _random_model(LLAMA)
    folder = save_hf_folder(tmp_path / "bf16", LLAMA, model, None, dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = hf_checkpoint.read_hf_tensors(folder, LLAMA)
    assert tensors["norm.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["norm.weight"], model.norm.weight.detach().bfloat16())
    as_fp32 = hf_checkpoint.read_hf_tensors(folder, LLAMA, dtype=torch.float32)
    assert as_fp32["norm.weight"].dtype == torch.float32
    # A half-precision model saved as is records its own dtype.
    folder16 = save_hf_folder(tmp_path / "fp16", LLAMA, model.half(), None)
    assert json.loads((folder16 / "config.json").read_text())["torch_dtype"] == "float16"


def test_save_accepts_views_and_strided_tensors(tmp_path):
    state = dict(_random_model(LLAMA).state_dict())
    big = torch.randn(2 * LLAMA.dim)
    state["norm.weight"] = big[::2]  # strided view into a larger storage
    state["embed_tokens.weight"] = state["embed_tokens.weight"].t().contiguous().t()
    folder = save_hf_folder(tmp_path / "views", LLAMA, state, None)
    tensors = hf_checkpoint.read_hf_tensors(folder, LLAMA)
    assert torch.equal(tensors["norm.weight"], big[::2])
    assert torch.equal(tensors["embed_tokens.weight"], state["embed_tokens.weight"])


def test_sharded_save_reads_back(tmp_path):
    model = _random_model(LLAMA)
    folder = save_hf_folder(tmp_path / "sharded", LLAMA, model, _small_tokenizer(),
                            max_shard_bytes=40_000)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:  # under the limit (+ header), unless one tensor alone is bigger
        count = sum(1 for s in index["weight_map"].values() if s == shard.name)
        assert count == 1 or shard.stat().st_size < 40_000 + 4096
    ckpt = read_hf_folder(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.tensors[name], tensor), name


# ---- HF transformers -> draftlm -----------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_folder_written_by_transformers_loads_with_equal_logits(tmp_path, family):
    transformers = _transformers()
    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    if family == "llama":
        hf_config = transformers.LlamaConfig(**common, rope_theta=50_000.0)
        hf_model = transformers.LlamaForCausalLM(hf_config)
    else:
        hf_config = transformers.Qwen2Config(**common, rope_theta=50_000.0,
                                             tie_word_embeddings=True)
        hf_model = transformers.Qwen2ForCausalLM(hf_config)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them count
        for p in hf_model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf_model.eval().save_pretrained(tmp_path / "hf")
    _small_tokenizer().save(tmp_path / "hf")

    ckpt = read_hf_folder(tmp_path / "hf")
    assert ckpt.config.rope_theta == 50_000.0
    assert ckpt.config.qkv_bias == (family == "qwen2")
    model = _load(ckpt.config, ckpt.tensors)
    ids = _ids()
    with torch.no_grad():
        diff = (model(ids) - hf_model(ids).logits).abs().max().item()
    assert diff < 1e-5


# ---- SentencePiece ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A small Llama-style SentencePiece BPE (byte fallback, identity normalization)."""
    spm = pytest.importorskip("sentencepiece", reason="pip install 'draftlm[spm]'")
    pytest.importorskip("google.protobuf", reason="pip install 'draftlm[spm]'")
    rng = random.Random(0)
    words = " ".join(SENTENCES).replace("\n", " ").split() + ["self", "value", "12", "αβγ"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
        model_type="bpe", vocab_size=420, byte_fallback=True, character_coverage=0.995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return folder / "tokenizer.model"


SPM_TEXTS = [
    "The quick brown fox returns self.value",
    "def add(a, b):\n    return a + b\n\n",
    "tabs\tand  double  spaces   end  ",
    "naïve café über straße 東京 😀 ☃ 𝔘 ﬁ Ωmega",
    "digits 1234567890 and 3.14159",
    "x",
    "",
]


def test_sentencepiece_conversion_equals_sentencepiece(spm_model):
    import sentencepiece

    from draftlm.formats.sentencepiece import tokenizer_from_sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    tok = tokenizer_from_sentencepiece(spm_model)
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), True)
    # Leading whitespace included: SentencePiece always adds its dummy "▁" prefix.
    for text in [*SPM_TEXTS, " leading space", "  two leading", "\nnewline first", "▁x"]:
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text), repr(text)
        assert tok.encode(text) == [1, *ids]
        assert tok.decode(ids) == sp.decode(ids), repr(text)


def test_sentencepiece_conversion_equals_transformers_llama_tokenizer(spm_model, tmp_path):
    transformers = _transformers()
    from draftlm.formats.sentencepiece import tokenizer_from_sentencepiece

    folder = tmp_path / "llama-tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(spm_model.read_bytes())
    hf_tok = transformers.LlamaTokenizerFast.from_pretrained(folder, from_slow=True)
    tok = tokenizer_from_sentencepiece(spm_model)
    # transformers 5 converts with a Metaspace pre-tokenizer, which (unlike SentencePiece and
    # the legacy Llama tokenizer.json) skips the dummy prefix before leading spaces; those
    # texts are checked against SentencePiece above.
    for text in SPM_TEXTS:
        assert tok.encode(text, add_bos=False) == hf_tok.encode(
            text, add_special_tokens=False
        ), repr(text)


def test_folder_with_tokenizer_model_only(spm_model, tmp_path):
    """An AMD-Llama-135M-style folder: tokenizer.model, no tokenizer.json; saving it writes
    a tokenizer.json that transformers reads with the same ids as SentencePiece."""
    import sentencepiece

    transformers = _transformers()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    config = LLAMA.with_(vocab_size=sp.get_piece_size())
    src = save_hf_folder(tmp_path / "src", config, _random_model(config), None)
    (src / "tokenizer.model").write_bytes(spm_model.read_bytes())
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (src / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
                    "chat_template": template})
    )
    ckpt = read_hf_folder(src)
    assert ckpt.tokenizer.chat_template == template
    assert ckpt.tokenizer.encode(" leading") == [1, *sp.encode(" leading")]

    out = save_hf_folder(tmp_path / "out", ckpt.config, ckpt.tensors, ckpt.tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in [*SPM_TEXTS, " leading space"]:
        assert hf_tok.encode(text) == [1, *sp.encode(text)], repr(text)
    assert read_hf_folder(out).tokenizer.fingerprint == ckpt.tokenizer.fingerprint


# ---- errors -------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    return save_hf_folder(tmp_path / "ok", LLAMA, _random_model(LLAMA), _small_tokenizer())


def _error(folder: Path) -> str:
    with pytest.raises(DraftlmError) as info:
        read_hf_folder(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder_and_config(tmp_path, saved):
    assert "does not exist" in _error(tmp_path / "nope")
    (saved / "config.json").unlink()
    assert "no config.json" in _error(saved)


def test_invalid_json_and_unknown_model_type(saved):
    (saved / "config.json").write_text("{not json")
    assert "not valid JSON" in _error(saved)
    (saved / "config.json").write_text(json.dumps({**LLAMA.to_hf(), "model_type": "gpt2"}))
    assert "model_type='gpt2'" in _error(saved)


def test_pickle_only_folder_is_refused(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not loaded")
    message = _error(saved)
    assert "safetensors only" in message and "save_pretrained" in message


def test_no_weights_and_no_tokenizer(saved):
    (saved / "tokenizer.json").unlink()
    assert "no tokenizer.json or tokenizer.model" in _error(saved)
    (saved / "model.safetensors").unlink()
    assert "no model.safetensors" in _error(saved)


def test_missing_shard_and_missing_tensor(tmp_path):
    model = _random_model(LLAMA)
    folder = save_hf_folder(tmp_path / "s", LLAMA, model, _small_tokenizer(),
                            max_shard_bytes=40_000)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    tensors = load_file(shard)
    dropped = next(iter(tensors))
    save_file({k: v for k, v in tensors.items() if k != dropped}, shard)
    assert f"tensor {dropped!r} is missing from {shard.name}" in _error(folder)
    shard.unlink()
    message = _error(folder)
    assert shard.name in message and "missing" in message


def test_tensor_absent_from_single_file_or_with_wrong_shape(saved):
    tensors = load_file(saved / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"},
              saved / "model.safetensors", metadata={"format": "pt"})
    assert "lacks tensor 'norm.weight'" in _error(saved)
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    assert "shape (3,)" in _error(saved)


# ---- atomic writes ------------------------------------------------------------------------
def test_interrupted_save_keeps_previous_folder_and_leaves_no_half_folder(
    tmp_path, saved, monkeypatch
):
    before = read_hf_folder(saved)
    real_save = hf_checkpoint.save_file
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(args[1])
        if len(calls) % 2 == 0:  # each save fails on its second file
            raise OSError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(hf_checkpoint, "save_file", failing_save)
    other = _random_model(LLAMA, seed=7)
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(saved, LLAMA, other, _small_tokenizer(), max_shard_bytes=40_000)
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(tmp_path / "fresh", LLAMA, other, None, max_shard_bytes=40_000)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no temp or half folders
    after = read_hf_folder(saved)
    for name, tensor in before.tensors.items():
        assert torch.equal(after.tensors[name], tensor), name

    monkeypatch.setattr(hf_checkpoint, "save_file", real_save)
    save_hf_folder(saved, LLAMA, other, _small_tokenizer())  # a completed save replaces it
    assert torch.equal(read_hf_folder(saved).tensors["norm.weight"], other.norm.weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    target = tmp_path / "docs"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DraftlmError, match="refusing to replace"):
        save_hf_folder(target, LLAMA, _random_model(LLAMA), None)
    assert (target / "notes.txt").read_text() == "keep me"


def test_save_rejects_tensors_that_do_not_fit_the_config(tmp_path):
    state = _random_model(LLAMA).state_dict()
    with pytest.raises(DraftlmError, match="'norm.weight' is missing"):
        save_hf_folder(tmp_path / "a", LLAMA, {k: v for k, v in state.items()
                                              if k != "norm.weight"}, None)
    with pytest.raises(DraftlmError, match="has shape"):
        save_hf_folder(tmp_path / "b", LLAMA.with_(intermediate_size=96), state, None)
    assert not any(tmp_path.iterdir())


# ---- damaged files: one line naming the file, never a traceback or a huge allocation ------
def _tiny_folder(tmp_path: Path) -> Path:
    from helpers import make_tiny_lm

    lm = make_tiny_lm()
    folder = tmp_path / "tiny"
    save_hf_folder(folder, lm.config, lm.model, lm.tokenizer)
    return folder


def _header(length: int, body: bytes) -> bytes:
    return length.to_bytes(8, "little") + body


@pytest.mark.parametrize("damage", [
    "empty", "truncated", "garbage header", "header length 2^62", "offsets out of bounds",
])
def test_damaged_safetensors_are_one_line_errors(tmp_path, damage) -> None:
    folder = _tiny_folder(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage header":
        weights.write_bytes(_header(64, b"\xff" * 64) + data[8 + length:])
    elif damage == "header length 2^62":
        weights.write_bytes(_header(1 << 62, data[8:]))
    else:
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [0, 1 << 40]
        body = json.dumps(header).encode()
        weights.write_bytes(_header(len(body), body) + data[8 + length:])
    with pytest.raises(DraftlmError, match="model.safetensors"):
        read_hf_folder(folder)


def test_config_that_is_not_utf8_is_named(tmp_path) -> None:
    folder = _tiny_folder(tmp_path)
    (folder / "config.json").write_bytes(b'{"model_type": "llama\xff\xfe"}')
    with pytest.raises(DraftlmError, match="not UTF-8"):
        read_hf_folder(folder)
