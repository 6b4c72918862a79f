"""One checkpoint folder: adapter, optimizer, scaler, RNG and loop counters, written atomically.

    RUN/checkpoints/step-000010/
        adapter_model.safetensors, adapter_config.json   the LoRA weights (lora.save_adapter)
        optimizer.safetensors                            AdamW's moments, as tensors
        rng.safetensors                                  torch (and CUDA) RNG states (of rank 0 under torchrun)
        rng-rank1.safetensors, ...                       under torchrun: each other rank's RNG states, all of them
        trainer_state.json                               TrainState, optimizer hyperparameters, scaler, python/numpy RNG
        config.json                                      the run's TrainConfig
        manifest.json                                    size and sha256 of every file above

Under torchrun every rank holds the same adapter and optimizer state (the gradients are
all-reduced), so rank 0 writes them; each rank's RNG state (its own dropout stream) is gathered to
rank 0 and written too, which is what makes a resumed multi-rank run bit-exact.

Only safetensors and JSON: nothing is unpickled. A checkpoint is written into a temporary folder,
checksummed, fsynced and renamed into place, so a kill at any moment leaves either the complete
checkpoint or a `.tmp-*` folder that resume ignores; a checkpoint whose files do not match their
manifest is skipped on resume (medlora.run_folder.find_resume_checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from lora import load_adapter, save_adapter
from medlora.config import TrainConfig
from medlora.distributed import SINGLE_PROCESS, World

MANIFEST = "manifest.json"


@dataclass
class TrainState:
    """Loop counters that a checkpoint carries besides the tensors."""

    step: int = 0  # optimizer steps completed
    best_val_loss: float = float("inf")  # lowest validation loss so far (inf: none yet)
    skipped_steps: int = 0  # steps skipped for inf/NaN gradients or loss
    nan_streak: int = 0  # consecutive steps with a non-finite loss, up to now
    elapsed_s: float = 0.0  # training time so far, over every resumed session
    last_loss: float | None = None  # mean loss of the last step (None before the first)
    kept_step: int | None = None  # the step whose adapter adapter/ holds (None: none kept yet)
    kept_val_loss: float | None = None  # that adapter's validation loss

    def count_step(self, loss: float, skipped: bool, elapsed_s: float) -> None:
        """Advance the counters past one optimizer step whose mean loss was `loss`."""
        self.last_loss = loss
        self.nan_streak = 0 if math.isfinite(loss) else self.nan_streak + 1
        self.skipped_steps += int(skipped)
        self.step += 1
        self.elapsed_s = elapsed_s

    @classmethod
    def from_json(cls, values: dict) -> TrainState:
        """The saved counters; keys older checkpoints carry and this version does not use are dropped."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, in hex, read in 1 MiB blocks (checkpoint manifests, the scope gate's adapter)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-ready tensors and JSON-ready hyperparameters."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, slots in state["state"].items()
        for name, value in slots.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    """Load what `optimizer_tensors` split back into `optimizer`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG the run uses: python and numpy as JSON, torch (and CUDA) as tensors."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = value
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    json_state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, json_state


def restore_rng(tensors: dict[str, torch.Tensor], json_state: dict) -> None:
    """Put back every RNG state `rng_state` captured."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, keys, gauss = json_state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def rng_file_bytes(rng: tuple[dict[str, torch.Tensor], dict]) -> bytes:
    """One rank's RNG state as the bytes of a safetensors file: the tensors, and the JSON part as metadata."""
    tensors, json_state = rng
    return save(tensors, metadata={"rng": json.dumps(json_state)})


def rank_rng_file(rank: int) -> str:
    """The checkpoint file holding the RNG state of rank `rank` > 0."""
    return f"rng-rank{rank}.safetensors"


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    config: TrainConfig,
    base_model: str,
    rng: tuple[dict, dict] | None = None,
    world: World = SINGLE_PROCESS,
) -> Path | None:
    """Write run_dir/checkpoints/step-XXXXXX atomically (temp folder, files, manifest, rename), then
    delete all but the newest `config.keep_last` checkpoints.

    `rng` replaces the current RNG state (used when an interrupted step is discarded). Under
    torchrun every rank calls this: each sends rank 0 its RNG state, and rank 0 alone writes (the
    others return None).
    """
    rng = rng or rng_state()
    other_ranks_rng = world.gather_bytes(rng_file_bytes(rng))[1:]
    if not world.is_main:
        return None
    folder = run_dir / "checkpoints" / f"step-{state.step:06d}"
    staging = run_dir / "checkpoints" / f".tmp-step-{state.step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_adapter(model, staging, base_model=base_model)
        opt_tensors, opt_groups = optimizer_tensors(optimizer)
        save_file(opt_tensors, str(staging / "optimizer.safetensors"))
        rng_tensors, rng_json = rng
        save_file(rng_tensors, str(staging / "rng.safetensors"))
        for rank, payload in enumerate(other_ranks_rng, start=1):
            (staging / rank_rng_file(rank)).write_bytes(payload)
        trainer_state = {
            "train_state": dataclasses.asdict(state),
            "optimizer": opt_groups,
            "scaler": scaler.state_dict(),
            "rng": rng_json,
        }
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state))
        (staging / "config.json").write_text(json.dumps(config.to_json(), indent=2))
        write_manifest(staging)
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    prune_checkpoints(run_dir, config.keep_last)
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first (temporary folders are ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints."""
    for old in list_checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path) -> None:
    """manifest.json: size and sha256 of every other file in the checkpoint folder."""
    files = sorted(p for p in folder.iterdir() if p.name != MANIFEST)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file matches the manifest, else the reason (naming the file)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return f"{manifest_path} is unreadable"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        if file_sha256(path) != expected["sha256"]:
            return f"{path} fails its sha256 check (corrupted)"
    return None


def checkpoint_config(folder: Path) -> TrainConfig:
    """The TrainConfig stored in a checkpoint (its config.json)."""
    path = folder / "config.json"
    return TrainConfig.from_json(json.loads(path.read_text()), source=str(path))


def load_checkpoint(folder: Path, model, optimizer, scaler, rank: int = 0) -> TrainState:
    """Restore adapter, optimizer, scaler and the RNG state of rank `rank` from a verified checkpoint."""
    load_adapter(model, folder)
    saved = json.loads((folder / "trainer_state.json").read_text())
    restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), saved["optimizer"])
    if saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    if rank == 0:
        restore_rng(load_file(str(folder / "rng.safetensors")), saved["rng"])
    else:
        path = str(folder / rank_rng_file(rank))
        with safe_open(path, framework="pt") as handle:
            rng_json = json.loads(handle.metadata()["rng"])
        restore_rng(load_file(path), rng_json)
    return TrainState.from_json(saved["train_state"])
