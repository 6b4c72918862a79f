"""Export a fine-tuned adapter for use outside this project: Hugging Face, llama.cpp, Ollama.

    python export.py --adapter runs/cpu/adapter --format hf --out exports/medlora-hf
    python export.py --adapter runs/cpu/adapter --format gguf --out exports/medlora-f16.gguf
    python export.py --adapter runs/cpu/adapter --format gguf --dtype q8_0 --out exports/medlora-q8_0.gguf
    python export.py --adapter runs/cpu/adapter --format gguf-lora --out exports/medlora-lora
    python export.py --adapter runs/cpu/adapter --format ollama --out exports/medlora-ollama
    ollama create medlora -f exports/medlora-ollama/Modelfile

The base model is the one named in the adapter's adapter_config.json. Formats:
  hf         merged safetensors + config + generation config + tokenizer (chat template)
  gguf       the merged model as one GGUF file (llama.cpp, LM Studio)
  gguf-lora  folder: base.gguf (unmodified base) + adapter.gguf (`llama-cli -m base.gguf --lora adapter.gguf`)
  ollama     folder: model.gguf (merged) + Modelfile
See docs/export.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from transformers.utils.logging import disable_progress_bar

from medlora.errors import USER_FAILURES, Interrupted, report_failure
from medlora.export import FORMATS, GGUF_DTYPES, export_adapter, scope_note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2]
    )
    parser.add_argument("--adapter", required=True, help="adapter folder written by train.py (RUN/adapter)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write (see below)")
    parser.add_argument("--out", required=True, help="file (gguf) or folder (hf, gguf-lora, ollama) to create")
    parser.add_argument("--dtype", choices=GGUF_DTYPES, help="weight storage: f32, f16 or q8_0 (8-bit blocks, GGUF only); norms stay f32 (default: f32 for hf, f16 for GGUF)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        disable_progress_bar()
        with contextlib.redirect_stdout(sys.stderr):  # loading notices go to stderr
            result = export_adapter(args.adapter, args.format, args.out, args.dtype, args.overwrite)
    except USER_FAILURES as error:  # bad flags, adapter, model or output: one line
        return report_failure(error)
    except KeyboardInterrupt:
        return report_failure(Interrupted("interrupted; nothing was written under --out"))
    print(f"exported {args.adapter} on {result.base_model} as {args.format} to {result.path} ({time.perf_counter() - started:.1f} s)")
    for name in result.files:
        print(f"  {result.path / name}")
    print(scope_note(args.adapter))
    if args.format == "ollama":
        print(f"next: ollama create NAME -f {result.path / 'Modelfile'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
