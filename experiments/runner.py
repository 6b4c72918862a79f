"""The experiment runner: train each experiment of a JSON list, evaluate its adapter, write one table.

    experiments = load_experiments("experiments/cpu.json")
    rows = run_experiments(experiments, {"limit": 8, "max_new_tokens": 64})
    save_experiments(rows, "runs/experiments/cpu.json")        # JSON + markdown table

Each experiment trains in its own `python train.py --config FILE` process (the run folder is the
contract between the two), so its peak memory is its own; the evaluation runs here, through the
library, and the inspector (lora.inspect) describes each adapter's update dW.

A finished run of the same config is not trained again, and its RUN/eval.json is reused when it
was made with the same evaluation settings, so a long plan can run in chunks (one experiment per
call, each under its own lock) and the last call over the whole file only writes the table.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import statistics
import tempfile
from pathlib import Path

from lora.inspect import inspect_adapter
from medlora.config import TrainConfig, config_from_preset
from medlora.errors import TrainingStopped
from medlora.evaluation.report import save_evaluation
from medlora.evaluation.run import run_evaluation
from medlora.evaluation.settings import EvalSettings, resolve_settings
from medlora.model import resolve_model_source
from medlora.run_folder import ADAPTER, CONFIG, finished_run_summary, read_metrics, read_summary

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"

EXPERIMENT_KEYS = ("name", "description")  # allowed in an experiment besides TrainConfig fields
EXPERIMENT_COLUMNS = {  # row key -> column title, in table order
    "name": "Experiment", "r": "r", "variant": "Variant", "lora_plus_ratio": "LoRA+ λ", "seed": "Seed", "lr": "LR", "epochs": "Epochs",
    "train_loss": "Train loss", "val_ppl": "Val ppl", "perplexity": "Test ppl", "rouge1": "ROUGE-1",
    "rougeL": "ROUGE-L", "bleu": "BLEU", "s_per_step": "s/step", "trainable_params": "Trainable",
    "stable_rank": "Stable rank", "relative_norm": "|dW|/|W0|", "magnitude_change": "|dm|/|m0|",
    "peak_memory_gb": "Peak memory (GB)", "time_min": "Time (min)",
}


def load_experiments(path: str | Path) -> list[tuple[str, TrainConfig]]:
    """Read a JSON list of experiments: each a preset plus TrainConfig overrides and a unique name.

        [{"name": "EXP-01", "preset": "t4", "rank": 8, "lr": 2e-4, "epochs": 1}, ...]

    An experiment's run folder is runs/experiments/<name> unless it sets output_dir.

    Raises:
        ValueError: naming the file, the experiment and the bad key or value.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable experiments file ({error})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path}: expected a non-empty JSON list of objects, one per experiment")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    experiments, names = [], set()
    for index, entry in enumerate(entries):
        name = entry.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"{path}: experiment {index} needs a unique \"name\", got {name!r}")
        names.add(name)
        unknown = sorted(set(entry) - fields - set(EXPERIMENT_KEYS))
        if unknown:
            raise ValueError(f"{path}: {name}: unknown key {unknown[0]!r}; allowed: {', '.join(EXPERIMENT_KEYS)} and the TrainConfig fields")
        overrides = {key: value for key, value in entry.items() if key in fields and key != "preset"}
        try:
            config = config_from_preset(entry.get("preset", "cpu"), **{"output_dir": f"runs/experiments/{name}", **overrides})
            config.validate()
        except ValueError as error:
            raise ValueError(f"{path}: {name}: {error}") from None
        experiments.append((name, config))
    return experiments


def train_in_subprocess(name: str, config: TrainConfig) -> dict:
    """Train `config` with `python train.py --config FILE` in a process of its own; return its summary.

    A stale run of another config in the same folder is replaced (--overwrite). Raises
    TrainingStopped, with train.py's exit code, when training fails (train.py printed why).
    """
    command = [sys.executable, str(TRAIN_SCRIPT)]
    if (Path(config.output_dir) / CONFIG).is_file():
        command.append("--overwrite")
    with tempfile.TemporaryDirectory(prefix="experiment-") as folder:
        config_file = Path(folder) / CONFIG
        config_file.write_text(json.dumps(config.to_json()))
        finished = subprocess.run([*command, "--config", str(config_file)])
    if finished.returncode != 0:
        raise TrainingStopped(
            f"experiment {name}: train.py ended with exit code {finished.returncode} (its message is above); "
            "the experiments after it did not run",
            exit_code=finished.returncode,
        )
    return read_summary(Path(config.output_dir))


def saved_evaluation(settings: EvalSettings) -> dict | None:
    """The report in settings.output if it was made with these settings (where they came from aside), else None."""
    try:
        report = json.loads(Path(settings.output).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    wanted = json.loads(json.dumps(settings.to_json()))
    saved = report.get("settings") if isinstance(report, dict) else None
    if not isinstance(saved, dict) or {**saved, "sources": None} != {**wanted, "sources": None}:
        return None
    return report


def adapter_means(adapter: Path, model: str | None) -> dict[str, float | None]:
    """The inspector's stable rank, ||dW||_F / ||W0||_F and (DoRA) magnitude change, each averaged over modules.

    W0 is read from the base model's folder (the embedded model's cache, or a local folder); for a
    hub id there is no folder to read, and the two W0 columns are None.
    """
    source = Path(resolve_model_source(model))
    modules = inspect_adapter(adapter, source if source.is_dir() else None)["modules"]

    def mean(key: str) -> float | None:
        values = [module[key] for module in modules if module[key] is not None]
        return statistics.fmean(values) if values else None

    return {key: mean(key) for key in ("stable_rank", "relative_norm", "magnitude_change")}


def median_step_seconds(run_dir: str | Path) -> float | None:
    """The median wall time of one optimizer step, from the elapsed_s of metrics.jsonl's step records.

    A median, so that a burst of other work on a shared machine (or a validation pass between two
    steps) moves it less than it moves the mean; None when the run logged fewer than two steps.
    """
    elapsed = [record["elapsed_s"] for record in read_metrics(Path(run_dir)) if "loss" in record and "elapsed_s" in record]
    durations = [later - earlier for earlier, later in zip(elapsed, elapsed[1:])]
    return statistics.median(durations) if durations else None


def run_experiments(experiments: list[tuple[str, TrainConfig]], eval_flags: dict, progress: bool = True) -> list[dict]:
    """Train each experiment (train_in_subprocess), evaluate its adapter, inspect it, return one row each.

    A run folder that already holds a finished run of the same config is not trained again, and
    its RUN/eval.json is reused when made with the same settings. The evaluation uses
    `eval_flags` (limit, generation, device...) and the run's own config for model, data and
    split; it scores only the fine-tuned model, on the split alone.
    """
    rows = []
    for number, (name, config) in enumerate(experiments, start=1):
        print(f"[experiments] {name} ({number}/{len(experiments)}): run folder {config.output_dir}")
        summary = finished_run_summary(config)
        trained_now = summary is None
        if trained_now:
            summary = train_in_subprocess(name, config)
        else:
            print(f"[experiments] {name}: reusing the finished run (same config) in {config.output_dir}")
        adapter = Path(config.output_dir) / ADAPTER
        settings = resolve_settings({**eval_flags, "adapter": str(adapter), "output": str(Path(config.output_dir) / "eval.json")})
        settings.scope = False  # the experiment table has no scope rates
        report = None if trained_now else saved_evaluation(settings)
        if report is None:
            evaluation = run_evaluation(settings, progress)
            save_evaluation(evaluation, settings.output)
            report = evaluation.report
        else:
            print(f"[experiments] {name}: reusing its evaluation (same settings) in {settings.output}")
        finetuned = report["finetuned"]
        rows.append({
            "name": name, "r": config.rank, "variant": config.lora_variant, "lora_plus_ratio": config.lora_plus_ratio,
            "seed": config.seed, "lr": config.lr,
            "epochs": config.epochs, "train_loss": summary["train_loss"], "val_ppl": summary["best_val_ppl"],
            "perplexity": finetuned["perplexity"], "rouge1": finetuned["rouge1"], "rougeL": finetuned["rougeL"],
            "bleu": finetuned["bleu"], "s_per_step": median_step_seconds(config.output_dir),
            "trainable_params": summary["trainable_params"], **adapter_means(adapter, config.model),
            "peak_memory_gb": summary["peak_memory_gb"], "time_min": summary["time_s"] / 60,
            "steps": summary["steps"], "n": finetuned["n"], "run_dir": config.output_dir,
        })
        gc.collect()
    return rows


def experiments_table(rows: list[dict]) -> str:
    """The experiment table as markdown, one row per experiment, with a footnote on each column's meaning."""
    formats = {"lora_plus_ratio": "{:g}", "lr": "{:.3g}", "epochs": "{:g}", "train_loss": "{:.4f}", "val_ppl": "{:.3f}", "perplexity": "{:.3f}",
               "rouge1": "{:.4f}", "rougeL": "{:.4f}", "bleu": "{:.4f}", "s_per_step": "{:.2f}", "trainable_params": "{:,}",
               "stable_rank": "{:.2f}", "relative_norm": "{:.4f}", "magnitude_change": "{:.4f}", "peak_memory_gb": "{:.2f}",
               "time_min": "{:.1f}"}
    lines = ["| " + " | ".join(EXPERIMENT_COLUMNS.values()) + " |", "|---|" + "---:|" * (len(EXPERIMENT_COLUMNS) - 1)]
    for row in rows:
        cells = [formats.get(key, "{}").format(row[key]) if row[key] is not None else "n/a" for key in EXPERIMENT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    n = sorted({row["n"] for row in rows})
    lines += [
        "",
        "LoRA+ λ: B's learning rate over A's (n/a: one learning rate). Train loss: answer-token loss of the last optimizer step; val ppl: answer-token perplexity of the best "
        "validation pass. Test ppl (answer tokens), ROUGE-1 and ROUGE-L (mean F1) and BLEU-4 of the fine-tuned model "
        f"on {'/'.join(map(str, n))} held-out examples. s/step: the median wall time of one optimizer step "
        "(metrics.jsonl). Trainable: LoRA parameters. Stable rank (||dW||_F^2 / s_1^2), |dW|/|W0| (||dW||_F / ||W0||_F) and, "
        "for DoRA, |dm|/|m0| (||m - ||W0||_row|| / || ||W0||_row ||): python -m lora.inspect, averaged over the "
        "adapted modules. Peak memory: of the experiment's training process, CUDA peak allocation on a GPU, "
        "peak resident memory on a CPU. Time: training only.",
    ]
    return "\n".join(lines)


def save_experiments(rows: list[dict], output: str | Path) -> dict[str, Path]:
    """Write the experiment table as JSON and markdown (same name, .md)."""
    paths = {"json": Path(output), "table": Path(output).with_suffix(".md")}
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps({"experiments": rows}, indent=2) + "\n")
    paths["table"].write_text(experiments_table(rows) + "\n")
    return paths
