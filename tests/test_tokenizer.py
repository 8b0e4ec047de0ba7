"""Tokenizer wrapper: encode/decode, chat templates, streaming deltas, files."""

import pytest
from helpers import byte_tokenizer

from draftlm.errors import DraftlmError
from draftlm.tokenizer import StreamDecoder, Tokenizer

TEXT = "def f(x):\n    return x  # ünïcödé 漢字 🙂\n\t\n"


def test_byte_round_trip() -> None:
    tok = byte_tokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode())
    assert tok.decode(ids) == TEXT


def test_stream_decoder_never_splits_a_character() -> None:
    tok = byte_tokenizer()
    decoder = StreamDecoder(tok)
    deltas = [decoder.push([i]) for i in tok.encode(TEXT)]
    deltas.append(decoder.flush())
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_chat_template_renders_messages() -> None:
    tok = byte_tokenizer("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "[user]hi[assistant]"


def test_chat_template_raise_exception_is_a_user_error() -> None:
    tok = byte_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DraftlmError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_no_chat_template_is_a_clear_error() -> None:
    with pytest.raises(DraftlmError, match="no chat template"):
        byte_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}])


def test_save_and_reload(tmp_path) -> None:
    tok = byte_tokenizer("{{ messages[0].content }}")
    tok.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path, eos_ids=(0,))
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert again.chat_template == tok.chat_template
    assert again.eos_ids == (0,)
    assert again.fingerprint == tok.fingerprint


def test_missing_tokenizer_file(tmp_path) -> None:
    with pytest.raises(DraftlmError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_chat_template_render_error_is_a_user_error() -> None:
    tok = byte_tokenizer("{{ messages[0].content + 1 }}")
    with pytest.raises(DraftlmError, match="cannot render"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
