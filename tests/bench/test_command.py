"""`draftlm bench` on tiny models: every configuration reaches JSON, markdown and PNG, and
greedy speculative rows reproduce the AR tokens. No timing is asserted."""

from __future__ import annotations

import json

import pytest
from helpers import no_eos_lm, noisy_copy, permuted_draft

from draftlm.bench.command import cmd_bench, load_prompts
from draftlm.bench.records import (
    ARVariant,
    BenchConfig,
    BenchOptions,
    parse_ks,
    parse_variant,
    plan,
)
from draftlm.cli import main
from draftlm.errors import DraftlmError
from draftlm.formats.hf import save_hf_folder
from draftlm.options import LoadOptions

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add", "import os\nimport sys\nimport"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Target, same-vocab draft and other-tokenizer draft as HF folders, plus prompts."""
    root = tmp_path_factory.mktemp("bench")
    target = no_eos_lm(0)
    for name, lm in (("target", target), ("draft", noisy_copy(target)),
                     ("cross", permuted_draft(target, 0.02))):
        save_hf_folder(root / name, lm.config, lm.model, lm.tokenizer)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root


def test_plan_and_arguments() -> None:
    configs = plan(["d"], [2], ["c"], [1, 3], [True, False])
    assert configs[0] == BenchConfig("ar")
    assert len(configs) == 1 + 3 * 2 * 2
    assert BenchConfig("draft", "d", 3, True).label == "draft d k=3 adaptive"
    # confidence thresholds add rows for draft models only
    with_conf = plan(["d"], [2], [], [3], [True], confidences=[0.4])
    assert [c.label for c in with_conf] == [
        "ar", "draft d k=3 adaptive", "draft d k=3 adaptive conf 0.4", "ngram 2 k=3 adaptive"]
    assert parse_ks("1,3,5") == [1, 3, 5]
    for bad in ("1,x", "0,2", ""):
        with pytest.raises(DraftlmError, match="draft lengths|comma-separated"):
            parse_ks(bad)


def test_prompt_sources(tmp_path, folders) -> None:
    assert load_prompts(folders / "prompts.jsonl") == PROMPTS
    assert load_prompts(folders / "prompts.jsonl", limit=1) == PROMPTS[:1]
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(PROMPTS))
    assert load_prompts(listed) == PROMPTS
    first = load_prompts(limit=2)
    assert len(first) == 2 and first[0].startswith("from typing import List")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(DraftlmError, match="prompt"):
        load_prompts(bad)


def test_bench_writes_every_configuration(folders, tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib", reason="the plot needs the 'bench' extra")
    out = tmp_path / "out"
    argv = ["bench", "--model", str(folders / "target"), "--draft", str(folders / "draft"),
            "--ngram", "2", "--cross-draft", str(folders / "cross"), "--k", "1,3",
            "--fixed", "--adaptive", "--prompts", str(folders / "prompts.jsonl"),
            "--max-new-tokens", "12", "--dtype", "float32", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    labels = [r["label"] for r in report["results"]]
    assert len(labels) == 1 + 3 * 2 * 2
    assert labels[0] == "ar"
    table = (out / "bench.md").read_text()
    assert all(f"| {label} |" in table for label in labels)
    assert table.split("\n\n", 3)[-1] in capsys.readouterr().out
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in report["results"]:
        assert row["num_prompts"] == 2 and row["num_new_tokens"] == 24
        assert row["same_as_ar"] in (None, 2)  # greedy: every drafter reproduces AR
        # decode-only rate (no prefill): plain decoding rows only
        assert (row["decode_tokens_per_second"] is None) == (row["kind"] != "ar")
        if row["kind"] != "ar":
            assert 0.0 <= row["acceptance_rate"] <= 1.0
            assert row["tokens_per_target_forward"] >= 1.0
            assert row["speedup"] > 0
    assert report["max_new_tokens"] == 12 and report["num_prompts"] == 2


def test_bench_with_hf_peer(folders, tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib", reason="the plot needs the 'bench' extra")
    out = tmp_path / "peer"
    argv = ["bench", "--model", str(folders / "target"), "--draft", str(folders / "draft"),
            "--k", "2", "--prompts", str(folders / "prompts.jsonl"), "--max-new-tokens", "8",
            "--dtype", "float32", "--peer", "hf", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "bench.json").read_text())["results"]
    labels = [r["label"] for r in results]
    assert labels[-2:] == ["hf", f"hf-assisted {folders / 'draft'}"]
    for row in results[-2:]:
        assert row["num_new_tokens"] == 16
        assert row["same_as_ar"] == 2  # HF's greedy tokens are ours
    assert "hf-assisted" in (out / "bench.md").read_text()


def test_quantized_bench_with_ar_rows_at_other_precisions(folders, tmp_path) -> None:
    """A quantized target keeps speculative rows equal to its own AR; the extra AR rows run
    the unquantized target in the same run. (`cmd_bench` called from Python.)"""
    pytest.importorskip("matplotlib", reason="the plot needs the 'bench' extra")
    out = tmp_path / "quant"
    report = cmd_bench(
        str(folders / "target"),
        BenchOptions(drafts=[str(folders / "draft")], ngrams=[2], draft_lengths=[3],
                     prompts=str(folders / "prompts.jsonl"), max_new_tokens=10,
                     also_ar=["float32", "bfloat16+int4"], out=str(out)),
        LoadOptions(dtype="float32", quantize="int8"),
    )
    assert report == json.loads((out / "bench.json").read_text())
    assert report["quantize"] == "int8" and report["draft_quantize"] == "int8"
    rows = {r["label"]: r for r in report["results"]}
    assert list(rows)[-2:] == ["ar float32", "ar bfloat16+int4"]
    for label, row in rows.items():
        assert row["num_new_tokens"] == 20
        if not label.startswith("ar"):
            assert row["same_as_ar"] == 2, label


def test_parse_variant() -> None:
    assert parse_variant("bfloat16", "auto") == ARVariant("bfloat16", "none")
    assert parse_variant("int8", "float32") == ARVariant("float32", "int8")
    assert parse_variant("float32+int4", "auto") == ARVariant("float32", "int4")
    compiled = parse_variant("int8+compile", "float32")
    assert compiled == ARVariant("float32", "int8", compiled=True)
    assert compiled.label == "float32+int8+compile"
    with pytest.raises(DraftlmError, match="neither a dtype"):
        parse_variant("fp8", "auto")


def test_llama_cpp_peer_needs_a_gguf(folders) -> None:
    from draftlm.bench.baselines import gguf_file_of

    with pytest.raises(DraftlmError, match="needs a GGUF model"):
        gguf_file_of(str(folders / "target"))


def test_bench_user_errors_are_one_line(folders, tmp_path, capsys) -> None:
    base = ["bench", "--model", str(folders / "target"), "--prompts",
            str(folders / "prompts.jsonl"), "--out", str(tmp_path)]
    assert main([*base, "--k", "0"]) == 1
    assert main([*base, "--draft", str(folders / "cross")]) == 1
    assert main([*base, "--draft", str(tmp_path / "nope")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 3
    assert "must be >= 1" in errors[0]
    assert "cross-tokenizer" in errors[1]
    assert "cannot load draft model" in errors[2]


def test_generate_cli_with_each_drafter(folders, capsys) -> None:
    """`draftlm generate --draft/--ngram/--cross-tokenizer` prints the AR text."""
    base = ["generate", PROMPTS[0], "--model", str(folders / "target"), "--json",
            "--max-new-tokens", "16", "--dtype", "float32", "--num-draft-tokens", "3"]

    def run(*extra: str) -> dict:
        assert main([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    plain = run()
    for extra in (["--draft", str(folders / "draft")], ["--ngram", "2", "--fixed"],
                  ["--draft", str(folders / "cross"), "--cross-tokenizer"]):
        result = run(*extra)
        assert result["text"] == plain["text"]
        assert "acceptance_rate" in result
    assert main([*base, "--draft", str(folders / "cross")]) == 1
    assert "--cross-tokenizer" in capsys.readouterr().err
    assert main([*base, "--ngram", "2", "--num-draft-tokens", "0"]) == 1
    assert "draft tokens must be >= 1" in capsys.readouterr().err


# ---- peers in a child process --------------------------------------------------------------
def test_a_peer_runs_in_a_child_and_a_crash_costs_only_its_row() -> None:
    from helpers import counting_peer, crashing_peer, failing_peer

    from draftlm.bench.baselines import run_isolated

    rows = run_isolated(counting_peer, (6,), "hf")
    assert [(r.config.kind, r.num_new_tokens, r.tokens_per_second) for r in rows] == [
        ("hf", 6, 3.0)]
    crashed = run_isolated(crashing_peer, (), "llama.cpp")
    assert len(crashed) == 1 and "crashed (signal 11)" in crashed[0].error
    assert crashed[0].summary(10.0)["error"] == crashed[0].error
    with pytest.raises(DraftlmError, match="needs a package"):
        run_isolated(failing_peer, (), "llama.cpp")


def test_bench_keeps_its_rows_when_a_peer_crashes(folders, tmp_path, monkeypatch) -> None:
    """The rows measured before a crashing native peer are written, the peer's row says
    what happened, and the command finishes normally."""
    pytest.importorskip("matplotlib", reason="the plot needs the 'bench' extra")
    from helpers import crashing_peer

    from draftlm.bench import command

    monkeypatch.setattr(command, "run_llama_cpp_peer", crashing_peer)
    out = tmp_path / "crash"
    report = cmd_bench(str(folders / "target"),
                       BenchOptions(ngrams=[2], draft_lengths=[2], peers=["llama.cpp"],
                                    prompts=str(folders / "prompts.jsonl"), max_new_tokens=6,
                                    out=str(out)),
                       LoadOptions(dtype="float32"))
    labels = [r["label"] for r in report["results"]]
    assert labels == ["ar", "ngram 2 k=2 adaptive", "llama.cpp"]
    assert "crashed" in report["results"][-1]["error"]
    assert report["results"][1]["same_as_ar"] == 2
    assert "crashed" in (out / "bench.md").read_text() and (out / "bench.png").is_file()
