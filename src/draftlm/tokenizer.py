"""Tokenizer: a `tokenizers.Tokenizer` plus what generation needs around it (BOS/EOS ids,
the chat template, incremental decoding for streaming).

Every source (tokenizer.json, a SentencePiece tokenizer.model, a GGUF file's metadata,
a freshly trained BPE) ends up as this one type, so the rest of draftlm never asks where
a tokenizer came from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from draftlm.errors import DraftlmError


class Tokenizer:
    """Text <-> token ids for one model."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        pad_id: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.pad_id = pad_id

    # ---- basics ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Size of the id space, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when the model expects it (or `add_bos` says)."""
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            # Bytes that are not UTF-8 (in argv, a file, or JSON's \ud800) arrive as lone
            # surrogates, which the tokenizers library refuses with a bare TypeError.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise DraftlmError(
                    f"not valid UTF-8 text: an undecodable byte or lone surrogate at "
                    f"character {err.start}"
                ) from None
            raise
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_name(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.id_to_token(token_id)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the serialized tokenizer: tells whether two tokenizers are the same."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    # ---- chat --------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` with the model's own Jinja chat template (sandboxed)."""
        if not self.chat_template:
            raise DraftlmError("this model has no chat template; drop --chat and send plain text")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message: str) -> None:
            raise DraftlmError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        try:
            template = env.from_string(self.chat_template)
        except jinja2.TemplateError as err:
            raise DraftlmError(f"the model's chat template does not parse: {err}") from err
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token_name(self.bos_id) or "",
                eos_token=self.token_name(self.eos_ids[0] if self.eos_ids else None) or "",
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as err:
            # Messages the template does not expect (a missing field, a wrong type).
            raise DraftlmError(f"the chat template cannot render these messages: {err}") from err

    # ---- files -------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` as HF transformers expects."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "bos_token": self.token_name(self.bos_id),
            "eos_token": self.token_name(self.eos_ids[0] if self.eos_ids else None),
            "pad_token": self.token_name(self.pad_id),
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (folder / "tokenizer_config.json").write_text(text)

    @classmethod
    def from_folder(
        cls, folder: str | Path, bos_id: int | None = None, eos_ids: Sequence[int] = ()
    ) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`) from a HF-style folder.

        `bos_id`/`eos_ids` from the model's config.json are the fallback when the tokenizer
        config names no special tokens."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise DraftlmError(f"no tokenizer.json in {folder}")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises bare Exceptions
            raise DraftlmError(f"cannot read {path}: {err}") from err
        config: dict[str, Any] = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as err:
                raise DraftlmError(f"{config_path} is not valid JSON: {err}") from err

        def special_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):  # older configs store AddedToken dicts
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos = special_id("bos_token")
        eos = special_id("eos_token")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = folder / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text()
        eos_all = tuple(dict.fromkeys(([eos] if eos is not None else []) + list(eos_ids)))
        return cls(
            backend,
            bos_id=bos if bos is not None else bos_id,
            eos_ids=eos_all,
            add_bos=bool(config.get("add_bos_token", False)),
            chat_template=template,
            pad_id=special_id("pad_token"),
        )


class StreamDecoder:
    """Turns a growing list of token ids into text deltas for streaming.

    Byte-level BPE can split one character over several tokens; a delta is released only
    once the text no longer ends in a partial character (U+FFFD), so a stream never
    prints half a character and the concatenated deltas equal `decode(all_ids)`."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        # Decoding from a little prompt context keeps leading spaces that SentencePiece
        # would strip from a sequence's first token.
        self._prefix = list(prompt_ids[-4:])
        self._prefix_text = tokenizer.decode(self._prefix)
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        text = self.tokenizer.decode(self._prefix + self._ids)[len(self._prefix_text) :]
        if text.endswith("\ufffd"):
            return ""
        delta, self._emitted = text[self._emitted :], len(text)
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self._prefix + self._ids)[len(self._prefix_text) :]
        delta, self._emitted = text[self._emitted :], len(text)
        return delta
