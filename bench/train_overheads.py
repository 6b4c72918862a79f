"""What train.py --preset cpu spends outside its optimizer steps: one validation pass and one checkpoint.

    python -m bench.train_overheads                         # the cpu preset's split, budgets 1024,2048,4096
    python -m bench.train_overheads --budgets 1024 --repeats 3

The model, data, split and LoRA are the cpu preset's (embedded SmolLM2-135M-Instruct, embedded
flashcards, seed 42, r=16 on q_proj and v_proj, precision auto). Each row times
medlora.loss.validation_loss over the whole validation split with one padded-token budget per
micro-batch (train.py passes the preset's --max-batch-tokens), and
medlora.checkpoint.save_checkpoint after one real optimizer step, so the AdamW state exists. Each
figure is the best of --repeats runs, after one untimed warm-up validation pass.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from data import micro_batches, prepare_data
from lora import inject_lora, lora_parameters
from medlora.checkpoint import TrainState, save_checkpoint
from medlora.config import config_from_preset
from medlora.loss import AnswerLoss, validation_loss
from medlora.model import TORCH_DTYPES, autocast_for, load_model_and_tokenizer, resolve_precision
from medlora.optimizer_step import adamw, optimizer_step


def best_time(repeats: int, work) -> float:
    """The shortest wall time of `repeats` calls of `work()`, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--budgets", default="1024,2048,4096", help="padded tokens per validation micro-batch, comma-separated (default: 1024,2048,4096)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure; the best is kept (default: 2)")
    args = parser.parse_args(argv)
    budgets = [int(budget) for budget in args.budgets.split(",") if budget.strip()]
    if not budgets or min(budgets) <= 0 or args.repeats <= 0:
        parser.error(f"--budgets must be positive integers and --repeats positive, got {args.budgets!r} and {args.repeats}")

    config = config_from_preset("cpu")
    device = torch.device("cpu")
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(None, dtype=TORCH_DTYPES[precision], device=device)
    data = prepare_data(tokenizer, config.data, config.num_examples, config.seed, config.max_length)
    inject_lora(model, config.targets, config.rank, config.alpha, config.dropout, config.lora_variant)
    autocast = autocast_for(device.type, precision)
    validation = data.examples.validation
    tokens = sum(len(example.input_ids) for example in validation)
    print(f"cpu preset, precision {precision}, {torch.get_num_threads()} threads; validation split: {len(validation)} rows, {tokens} tokens")

    validation_loss(model, validation, tokenizer.pad_token_id, config.batch_size, config.max_batch_tokens, autocast)  # warm-up
    for budget in budgets:
        seconds = best_time(args.repeats, lambda: validation_loss(model, validation, tokenizer.pad_token_id, config.batch_size, budget, autocast))
        print(f"validation pass, token budget {budget:5d}: {seconds:6.2f} s ({tokens / seconds:6.0f} tokens/s)")

    optimizer = adamw(lora_parameters(model), config.lr, config.weight_decay, device)  # as train.py builds it
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    train = data.examples.train
    lengths = [len(example.input_ids) for example in train]
    batches = micro_batches(list(range(config.step_examples)), lengths, config.batch_size, config.max_batch_tokens)
    model.train()
    optimizer_step(model, optimizer, scaler, AnswerLoss(train, tokenizer.pad_token_id, device), batches, autocast, config.max_grad_norm)
    with tempfile.TemporaryDirectory(prefix="train-overheads-") as folder:
        state = TrainState()
        seconds = best_time(args.repeats, lambda: save_checkpoint(Path(folder), model, optimizer, scaler, state, config, "SmolLM2-135M-Instruct"))
    print(f"checkpoint (adapter + AdamW state + RNG + manifest): {seconds:.2f} s")


if __name__ == "__main__":
    main()
