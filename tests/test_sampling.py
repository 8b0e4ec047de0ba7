"""Sampling helpers are pure functions over logits; check each transformation exactly."""

import pytest
import torch

from draftlm.errors import DraftlmError
from draftlm.sampling import SamplingParams, logits_to_probs, make_generator, next_token, sample

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))


def test_greedy_is_one_hot_on_argmax() -> None:
    probs = logits_to_probs(LOGITS, SamplingParams(0.0))
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_temperature_one_is_softmax() -> None:
    probs = logits_to_probs(LOGITS, SamplingParams(1.0))
    assert torch.allclose(probs, torch.tensor([0.5, 0.25, 0.15, 0.1]))


def test_temperature_sharpens() -> None:
    probs = logits_to_probs(LOGITS, SamplingParams(0.5))
    expected = torch.tensor([0.5, 0.25, 0.15, 0.1]) ** 2
    assert torch.allclose(probs, expected / expected.sum())


def test_top_k_keeps_k_most_likely() -> None:
    probs = logits_to_probs(LOGITS, SamplingParams(1.0, top_k=2))
    assert torch.allclose(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token is needed to reach 0.8.
    probs = logits_to_probs(LOGITS, SamplingParams(1.0, top_p=0.8))
    assert torch.allclose(probs, torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9)
    # The most likely token always survives, however small top_p is.
    assert logits_to_probs(LOGITS, SamplingParams(1.0, top_p=0.01)).tolist() == [1, 0, 0, 0]


def test_top_p_works_on_unsorted_batches() -> None:
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    probs = logits_to_probs(logits, SamplingParams(1.0, top_p=0.8))
    assert torch.allclose(probs[1], probs[0].flip(0))


def test_sample_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1]).expand(40_000, 4)
    draws = sample(probs, make_generator(0))
    freq = torch.bincount(draws, minlength=4).float() / 40_000
    assert torch.allclose(freq, probs[0], atol=0.01)


def test_seeded_generators_repeat() -> None:
    a = next_token(LOGITS.expand(8, 4), SamplingParams(1.0), make_generator(7))
    b = next_token(LOGITS.expand(8, 4), SamplingParams(1.0), make_generator(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_bad_parameters_are_user_errors(kwargs) -> None:
    with pytest.raises(DraftlmError):
        SamplingParams(**{"temperature": 1.0, **kwargs})


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1e-7, 0.0])
def test_vanishing_temperatures_are_greedy_and_finite(temperature) -> None:
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    logits = torch.tensor([[1.0, 3.0, 2.9, -5.0]])
    probs = logits_to_probs(logits, params)
    assert torch.isfinite(probs).all() and probs.argmax(-1).item() == 1
    assert next_token(logits, params, torch.Generator().manual_seed(0)).item() == 1


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1e-9])
def test_temperatures_that_are_not_numbers_are_refused(temperature) -> None:
    with pytest.raises(DraftlmError, match="temperature must be"):
        SamplingParams(temperature=temperature)
