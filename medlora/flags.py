"""The command-line flags train.py and evaluate.py share, declared once with one help text each.

    add_shared_flags(parser, {"model": "the embedded SmolLM2-135M-Instruct", ...})

Both scripts name the base model, the data and the split the same way (evaluate.py must rebuild
the split training held out), so the flags, their types and their meaning live here; each script
says only what its default is, since train.py's come from --preset and evaluate.py's from the run.
"""

from __future__ import annotations

import argparse

from medlora.model import PRECISIONS

SHARED_FLAGS = ("model", "data", "num_examples", "seed", "max_length", "precision", "device")


def add_shared_flags(parser: argparse.ArgumentParser, defaults: dict[str, str]) -> None:
    """Add --model, --data, --num-examples, --seed, --max-length, --precision and --device.

    `defaults` words each flag's default for this script's --help (every name of SHARED_FLAGS).
    None of them sets an argparse default: a flag not given is None, so the script can tell a
    given value from its own default.
    """
    missing = sorted(set(SHARED_FLAGS) - set(defaults))
    if missing:
        raise ValueError(f"add_shared_flags: no default wording for {', '.join(missing)}")
    add = parser.add_argument
    add("--model", help=f"base model: local folder or hub id (default: {defaults['model']})")
    add("--data", help=f"dataset file (.json/.jsonl/.csv/.parquet) or hub id (default: {defaults['data']})")
    add("--num-examples", type=int, help=f"rows sampled after cleaning, before the 85/10/5 split (default: {defaults['num_examples']})")
    add("--seed", type=int, help=f"random seed of the sampled rows, the split and the script's other draws (default: {defaults['seed']})")
    add("--max-length", type=int, help=f"tokens per example; a longer answer is cut, never the prompt (default: {defaults['max_length']})")
    add("--precision", choices=PRECISIONS, help=f"weight and autocast dtype (default: {defaults['precision']})")
    add("--device", help=f"cpu, cuda or cuda:N (default: {defaults['device']})")
