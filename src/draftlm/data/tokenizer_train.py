"""`draftlm tokenizer train`: a byte-level BPE tokenizer learned from your own corpus.

Byte-level (GPT-2 style) so that every input, any language or binary junk, encodes
without unknown tokens; trained with the `tokenizers` library from the same sources
`draftlm prepare` reads (and with the same skipping of bad input). The result is a
draftlm `Tokenizer` saved as a HF folder (tokenizer.json + tokenizer_config.json), which
`draftlm prepare --tokenizer FOLDER` and HF transformers both load. `<|endoftext|>` (id 0)
is EOS, the document separator.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from draftlm.data.sources import expand_source, iter_documents
from draftlm.errors import DraftlmError
from draftlm.tokenizer import Tokenizer

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(
    sources: Sequence[str],
    output: str | None = None,
    vocab_size: int = 32000,
    field: str = "text",
    min_frequency: int = 2,
    max_line_chars: int = 10_000,
    max_documents: int | None = None,
    exclude: Sequence[str] = (),
) -> Tokenizer:
    """Learn a byte-level BPE of `vocab_size` ids (256 bytes + merges + EOS) from `sources`;
    saves it to `output` when given."""
    if vocab_size < 257:
        raise DraftlmError(f"--vocab-size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    files = [f for i, s in enumerate(sources) for f in expand_source(s, i, exclude)]
    skipped: Counter[str] = Counter()

    def documents() -> Iterator[str]:
        count = 0
        for file in files:
            for text in iter_documents(file, field, max_line_chars, skipped):
                yield text
                count += 1
                if max_documents is not None and count >= max_documents:
                    return

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(documents(), trainer=trainer)
    tokenizer = Tokenizer(backend, eos_ids=(backend.token_to_id(EOS_TOKEN),))
    if output is not None:
        tokenizer.save(Path(output).expanduser())
    return tokenizer


def cmd_tokenizer_train(**kwargs: Any) -> None:
    if not kwargs.get("output"):
        raise DraftlmError("--output FOLDER is required")
    tokenizer = train_tokenizer(**kwargs)
    print(json.dumps({"output": kwargs["output"], "vocab_size": tokenizer.vocab_size,
                      "fingerprint": tokenizer.fingerprint}))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("tokenizer", help="tokenizer tools")
    sub = group.add_subparsers(required=True, metavar="{train}")
    p = sub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    p.add_argument("sources", nargs="+", help="text files/folders, JSONL(.gz/.zst), Parquet, globs")
    p.add_argument("--output", required=True, help="folder to write tokenizer.json into")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--field", default="text", help="JSONL/Parquet field with the text")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-line-chars", type=int, default=10_000)
    p.add_argument("--max-documents", type=int, help="train on the first N documents only")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files or folders whose name matches (repeatable)")
    p.set_defaults(func=cmd_tokenizer_train)
