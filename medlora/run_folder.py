"""The run folder, the contract between the scripts: the one place that reads and writes it.

    RUN/
        config.json          the TrainConfig that produced the run (base model, data, seed, split...)
        metrics.jsonl        one JSON record per optimizer step, and one per validation pass
        token_lengths.png    histogram of the encoded lengths (written by train.py through data/)
        loss_curve.png       train and validation loss per step
        summary.json         final numbers: losses, steps, time, memory, parameters
        adapter/             the adapter with the best validation loss (PEFT format)
        checkpoints/step-*/  the last --keep-last checkpoints (medlora.checkpoint)
        eval.json, eval.md   written by evaluate.py next to the run

train.py writes it; evaluate.py reads config.json to rebuild the same split; chat.py and export
read adapter/; the experiment runner reads summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from medlora.checkpoint import checkpoint_config, list_checkpoints, verify_checkpoint
from medlora.config import TrainConfig, resumed_config
from medlora.distributed import SINGLE_PROCESS, World

ADAPTER = "adapter"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RUN_CONFIG_FIELDS = ("model", "data", "num_examples", "seed", "max_length")  # what evaluation needs from a run


def open_run_dir(
    config: TrainConfig, given: set[str], resume: str | None, overwrite: bool, world: World = SINGLE_PROCESS,
) -> tuple[TrainConfig, Path | None]:
    """Prepare config.output_dir (prepare_run_dir); return the run's config and the checkpoint to resume.

    Resuming continues the checkpoint's own config; a setting in `given` (set on the command
    line) that differs from it, or another number of ranks, is refused (medlora.config.resumed_config).
    Under torchrun rank 0 alone prepares the folder and picks the checkpoint, and every other rank
    continues from the one it picked (the run folder must be on a file system every rank sees).
    """
    config = dataclasses.replace(config, world_size=world.world_size)
    picked = prepare_run_dir(Path(config.output_dir), resume, overwrite) if world.is_main else None
    picked_name = world.text_from_main(str(picked) if picked else "")
    checkpoint = Path(picked_name) if picked_name else None
    if checkpoint is None:
        return config, None
    return resumed_config(checkpoint_config(checkpoint), config, given, str(checkpoint / CONFIG)), checkpoint


def prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Create or check the run folder; return the checkpoint to resume from, or None.

    resume: None (a new run: refuse a folder holding one unless `overwrite`), "auto" (the newest
    checkpoint whose files match their manifest, else start from step 0) or a checkpoint folder.
    """
    if resume:
        checkpoint = find_resume_checkpoint(run_dir, resume)
        if checkpoint is not None:
            return checkpoint
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"--output-dir {run_dir} already holds a run; pass --resume auto to continue it or --overwrite to replace it")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--output-dir {run_dir} is not writable ({error.strerror})") from None
    return None


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint `--resume` names, skipping (with a notice) any that fails its manifest."""
    candidates = [Path(resume)] if resume != "auto" else list_checkpoints(run_dir)
    for folder in candidates:
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        print(f"[resume] skipping {folder.name}: {problem}; falling back to the previous checkpoint")
    if resume != "auto":
        raise ValueError(f"--resume {resume}: not a usable checkpoint")
    print(f"[resume] no complete checkpoint in {run_dir}; starting from step 0")
    return None


# ---- config.json --------------------------------------------------------------------------------

def write_config(run_dir: Path, config: TrainConfig) -> None:
    (run_dir / CONFIG).write_text(json.dumps(config.to_json(), indent=2) + "\n")


def run_folder_of(adapter: str | Path) -> Path | None:
    """The run folder holding `adapter` (RUN/adapter with a RUN/config.json), or None."""
    run_dir = Path(adapter).parent
    return run_dir if (run_dir / CONFIG).is_file() else None


def read_config(run_dir: Path) -> TrainConfig:
    """RUN/config.json; ValueError naming the file when it cannot be used."""
    path = run_dir / CONFIG
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable run config ({error})") from None
    if not isinstance(values, dict) or not set(RUN_CONFIG_FIELDS) <= set(values):
        raise ValueError(f"{path}: not a train.py run config (needs the keys {', '.join(RUN_CONFIG_FIELDS)})")
    return TrainConfig.from_json(values, source=str(path))


# ---- metrics.jsonl ------------------------------------------------------------------------------

def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records logged after `step` by an interrupted run, so a resumed log has no duplicates."""
    path = run_dir / METRICS
    if path.is_file():
        kept = [record for record in read_metrics(run_dir) if record["step"] <= step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))


LOSS_SMOOTHING_HALF_WIDTH = 4  # the smoothed train loss averages 2 * 4 + 1 = 9 steps, centred on each step


def centred_moving_average(values: list[float], half_width: int = LOSS_SMOOTHING_HALF_WIDTH) -> list[float]:
    """Mean of values[i - half_width .. i + half_width] for each i; the window is cut at both ends.

    Centred, so the smoothed curve does not lag behind the raw one (an exponential moving average
    would); at the ends the window holds fewer steps (the first point averages steps 0..half_width).
    Length-grouped batches make the per-step loss zig-zag (short answers score differently from
    long ones); the average over 9 steps shows the trend.
    """
    if half_width < 0:
        raise ValueError(f"half_width must be >= 0, got {half_width}")
    smoothed = []
    for index in range(len(values)):
        window = values[max(0, index - half_width) : index + half_width + 1]
        smoothed.append(sum(window) / len(window))
    return smoothed


def save_loss_curve(run_dir: Path) -> None:
    """loss_curve.png: the raw train loss of every step, its centred moving average, and the validation loss."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    if train:
        steps, losses = zip(*train)
        axes.plot(steps, losses, label="train loss (per step)", color="#4477aa", alpha=0.35, linewidth=1)
        width = 2 * LOSS_SMOOTHING_HALF_WIDTH + 1
        axes.plot(steps, centred_moving_average(list(losses)), label=f"train loss ({width}-step centred mean)", color="#4477aa", linewidth=2)
    if val:
        axes.plot(*zip(*val), "o-", label="validation loss", color="#cc3311")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("answer-token loss (nats)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "loss_curve.png", dpi=100)


# ---- summary.json -------------------------------------------------------------------------------

def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / SUMMARY).read_text())


def finished_run_summary(config: TrainConfig) -> dict | None:
    """summary.json of a finished run of exactly this config in its output_dir, or None.

    The saved config is read as a TrainConfig, so a setting added since the run (absent from its
    config.json) counts as its default.
    """
    run_dir = Path(config.output_dir)
    try:
        saved = TrainConfig.from_json(json.loads((run_dir / CONFIG).read_text()))
        summary = read_summary(run_dir)
    except (OSError, ValueError, TypeError):  # json.JSONDecodeError is a ValueError
        return None
    return summary if saved == config and (run_dir / ADAPTER).is_dir() else None
