"""The lm-eval adapter returns what the model says, computed directly, and the harness runs
an offline task (YAML over a JSONL file written here) with `--model draftlm`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_lm

from draftlm.eval.perplexity import token_nlls
from draftlm.generate import generate

pytest.importorskip("lm_eval", reason="the lm-eval adapter needs `pip install lm-eval`")

from draftlm.eval.lm_eval_adapter import register  # noqa: E402

DOCS = [
    {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "label": 0},
    {"question": "The capital of France is", "choices": [" Paris", " Rome"], "label": 1},
    {"question": "def f(x): return", "choices": [" x", " y", " z", " None"], "label": 3},
    {"question": "abc", "choices": ["d", "e"], "label": 0},
]


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm(seed=2)


@pytest.fixture(scope="module")
def adapter_class():
    return register()


def request(*args):
    return SimpleNamespace(args=args)


def direct_loglikelihood(lm, context: str, continuation: str) -> tuple[float, bool]:
    ctx = lm.tokenizer.encode(context)
    ids = ctx + lm.tokenizer.encode(continuation)
    with torch.no_grad():
        logprobs = F.log_softmax(lm.model(torch.tensor([ids[:-1]]))[0].float(), -1)
    target = torch.tensor(ids[len(ctx) :])
    lp = logprobs[len(ctx) - 1 :]
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def test_registered_under_draftlm(adapter_class) -> None:
    from lm_eval.api.registry import get_model

    assert get_model("draftlm") is adapter_class
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models still resolve
    assert register() is adapter_class  # idempotent


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_equals_direct_computation(lm, adapter_class, batch_size: int) -> None:
    adapter = adapter_class(lm=lm, batch_size=batch_size)
    pairs = [(d["question"], c) for d in DOCS for c in d["choices"]]
    results = adapter.loglikelihood([request(*p) for p in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=True):
        expected, expected_greedy = direct_loglikelihood(lm, context, continuation)
        assert logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert greedy == expected_greedy


def test_greedy_flag_true_for_the_models_own_continuation(lm, adapter_class) -> None:
    # In token space: a random byte model's greedy bytes need not be valid UTF-8.
    context = lm.tokenizer.encode("hello wor")
    own = generate(lm, context, max_new_tokens=3).token_ids
    assert len(own) == 3
    changed = [*own[:2], (own[2] + 1) % 256]
    adapter = adapter_class(lm=lm, batch_size=2)
    (_, greedy), (_, other) = adapter._loglikelihood_tokens(
        [(None, context, own), (None, context, changed)])
    assert greedy and not other


def test_rolling_loglikelihood_matches_draftlm_perplexity(lm, adapter_class) -> None:
    text = "import os\nprint(os.getcwd())  # where am I?\n" * 4
    adapter = adapter_class(lm=lm, max_length=32, batch_size=4)
    (total,) = adapter.loglikelihood_rolling([request(text)])
    # lm-eval's own window logic and draftlm's sliding window, written independently,
    # agree when stride == window.
    ids = [0, *lm.tokenizer.encode(text, add_bos=False)]
    assert len(ids) > 100
    expected = -token_nlls(lm.model, ids, max_seq_len=32, stride=32).double().sum().item()
    assert total == pytest.approx(expected, rel=1e-5)


def test_generate_until_equals_draftlm_generate(lm, adapter_class) -> None:
    adapter = adapter_class(lm=lm)
    prompts = ["def add(a, b):", "Once upon"]
    outputs = adapter.generate_until(
        [request(p, {"until": ["\n\n"], "max_gen_toks": 12}) for p in prompts])
    for prompt, text in zip(prompts, outputs, strict=True):
        assert text == generate(lm, prompt, max_new_tokens=12, stop=["\n\n"]).text


def test_chat_template_and_unknown_arguments(lm, adapter_class) -> None:
    adapter = adapter_class(lm=lm)
    messages = [{"role": "user", "content": "hi"}]
    assert adapter.apply_chat_template(messages) == lm.tokenizer.apply_chat_template(messages)
    assert adapter.chat_template(True) == lm.tokenizer.chat_template
    with pytest.raises(TypeError):
        adapter_class(lm=lm, modle="typo")


def write_task(folder: Path) -> Path:
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def expected_accuracy(lm) -> float:
    hits = []
    for d in DOCS:
        scores = [direct_loglikelihood(lm, d["question"], c)[0] for c in d["choices"]]
        hits.append(scores.index(max(scores)) == d["label"])
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_harness_runs_an_offline_multiple_choice_task(tmp_path: Path, lm, adapter_class,
                                                      monkeypatch) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    tasks = TaskManager(include_path=str(write_task(tmp_path)))
    out = lm_eval.simple_evaluate(model=adapter_class(lm=lm), tasks=["tiny_mc"],
                                  task_manager=tasks)
    accuracy = out["results"]["tiny_mc"]["acc,none"]
    assert accuracy == pytest.approx(expected_accuracy(lm))
    assert 0 < accuracy < 1  # the task tells right from wrong for this model


@pytest.mark.slow
def test_command_line_with_model_draftlm(tmp_path: Path, lm) -> None:
    from draftlm.formats.hf import save_hf_folder

    folder = tmp_path / "tiny"
    save_hf_folder(folder, lm.config, lm.model, lm.tokenizer)
    write_task(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    subprocess.run(
        [sys.executable, "-m", "draftlm.eval.lm_eval_adapter", "--model", "draftlm",
         "--model_args", f"model={folder},dtype=float32", "--tasks", "tiny_mc",
         "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")],
        check=True, env=env, timeout=600, capture_output=True,
    )
    (result,) = (tmp_path / "out").rglob("results_*.json")
    accuracy = json.loads(result.read_text())["results"]["tiny_mc"]["acc,none"]
    assert accuracy == pytest.approx(expected_accuracy(lm))
