"""Inspect a dataset: cleaning report, split sizes, token-length stats.

    python -m data [--data PATH] [--num-examples N] [--max-length 512] [--json] [--histogram FILE.png]

A command-line entry point, not part of the package's library: it is the one module of data/ that
imports from outside it (the model loader, for the tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys

from data.load import DataError
from data.pipeline import prepare_data, save_length_histogram
from medlora.model import ModelLoadError, load_tokenizer  # the tokenizer to count tokens with


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="dataset file or hub id (default: the embedded dataset)")
    parser.add_argument("--model", default=None, help="whose tokenizer to count tokens with (default: embedded)")
    parser.add_argument("--num-examples", type=int, default=None, help="rows sampled after cleaning (default: all)")
    parser.add_argument("--seed", type=int, default=42, help="sampling and split seed (default: 42)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per example (default: 512)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="count and skip malformed JSON lines")
    parser.add_argument("--histogram", default=None, metavar="FILE.png", help="write a token-length histogram")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    try:
        prepared = prepare_data(
            load_tokenizer(args.model), args.data, args.num_examples, args.seed, args.max_length, args.skip_bad_rows
        )
    except (DataError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.histogram:
        save_length_histogram(prepared.token_lengths(), args.histogram, args.max_length)
    if args.json:
        print(json.dumps({
            "rows_read": prepared.cleaning.rows_read,
            "kept": prepared.cleaning.kept,
            "dropped": dict(prepared.cleaning.dropped),
            "bad_rows": prepared.bad_rows,
            "prompt_too_long": prepared.prompt_too_long,
            "splits": prepared.examples.sizes(),
            "token_lengths": prepared.token_length_stats(),
        }))
    else:
        print("\n".join(prepared.report_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
