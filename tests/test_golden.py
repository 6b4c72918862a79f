"""Golden values: a short train.py run and an evaluate.py table, pinned bit for bit on CPU (fp32).

The run: the tiny untied Llama of conftest (`chatty_model_dir`, random weights from seed 0) with the
real SmolLM2 tokenizer, trained for 3 optimizer steps on tests/fixtures/golden_rows.jsonl (27
medical Q&A rows and 5 out-of-domain ones, written for these tests), 4 rows x 2 accumulated
micro-batches, dropout on, a checkpoint and a validation pass at step 2. Then evaluate.py scores
its adapter against the base model on the medical rows of the test split and on 12 held-out scope
prompts (tests/fixtures/scope_prompts.jsonl, 3 of each kind of data/scope_heldout.jsonl).

Pinned: every metrics.jsonl number (train loss, lr, grad norm, tokens, validation loss, exactly as
logged), a hash of the final adapter's tensors, every number of the evaluation report, the
markdown table and every generated answer. Only the scripts' `main()` is called, so any refactor
of the modules behind them must reproduce these values exactly. They depend on torch's and transformers' random init and
kernels: after upgrading either, regenerate them (see `write_golden_values` below) and say why.
The float kernels differ between CPU classes too: last regenerated on 2026-11-29 on the Intel Xeon
(AVX512-BF16) machine, where the code from before that day's changes already logged losses that
differed from the AMD EPYC values in the last bits (10.838314998851104 vs 10.838314280790442 at
step 0); the report part changed on purpose that day (the scope gate column, the new rates, the
grounding rows, --limit bounding the scope prompts, answers cut at their second sentence). On
2026-11-30 only the full-sequence perplexities moved (about 1e-6 relative), when evaluation began to
take both perplexities from one forward pass with the system prompt run once per batch.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import evaluate
import train
from tests.conftest import SCOPE_PROMPTS

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROWS = FIXTURES / "golden_rows.jsonl"
GOLDEN = FIXTURES / "golden_values.json"
METRIC_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "skipped", "val_loss", "val_ppl")


def train_args(model_dir, run_dir) -> list[str]:
    return [
        "--model", str(model_dir), "--data", str(ROWS), "--output-dir", str(run_dir), "--precision", "fp32",
        "--max-steps", "3", "--max-length", "128", "--batch-size", "4", "--grad-accum", "2", "--max-batch-tokens", "0",
        "--eval-every", "2", "--save-every", "2", "--lr", "5e-3",
    ]


def tensor_digest(path: Path) -> str:
    """sha256 over every tensor's name, shape, dtype and bytes, in name order (no file metadata)."""
    digest = hashlib.sha256()
    tensors = load_file(path)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def observed_values(model_dir, tmp_path) -> dict:
    """Train, evaluate, and collect every number the golden file pins."""
    run_dir = tmp_path / "run"
    assert train.main(train_args(model_dir, run_dir)) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    argv = ["--adapter", str(run_dir / "adapter"), "--compare-base", "--max-new-tokens", "12", "--scope-set", str(SCOPE_PROMPTS)]
    assert evaluate.main(argv) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    return {
        "metrics": [{key: record[key] for key in METRIC_KEYS if key in record} for record in metrics],
        "final_adapter": tensor_digest(run_dir / "checkpoints" / "step-000003" / "adapter_model.safetensors"),
        "best_adapter": tensor_digest(run_dir / "adapter" / "adapter_model.safetensors"),
        "report": {key: value for key, value in report.items() if key != "settings"},
        "table": (run_dir / "eval.md").read_text(),
        "predictions": [json.loads(line) for line in (run_dir / "eval_predictions.jsonl").read_text().splitlines()],
    }


def write_golden_values(model_dir, tmp_path) -> None:
    """Regenerate tests/fixtures/golden_values.json (run by hand, never by the test)."""
    GOLDEN.write_text(json.dumps(observed_values(model_dir, tmp_path), indent=1) + "\n")


def test_train_and_evaluate_reproduce_the_golden_values(chatty_model_dir, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    observed = json.loads(json.dumps(observed_values(chatty_model_dir, tmp_path)))  # the same JSON round trip
    assert observed["metrics"] == golden["metrics"]
    assert observed["final_adapter"] == golden["final_adapter"]
    assert observed["best_adapter"] == golden["best_adapter"]
    assert observed["report"] == golden["report"]
    assert observed["table"] == golden["table"]
    assert observed["predictions"] == golden["predictions"]  # every generated answer, word for word
