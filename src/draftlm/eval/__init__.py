"""Evaluation: HumanEval in a sandbox, perplexity / bits-per-byte, lm-evaluation-harness.

The modules share one `draftlm eval` command group; each adds its own verb to it."""

from __future__ import annotations

import argparse


def eval_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-command list of `draftlm eval`, created by whichever module registers first."""
    parser = subparsers.choices.get("eval")
    if parser is None:
        parser = subparsers.add_parser("eval", help="evaluate models (humaneval, perplexity, ...)")
        # No dest: the verb's function receives only its own flags.
        return parser.add_subparsers(required=True, metavar="VERB")
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
