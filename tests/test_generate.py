"""Generation: greedy equals a cache-free argmax loop; EOS, stop strings, limits, streaming."""

import pytest
import torch
from helpers import byte_tokenizer, make_tiny_lm

from draftlm.errors import DraftlmError
from draftlm.generate import OutputTracker, generate


def reference_greedy(lm, prompt_ids: list[int], n: int) -> list[int]:
    """Argmax decoding with a full forward pass per token: no cache, nothing clever."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def test_greedy_equals_reference(tiny_lm) -> None:
    prompt = "hello world"
    result = generate(tiny_lm, prompt, max_new_tokens=30)
    expected = reference_greedy(tiny_lm, tiny_lm.tokenizer.encode(prompt), 30)
    cut = expected.index(0) if 0 in expected else len(expected)  # id 0 is EOS
    assert result.token_ids == expected[:cut]
    assert result.num_prompt_tokens == len(prompt)


def test_length_limit_and_stats(tiny_lm) -> None:
    lm = make_tiny_lm(seed=1, eos_ids=())
    lm.tokenizer.eos_ids = ()
    result = generate(lm, "abc", max_new_tokens=12)
    assert result.num_new_tokens == 12
    assert result.finish_reason == "length"
    assert result.stats["target_forwards"] == 12
    assert result.tokens_per_second > 0


def test_seeded_sampling_repeats_and_differs_by_seed() -> None:
    lm = make_tiny_lm(seed=2, eos_ids=())
    lm.tokenizer.eos_ids = ()
    runs = [generate(lm, "x", max_new_tokens=20, temperature=1.0, seed=s).token_ids
            for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_context_limit_caps_new_tokens() -> None:
    lm = make_tiny_lm(seed=1, eos_ids=(), max_seq_len=32)
    lm.tokenizer.eos_ids = ()
    result = generate(lm, "a" * 28, max_new_tokens=100)
    assert result.num_new_tokens == 4
    assert result.finish_reason == "length"


def test_prompt_longer_than_context_is_a_user_error() -> None:
    lm = make_tiny_lm(max_seq_len=16)
    with pytest.raises(DraftlmError, match="context is 16"):
        generate(lm, "a" * 40, max_new_tokens=4)


def test_prompt_with_undecodable_bytes_is_a_user_error(tiny_lm) -> None:
    bad = b"def f():\xff".decode("utf-8", "surrogateescape")  # how argv carries such bytes
    with pytest.raises(DraftlmError, match="not valid UTF-8 text"):
        generate(tiny_lm, bad, max_new_tokens=2)


def test_chat_uses_the_template(tiny_lm) -> None:
    seen = []
    result = generate(tiny_lm, "hi", max_new_tokens=3, chat=True, on_text=seen.append)
    assert result.num_prompt_tokens == len("<user>hi\n<assistant>")
    assert "".join(seen) == result.text


# ---- OutputTracker: the rules every decoding loop shares -------------------------------
def tracker(stop=(), max_new=100, eos=(0,), on_text=None) -> OutputTracker:
    return OutputTracker(byte_tokenizer(), [], max_new, eos, stop, on_text)


def ids(text: str) -> list[int]:
    return list(text.encode())


def test_eos_inside_a_chunk_drops_the_rest() -> None:
    t = tracker()
    assert t.add(ids("ab") + [0] + ids("cd"))
    assert (t.text, t.finish_reason, t.token_ids) == ("ab", "stop", ids("ab"))


def test_stop_string_across_chunks_is_cut() -> None:
    streamed = []
    t = tracker(stop=["\ndef "], on_text=streamed.append)
    assert not t.add(ids("x = 1\nd"))
    assert not t.add(ids("e"))
    assert t.add(ids("f g()"))
    assert t.text == "x = 1"
    assert t.finish_reason == "stop"
    assert "".join(streamed) == "x = 1"  # the held-back "\nde" never reached the stream


def test_streamed_text_equals_the_result() -> None:
    streamed = []
    t = tracker(max_new=len("héllo 🙂 wörld".encode()), on_text=streamed.append)
    for b in "héllo 🙂 wörld".encode():
        t.add([b])
    assert t.done and t.finish_reason == "length"
    assert "".join(streamed) == t.text == "héllo 🙂 wörld"


def test_limit_inside_a_chunk() -> None:
    t = tracker(max_new=3)
    assert t.add(ids("abcdef"))
    assert t.token_ids == ids("abc") and t.finish_reason == "length"


@pytest.mark.parametrize("drafted", [False, True])
def test_damaged_weights_fail_in_one_line_instead_of_returning_nothing(drafted) -> None:
    """NaN weights gave 0 tokens with finish reason "stop" (the NaN argmax was EOS)."""
    from draftlm.errors import DraftlmError
    from draftlm.speculative import NgramDrafter

    lm = make_tiny_lm()
    with torch.no_grad():
        lm.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    drafter = NgramDrafter(2, num_draft_tokens=3) if drafted else None
    with pytest.raises(DraftlmError, match="non-finite logits"):
        generate(lm, "def f(x):", max_new_tokens=8, drafter=drafter)


@pytest.mark.parametrize("drafted", [False, True])
def test_on_step_runs_every_step_while_a_stop_string_holds_text_back(drafted) -> None:
    """A server checks its client in `on_step`: it must run even when no text streams (the
    whole output could still become a stop string), and what it raises ends generation."""
    from draftlm.speculative import NgramDrafter

    lm = make_tiny_lm()
    expected = generate(lm, "def f(x):", max_new_tokens=24).text
    streamed, steps = [], []

    class ClientGone(Exception):
        pass

    def on_step() -> None:
        steps.append(1)
        if len(steps) == 5:
            raise ClientGone

    drafter = NgramDrafter(2, num_draft_tokens=3) if drafted else None
    with pytest.raises(ClientGone):
        generate(lm, "def f(x):", max_new_tokens=24, stop=[expected + "\x00never"],
                 on_text=streamed.append, on_step=on_step, drafter=drafter)
    assert len(steps) == 5 and streamed == []
