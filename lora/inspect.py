"""What a trained adapter learned: norms, singular values and the LoRA paper's section 7 analysis.

    python -m lora.inspect runs/cpu/adapter
    python -m lora.inspect runs/cpu/adapter --base ~/.cache/medlora/smollm2-135m-instruct --json
    python -m lora.inspect runs/cpu/adapter --base BASE_FOLDER --plot adapter.png

For every adapted module, with dW = scaling * B A (scaling = alpha/r, or alpha/sqrt(r) for rsLoRA;
for DoRA this is the update of the direction, before m rescales each row):
    ||dW||_F and ||dW||_F / ||W0||_F          how big the update is, absolutely and next to W0
    singular values s_1 >= s_2 >= ...        via QR of B [out, r] and of A^T [in, r], then the SVD
                                              of an r x r core: the [out, in] matrix is never formed
    stable rank = ||dW||_F^2 / s_1^2         how many directions carry the update (1 <= it <= r)
    energy in the top 1 and top 4            s_1^2 / sum s_i^2, (s_1^2 + ... + s_4^2) / sum s_i^2
    ||U^T W0 V||_F, amplification            Hu et al. (2021), section 7: U, V the top-r singular
                                              vectors of dW; how much W0 already points along dW,
                                              and ||dW||_F / ||U^T W0 V||_F
    DoRA's magnitude change                  ||m - ||W0||_row|| / || ||W0||_row ||: how far the learned
                                              row lengths m moved from their start, the row norms of W0
The W0 columns need the base model's weights: `--base` names a folder of .safetensors files
(a Hugging Face model folder). Without it those columns are absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lora.adapter_files import read_adapter
from lora.layer import lora_scaling

LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModuleReport:
    """The inspector's numbers for one adapted module; W0-dependent fields are None without a base."""

    name: str  # qualified module name, e.g. "model.layers.0.self_attn.q_proj"
    shape: tuple[int, int]  # (out, in) of W0 and dW
    delta_norm: float  # ||dW||_F
    singular_values: list[float]  # of dW, descending; min(r, out, in) of them
    stable_rank: float | None  # ||dW||_F^2 / s_1^2; None when dW = 0
    top1_energy: float | None  # s_1^2 / sum s_i^2; None when dW = 0
    top4_energy: float | None  # (s_1^2 + ... + s_4^2) / sum s_i^2; None when dW = 0
    base_norm: float | None = None  # ||W0||_F
    relative_norm: float | None = None  # ||dW||_F / ||W0||_F
    projected_base_norm: float | None = None  # ||U^T W0 V||_F
    amplification: float | None = None  # ||dW||_F / ||U^T W0 V||_F
    magnitude_change: float | None = None  # DoRA: ||m - ||W0||_row|| / || ||W0||_row ||; None for lora/rslora


def delta_svd(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, ...]:
    """Thin SVD of dW = scaling * B A, in float64, without forming the [out, in] matrix.

    B = Q_B R_B and A^T = Q_A R_A give dW = Q_B (scaling R_B R_A^T) Q_A^T; the SVD of the small
    core, U_c S V_c^T, gives dW = (Q_B U_c) S (Q_A V_c)^T.

    Returns:
        U [out, k], S [k] (descending), V [in, k], with k = min(r, out, in).
    """
    q_b, r_b = torch.linalg.qr(lora_B.double())  # [out, k1], [k1, r]
    q_a, r_a = torch.linalg.qr(lora_A.double().T)  # [in, k2], [k2, r]
    core = scaling * r_b @ r_a.T  # [k1, k2]
    u_core, singular_values, vh_core = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u_core, singular_values, q_a @ vh_core.T


def inspect_module(
    name: str,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    base_weight: torch.Tensor | None = None,
    magnitude: torch.Tensor | None = None,
) -> ModuleReport:
    """The inspector's numbers for one module; pass its base weight W0 [out, in] for the W0 columns.

    For DoRA pass the magnitude vector m [out] as well: with W0 given, the report then holds
    magnitude_change = ||m - ||W0||_row||_2 / || ||W0||_row ||_2 (both [out] vectors; 0 at init).
    """
    u, s, v = delta_svd(lora_A, lora_B, scaling)
    energy = s.square()
    total = float(energy.sum())
    delta_norm = math.sqrt(total)
    report = ModuleReport(
        name=name,
        shape=(lora_B.shape[0], lora_A.shape[1]),
        delta_norm=delta_norm,
        singular_values=s.tolist(),
        stable_rank=total / float(energy[0]) if total > 0 else None,
        top1_energy=float(energy[0]) / total if total > 0 else None,
        top4_energy=float(energy[:4].sum()) / total if total > 0 else None,
    )
    if base_weight is None:
        return report
    w0 = base_weight.double()
    base_norm = float(torch.linalg.matrix_norm(w0))
    projected = float(torch.linalg.matrix_norm(u.T @ w0 @ v))  # [k, out] @ [out, in] @ [in, k]
    start_magnitude = torch.linalg.vector_norm(w0, dim=1)  # [out]: DoRA's m at init
    magnitude_change = (
        float(torch.linalg.vector_norm(magnitude.double() - start_magnitude) / torch.linalg.vector_norm(start_magnitude))
        if magnitude is not None and base_norm > 0
        else None
    )
    return replace(
        report,
        base_norm=base_norm,
        relative_norm=delta_norm / base_norm if base_norm > 0 else None,
        projected_base_norm=projected,
        amplification=delta_norm / projected if projected > 0 else None,
        magnitude_change=magnitude_change,
    )


def read_base_weights(folder: str | os.PathLike, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The weight of every named module from a folder of .safetensors files, checked against `shapes`.

    Module "model.layers.0.self_attn.q_proj" is looked up as "<name>.weight", then without or with
    the leading "model.", so both a causal-LM folder and a bare-model folder work.

    Raises:
        ValueError: naming the folder and the first module that is missing or misshapen.
    """
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        raise ValueError(f"--base {folder}: not a folder holding .safetensors files")
    where: dict[str, Path] = {}
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                where.update({key: file for key in handle.keys()})
        weights = {}
        for name, shape in shapes.items():
            bare = name.removeprefix("model.")
            key = next((k for k in (f"{name}.weight", f"{bare}.weight", f"model.{bare}.weight") if k in where), None)
            if key is None:
                raise ValueError(f"--base {folder}: no weight for adapted module {name} (looked for {name}.weight)")
            with safe_open(str(where[key]), framework="pt") as handle:
                weights[name] = handle.get_tensor(key)
            if tuple(weights[name].shape) != shape:
                raise ValueError(
                    f"--base {folder}: {key} has shape {list(weights[name].shape)} but the adapter's "
                    f"update is {list(shape)} (adapter made for another base model?)"
                )
    except (SafetensorError, OSError) as error:
        raise ValueError(f"--base {folder}: not readable safetensors ({error})") from None
    return weights


def inspect_adapter(adapter: str | os.PathLike, base: str | os.PathLike | None = None) -> dict:
    """Inspect every module of an adapter folder; with `base`, include the W0 columns.

    Returns:
        {"adapter", "base", "variant", "r", "lora_alpha", "scaling", "modules": [ModuleReport as dict]}.

    Raises:
        ValueError (AdapterError included): one line naming the bad file or value.
    """
    config, modules = read_adapter(adapter)
    scaling = lora_scaling(config["lora_alpha"], config["r"], rslora=config["variant"] == "rslora")
    shapes = {name: (t["lora_B"].shape[0], t["lora_A"].shape[1]) for name, t in modules.items()}
    base_weights = read_base_weights(base, shapes) if base is not None else {}
    reports = [
        inspect_module(name, t["lora_A"], t["lora_B"], scaling, base_weights.get(name), t.get("lora_magnitude_vector"))
        for name, t in modules.items()
    ]
    return {
        "adapter": str(adapter),
        "base": None if base is None else str(base),
        "variant": config["variant"],
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "scaling": scaling,
        "modules": [asdict(report) for report in reports],
    }


def number(value: float | None, spec: str) -> str:
    """`value` formatted by `spec` (e.g. "7.2f"), or "-" right-aligned to the same width when absent."""
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def format_table(result: dict) -> str:
    """A short fixed-width table, one row per module, and a note when the W0 columns are absent."""
    header = f"{'module':<34} {'|dW|_F':>9} {'/|W0|':>7} {'s_1':>9} {'st.rank':>7} {'top1':>5} {'top4':>5} {'|UtW0V|':>8} {'amplif':>7} {'|dm|/|m0|':>9}"
    lines = [
        f"{result['adapter']}: {result['variant']}, r={result['r']}, alpha={result['lora_alpha']}, "
        f"scaling={result['scaling']:.4g}, {len(result['modules'])} modules",
        header,
    ]
    for m in result["modules"]:
        lines.append(
            f"{m['name'].removeprefix('model.'):<34} {m['delta_norm']:>9.4g} {number(m['relative_norm'], '7.4f')} "
            f"{m['singular_values'][0]:>9.4g} {number(m['stable_rank'], '7.2f')} {number(m['top1_energy'], '5.2f')} "
            f"{number(m['top4_energy'], '5.2f')} {number(m['projected_base_norm'], '8.4g')} "
            f"{number(m['amplification'], '7.3g')} {number(m['magnitude_change'], '9.4f')}"
        )
    if result["base"] is None:
        lines.append("W0 columns (/|W0|, |UtW0V|, amplif, |dm|/|m0|) absent: pass --base FOLDER with the base model's safetensors")
    return "\n".join(lines)


def plot_heatmap(result: dict, path: str | os.PathLike) -> None:
    """Two layer x module heatmaps: ||dW||_F / ||W0||_F (or ||dW||_F without a base) and stable rank."""
    # Lazy import: matplotlib is only needed for --plot, and lora/ otherwise imports only torch,
    # safetensors and json. This is a study tool, so a plotting dependency here is acceptable.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def row_of(name: str) -> str:
        found = LAYER_INDEX.search(name)
        return found.group(1) if found else name.rsplit(".", 1)[0]

    rows = list(dict.fromkeys(row_of(m["name"]) for m in result["modules"]))
    columns = sorted({m["name"].rsplit(".", 1)[-1] for m in result["modules"]})
    size_key, size_label = (
        ("delta_norm", "||dW||_F") if result["base"] is None else ("relative_norm", "||dW||_F / ||W0||_F")
    )
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(columns), 1.5 + 0.3 * len(rows)), squeeze=False)
    for axis, (key, label) in zip(axes[0], ((size_key, size_label), ("stable_rank", "stable rank"))):
        grid = [[float("nan")] * len(columns) for _ in rows]
        for m in result["modules"]:
            value = m[key]
            grid[rows.index(row_of(m["name"]))][columns.index(m["name"].rsplit(".", 1)[-1])] = (
                float("nan") if value is None else value
            )
        image = axis.imshow(grid, aspect="auto", cmap="viridis")
        axis.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
        axis.set_yticks(range(len(rows)), rows)
        axis.set_xlabel("module")
        axis.set_ylabel("layer")
        axis.set_title(label)
        figure.colorbar(image, ax=axis)
    figure.suptitle(f"{result['variant']} r={result['r']}: {result['adapter']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora.inspect",
        description="What a trained LoRA/rsLoRA/DoRA adapter learned: norms, singular values, stable rank, "
        "and the LoRA paper's section 7 amplification factor, per adapted module.",
    )
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument(
        "--base", help="folder of the base model's .safetensors files, for the W0 columns (default: none, columns absent)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", metavar="PNG", help="also write a layer x module heatmap to this PNG file")
    args = parser.parse_args(argv)
    try:
        result = inspect_adapter(args.adapter, args.base)
        if args.plot:
            plot_heatmap(result, args.plot)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
