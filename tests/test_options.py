"""The shared options: each check of `__post_init__` as one line that names the flag, the
flags declared from the dataclass fields, and the CLI building the dataclasses."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from draftlm.bench.records import BenchOptions
from draftlm.cli import build_parser
from draftlm.errors import DraftlmError
from draftlm.options import (
    LOAD_DEFAULTS,
    NO_DRAFTER,
    DraftOptions,
    LoadOptions,
    add_flags,
    field_docs,
    gather_options,
)


def one_line_error(make, match: str) -> str:
    with pytest.raises(DraftlmError, match=match) as err:
        make()
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dtype": "int3"}, "--dtype: unknown dtype 'int3'"),
    ({"quantize": "int3"}, "unknown --quantize 'int3'"),
    ({"compile_mode": "some"}, "unknown --compile 'some'"),
])
def test_load_options_reject_bad_values(kwargs, message) -> None:
    one_line_error(lambda: LoadOptions(**kwargs), message)


def test_compile_draft_needs_a_draft_model() -> None:
    load = LoadOptions(compile_mode="draft")
    one_line_error(lambda: load.check_draft_model(None), "--compile draft needs a draft model")
    load.check_draft_model("smollm2-135m")
    LoadOptions(compile_mode="all").check_draft_model(None)  # compiles the target's step
    assert (load.compile_target, load.compile_drafts) == (False, True)
    assert (LOAD_DEFAULTS.compile_target, LOAD_DEFAULTS.compile_drafts) == (False, False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"draft": "d", "ngram": 2}, "exactly one of --draft or --ngram"),
    ({"ngram": 0}, "--ngram must be >= 1, got 0"),
    ({"ngram": 2, "num_draft_tokens": 0}, "--num-draft-tokens: the number of draft tokens must"),
    ({"num_draft_tokens": -1}, "draft tokens must be >= 1, got -1"),
    ({"draft": "d", "min_confidence": 1.5}, "--draft-confidence must be between 0 and 1"),
    ({"draft": "d", "min_confidence": 0.0}, "--draft-confidence must be between 0 and 1"),
    ({"min_confidence": 0.5}, "--draft-confidence needs a draft model"),
    ({"ngram": 3, "min_confidence": 0.5}, "--draft-confidence applies to a draft model"),
    ({"draft": "d", "cross_tokenizer": True, "min_confidence": 0.5},
     "not to --ngram or cross-tokenizer drafts"),
    ({"ngram": 3, "cross_tokenizer": True}, "--cross-tokenizer needs a draft model"),
    ({"draft": "d", "draft_dtype": "fp8"}, "--draft-dtype: unknown dtype 'fp8'"),
    ({"draft": "d", "draft_quantize": "int2"}, "unknown --draft-quantize 'int2'"),
])
def test_draft_options_reject_bad_values(kwargs, message) -> None:
    one_line_error(lambda: DraftOptions(**kwargs), message)


def test_draft_options_that_make_sense() -> None:
    assert not NO_DRAFTER.speculative
    assert DraftOptions(ngram=3).speculative
    careful = DraftOptions(draft="d", min_confidence=0.4, num_draft_tokens=8, adaptive=False)
    assert careful.speculative and careful.min_confidence == 0.4
    DraftOptions(draft="d", cross_tokenizer=True, draft_dtype="bfloat16", draft_quantize="int8")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"draft_lengths": "1,x"}, "--k takes comma-separated integers"),
    ({"draft_lengths": "0,2"}, "draft lengths must be >= 1"),
    ({"draft_confidences": [0.5]}, "--draft-confidence needs a draft model"),
    ({"drafts": ["d"], "draft_confidences": [1.5]}, "--draft-confidence must be between 0"),
    ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"),
    ({"threads": 0}, "--threads must be >= 1"),
    ({"peers": ["vllm"]}, "--peer takes hf or llama.cpp"),
    ({"also_ar": ["fp8"]}, "neither a dtype"),
    ({"ngrams": [0]}, "--ngram must be >= 1"),
    ({"draft_dtype": "int3"}, "--draft-dtype: unknown dtype"),
])
def test_bench_options_reject_bad_values(kwargs, message) -> None:
    one_line_error(lambda: BenchOptions(**kwargs), message)


def test_bench_options_plan() -> None:
    options = BenchOptions(drafts=["d"], ngrams=[2], draft_lengths="1,3", fixed=True,
                           adaptive=True, draft_confidences=[0.4])
    assert options.draft_lengths == (1, 3) and options.policies == [True, False]
    labels = [c.label for c in options.configs()]
    assert labels[0] == "ar" and "draft d k=3 fixed conf 0.4" in labels
    assert len(labels) == 1 + 2 * 2 * 2 + 2 * 2
    ngram = next(c for c in options.configs() if c.kind == "ngram").draft_options()
    assert ngram == DraftOptions(ngram=2, num_draft_tokens=1, adaptive=True)
    assert BenchOptions().prompt_limit == 5 and BenchOptions(prompts="p.jsonl").prompt_limit is None
    assert BenchOptions(drafts=["a"], cross_drafts=["b", "a"]).draft_models == ["a", "b"]


def parse(argv: list[str]) -> dict:
    args = gather_options(vars(build_parser().parse_args(argv)))
    args.pop("func")
    args.pop("command")
    return args


def test_the_cli_builds_the_dataclasses() -> None:
    args = parse(["generate", "hi", "--model", "m", "--dtype", "float32", "--quantize", "int8",
                  "--compile", "all", "--draft", "d", "--num-draft-tokens", "3", "--fixed",
                  "--draft-confidence", "0.4", "--draft-quantize", "int4"])
    assert args["load_options"] == LoadOptions("float32", "cpu", "int8", "all")
    assert args["draft_options"] == DraftOptions(
        draft="d", num_draft_tokens=3, adaptive=False, draft_quantize="int4",
        min_confidence=0.4)
    assert "dtype" not in args and "draft" not in args  # only inside the dataclasses
    defaults = parse(["generate", "hi", "--model", "m"])
    assert defaults["load_options"] == LOAD_DEFAULTS
    assert defaults["draft_options"] == NO_DRAFTER
    # perplexity loads in float32 by default and has no --compile
    ppl = parse(["eval", "perplexity", "a.txt", "--model", "m"])
    assert ppl["load_options"] == LoadOptions(dtype="float32")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "perplexity", "a.txt", "--model", "m",
                                   "--compile", "all"])
    bench = parse(["bench", "--model", "m", "--ngram", "2", "--ngram", "3", "--k", "2",
                   "--peer", "hf", "--also-ar", "bfloat16", "--quantize", "int8"])
    assert bench["options"] == BenchOptions(ngrams=[2, 3], draft_lengths="2", peers=["hf"],
                                            also_ar=["bfloat16"])
    assert bench["load_options"].quantize == "int8"
    assert parse(["bench", "--model", "m"])["options"] == BenchOptions()


def test_the_cli_checks_through_the_dataclasses() -> None:
    for argv, message in [
        (["generate", "hi", "--model", "m", "--draft", "d", "--draft-confidence", "1.5"],
         "between 0 and 1"),
        (["generate", "hi", "--model", "m", "--ngram", "2", "--num-draft-tokens", "0"],
         "draft tokens must be >= 1"),
        (["serve", "--model", "m", "--ngram", "2", "--draft-confidence", "0.5"],
         "--draft-confidence applies to a draft model"),
        (["eval", "humaneval", "--model", "m", "--ngram", "0"], "--ngram must be >= 1"),
        (["bench", "--model", "m", "--k", "0"], "draft lengths must be >= 1"),
    ]:
        one_line_error(lambda argv=argv: parse(argv), message)
    with pytest.raises(SystemExit):  # argparse: one drafter at a time
        build_parser().parse_args(["eval", "humaneval", "--model", "m", "--draft", "d",
                                   "--ngram", "2"])


def test_every_field_has_a_docstring_that_is_its_help() -> None:
    for cls in (LoadOptions, DraftOptions, BenchOptions):
        docs = field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
        assert all(docs.values())
    p = argparse.ArgumentParser()
    add_flags(p, DraftOptions, "draft_options", helps={"draft": "another help"},
              skip=("cross_tokenizer",))
    helps = {a.dest: a.help for a in p._actions}
    assert helps["draft"] == "another help"
    assert helps["num_draft_tokens"] == "draft length k"
    assert helps["adaptive"] == "keep the draft length fixed (default: adaptive)"
    assert "cross_tokenizer" not in helps
    assert gather_options(vars(p.parse_args([])))["draft_options"] == NO_DRAFTER


def test_separate_load_flags_for_a_verb_that_takes_them_one_by_one() -> None:
    from draftlm.options import add_load_flags

    p = argparse.ArgumentParser()
    add_load_flags(p, dtype="float32", compile_flag=False)
    assert gather_options(vars(p.parse_args(["--quantize", "int8"]))) == {
        "dtype": "float32", "device": "cpu", "quantize": "int8"}


def test_cuda_graphs_need_a_compiled_step() -> None:
    with pytest.raises(DraftlmError, match="--cuda-graphs records compiled steps"):
        LoadOptions(cuda_graphs=True)
    assert LoadOptions(compile_mode="all", cuda_graphs=True).cuda_graphs
    assert not LoadOptions(compile_mode="all").cuda_graphs  # the dynamic step by default
