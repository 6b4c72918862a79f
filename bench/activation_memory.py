"""What autograd keeps for the backward pass, per real token, in one micro-batch of train.py's loop.

    python -m bench.activation_memory                       # the embedded data, a 1,024-token micro-batch
    python -m bench.activation_memory --max-batch-tokens 512

The embedded SmolLM2-135M-Instruct in float32 with LoRA r=16 on q_proj and v_proj (dropout 0.05),
the cpu preset's micro-batching (data.micro_batches, length-grouped order), the loss train.py
takes (medlora.loss.answer_nll: shared prefix, answer-only lm_head). Every tensor autograd saves
during the forward pass is counted once (by storage), the model's parameters left out, and put on
the module that was running when it was saved (the innermost one; a module's own code outside its
children counts for it). This is the memory that grows with the tokens of a micro-batch; the
weights (0.54 GB), torch itself and the allocator's slack come on top of it in the peak RSS.
"""

from __future__ import annotations

import argparse
import collections
import random

import torch

from data import clean_rows, collate, encode_example, load_rows, micro_batches
from lora import inject_lora
from medlora.loss import answer_nll
from medlora.model import load_model_and_tokenizer

SEED = 0


def saved_bytes_by_module(model, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes saved for backward by one forward pass of answer_nll, by the class of the module saving them."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    running: list[str] = ["(loss)"]  # the modules being run, innermost last
    seen: set[int] = set()
    saved: collections.Counter = collections.Counter()

    def enter(module, _):
        running.append(type(module).__name__)

    def leave(*_):
        running.pop()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[running[-1]] += storage.nbytes()
        return tensor

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            answer_nll(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(saved)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-batch-tokens", type=int, default=1024, help="padded tokens per micro-batch (default: 1024, the cpu preset)")
    args = parser.parse_args(argv)
    model, tokenizer = load_model_and_tokenizer(None, dtype=torch.float32, device="cpu")
    inject_lora(model, ("q_proj", "v_proj"), 16, 32, 0.05)
    model.train()
    pairs, _ = clean_rows(load_rows(None).rows, "embedded")
    random.Random(SEED).shuffle(pairs)
    examples = [encode_example(tokenizer, pair.question, pair.answer, 512) for pair in pairs[:64]]
    lengths = [len(example.input_ids) for example in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    rows = max(micro_batches(order, lengths, 64, args.max_batch_tokens), key=len)  # a full micro-batch
    batch = collate([examples[i] for i in rows], tokenizer.pad_token_id)
    real = int(batch["attention_mask"].sum())
    saved = saved_bytes_by_module(model, batch)
    total = sum(saved.values())
    print(f"micro-batch of {len(rows)} rows x {batch['input_ids'].shape[1]} tokens ({real} real), token budget {args.max_batch_tokens}")
    print(f"saved for backward: {total / 1e6:.0f} MB = {total / real / 1e3:.0f} KB per real token")
    print(f"{'module (innermost running)':<28}{'MB':>8}{'KB/token':>10}{'share':>8}")
    for name, size in sorted(saved.items(), key=lambda item: -item[1]):
        print(f"{name:<28}{size / 1e6:>8.1f}{size / real / 1e3:>10.1f}{size / total:>8.0%}")


if __name__ == "__main__":
    main()
