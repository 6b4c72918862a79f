"""Round two of the rank study (issue 33: PiSSA and LoRA+): validation curves, and where PiSSA's update lies.

    python evaluate.py --experiments experiments/rank2.json         # first: runs/experiments/rank2.json
    python -m experiments.rank2_figures runs/experiments/rank2.json --out-dir docs

Writes, into --out-dir:
    rank2_val_curves.png      validation answer-perplexity against optimizer step (the validation
                              passes in each run's metrics.jsonl), one line per seed-42 cell, the
                              other seeds as thin grey lines
    rank2_pissa_spectrum.png  the singular values of dW for one q_proj and one v_proj module (--layer),
                              one line per cell compared below, and W0's own as a dashed reference
and prints, for the seed-42 r-16 cells lora, pissa, lora + LoRA+ 16 and pissa + LoRA+ 16 (those in
the table), per projection and averaged over its modules: the share of ||dW||_F^2 in the top 1 and
top 4 singular directions of dW, and the share of ||dW||_F^2 inside W0's top-r singular directions,

    ||U0_r^T dW V0_r||_F^2 / ||dW||_F^2     (U0_r [out, r], V0_r [in, r]: W0's top-r singular vectors)

next to its chance level r^2 / (out in), the expected share for random r-dimensional subspaces.
dW is the update relative to the original W0 for both variants: a PiSSA adapter is saved as the
rank-2r plain LoRA of the original base (lora.layer.PiSSALinear), so dW = s B' A' there too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from experiments.rank_figures import MAIN_SEED, energy_shares, pyplot, read_rows, save_figure, style_spectrum_axis
from lora.adapter_files import read_adapter
from lora.inspect import delta_svd, read_base_weights
from lora.layer import lora_scaling
from medlora.model import cache_dir
from medlora.run_folder import ADAPTER, METRICS, read_metrics

NAME_PREFIX = "RANK2-"  # dropped from the cell names in the figures and the table
COMPARED_CELLS = (("lora", None), ("pissa", None), ("lora", 16.0), ("pissa", 16.0))  # (variant, LoRA+ ratio)
PROJECTIONS = ("q_proj", "v_proj")
COMPARED_RANK = 16  # r of the compared cells, and the dimension of W0's top subspace dW is measured against


def label(row: dict) -> str:
    """The cell's name without the study's prefix, e.g. "r16-pissa-lp16"."""
    return row["name"].removeprefix(NAME_PREFIX)


def validation_curve(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, val_ppl) of every validation pass logged in RUN/metrics.jsonl, in step order.

    Validation records are the ones carrying "val_loss" (train.py's validate); the others are steps.
    """
    if not (Path(run_dir) / METRICS).is_file():
        raise ValueError(f"{run_dir}: no {METRICS} (run folder missing, or the run never started)")
    points = sorted((record["step"], record["val_ppl"]) for record in read_metrics(Path(run_dir)) if "val_loss" in record)
    if not points:
        raise ValueError(f"{Path(run_dir) / METRICS}: no validation records (trained without validation rows?)")
    return points


def plot_val_curves(rows: list[dict], path: Path) -> None:
    """Validation answer-perplexity against optimizer step, one line per seed-42 cell, other seeds thin grey.

    The y axis is logarithmic: a diverging cell (PiSSA with LoRA+ can reach hundreds) and the
    cells near 5 stay readable on one figure.
    """
    plt = pyplot()
    from matplotlib.ticker import LogFormatter

    figure, axis = plt.subplots(figsize=(7, 4.2))
    repeat_label = "other seeds"
    for row in rows:
        steps, ppls = zip(*validation_curve(row["run_dir"]))
        if row["seed"] == MAIN_SEED:
            axis.plot(steps, ppls, marker="o", label=label(row))
        else:
            axis.plot(steps, ppls, color="grey", linewidth=0.8, alpha=0.7, label=repeat_label)
            repeat_label = None  # one legend entry for all the repeats
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(LogFormatter())  # plain numbers ("6", "200"), not "6 x 10^0"
    axis.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("validation answer-perplexity")
    axis.set_title("Rank study, round two: validation during training")
    axis.legend(fontsize="small")
    save_figure(figure, path)


def compared_cells(rows: list[dict], r: int) -> list[dict]:
    """The seed-42 rank-r rows of COMPARED_CELLS that the table holds, in that order."""
    found = {(row["variant"], row.get("lora_plus_ratio")): row for row in rows if row["seed"] == MAIN_SEED and row["r"] == r}
    cells = [found[key] for key in COMPARED_CELLS if key in found]
    if not cells:
        raise ValueError(f"the table has no seed-{MAIN_SEED} r-{r} lora or pissa cell to compare")
    return cells


def delta_factors(run_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """dW = U diag(S) V^T of every module of RUN/adapter: {name: (U [out, k], S [k], V [in, k])} (delta_svd)."""
    config, modules = read_adapter(Path(run_dir) / ADAPTER)
    scaling = lora_scaling(config["lora_alpha"], config["r"], rslora=config["variant"] == "rslora")
    return {name: delta_svd(tensors["lora_A"], tensors["lora_B"], scaling) for name, tensors in modules.items()}


def top_subspace(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W0's top-r singular vectors, in float64: U0_r [out, r] and V0_r [in, r]."""
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)  # [out, k], [k], [k, in]
    return u[:, :r], vh[:r].T


def subspace_alignment(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, u0: torch.Tensor, v0: torch.Tensor) -> float:
    """||U0^T dW V0||_F^2 / ||dW||_F^2 for dW = U diag(S) V^T: the share of dW inside span(U0) x span(V0).

    U [out, k], S [k], V [in, k]; U0 [out, r], V0 [in, r] orthonormal. U0^T dW V0 = (U0^T U) diag(S)
    (V^T V0) is an r x r matrix, so the [out, in] one is never formed. NaN when dW = 0.
    """
    inside = ((u0.T @ u) * s) @ (v.T @ v0)  # [r, k] scaled per column by S, @ [k, r]
    total = float(s.square().sum())
    return float(inside.square().sum()) / total if total > 0 else float("nan")


def chance_alignment(r: int, shape: tuple[int, int]) -> float:
    """r^2 / (out in): subspace_alignment's expected value for uniformly random r-dim subspaces U0, V0."""
    out_features, in_features = shape
    return r * r / (out_features * in_features)


def pissa_vs_lora(rows: list[dict], base_folder: str | Path, r: int = COMPARED_RANK) -> list[dict]:
    """Per compared cell and projection, the means over its modules of dW's top-1 and top-4 energy
    shares, of its alignment with W0's top-r directions, and of that alignment's chance level.

    Returns:
        [{"cell", "projection", "modules", "top1", "top4", "alignment", "chance"}], cells in
        COMPARED_CELLS order, then q_proj before v_proj.
    """
    subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # W0's SVD, once per module for all cells
    results = []
    for row in compared_cells(rows, r):
        factors = delta_factors(row["run_dir"])
        shapes = {name: (u.shape[0], v.shape[0]) for name, (u, _, v) in factors.items()}
        missing = {name: shape for name, shape in shapes.items() if name not in subspaces}
        subspaces |= {name: top_subspace(weight, r) for name, weight in read_base_weights(base_folder, missing).items()}
        for projection in PROJECTIONS:
            names = [name for name in factors if name.rsplit(".", 1)[-1] == projection]
            if not names:
                continue
            shares = [energy_shares(factors[name][1].tolist()) for name in names]
            results.append({
                "cell": label(row), "projection": projection, "modules": len(names),
                "top1": statistics.fmean(share[1] for share in shares),
                "top4": statistics.fmean(share[4] for share in shares),
                "alignment": statistics.fmean(subspace_alignment(*factors[name], *subspaces[name]) for name in names),
                "chance": statistics.fmean(chance_alignment(r, shapes[name]) for name in names),
            })
    return results


def alignment_table(results: list[dict], r: int) -> str:
    """pissa_vs_lora's numbers as a markdown table, with a footnote on the alignment column."""
    lines = [f"| Cell | Projection | top 1 | top 4 | in W0's top {r} | chance |", "|---|---|---:|---:|---:|---:|"]
    for result in results:
        lines.append(f"| {result['cell']} | {result['projection']} | {result['top1']:.3f} | {result['top4']:.3f} "
                     f"| {result['alignment']:.4f} | {result['chance']:.1e} |")
    lines += ["", f"top k: share of ||dW||_F^2 in dW's top k singular directions. In W0's top {r}: "
              f"||U0^T dW V0||_F^2 / ||dW||_F^2, U0, V0 W0's top-{r} singular vectors; chance: {r}^2 / (out in), "
              f"its expected value for random {r}-dim subspaces. Means over the adapted modules of each projection."]
    return "\n".join(lines)


def plot_pissa_spectrum(rows: list[dict], base_folder: str | Path, layer: int, path: Path, r: int = COMPARED_RANK) -> None:
    """Singular values of dW for layer `layer`'s q_proj and v_proj, one line per compared cell, and
    W0's largest singular values (dashed grey) for scale."""
    plt = pyplot()
    cells = [(label(row), delta_factors(row["run_dir"])) for row in compared_cells(rows, r)]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for axis, projection in zip(axes, PROJECTIONS):
        name = f"model.layers.{layer}.self_attn.{projection}"
        for cell, factors in cells:
            if name not in factors:
                raise ValueError(f"{cell}: no adapted module {name} (choose another --layer)")
            values = factors[name][1].tolist()
            axis.plot(range(1, len(values) + 1), values, marker=".", label=cell)
        u, _, v = cells[0][1][name]
        weight = read_base_weights(base_folder, {name: (u.shape[0], v.shape[0])})[name]
        longest = max(len(factors[name][1]) for _, factors in cells)
        base_values = torch.linalg.svdvals(weight.double())[:longest].tolist()
        axis.plot(range(1, len(base_values) + 1), base_values, linestyle="--", color="grey", label="W0 (for scale)")
        style_spectrum_axis(axis, layer, projection, legend_size="small")
    axes[0].set_ylabel("singular value s_i")
    figure.suptitle(f"Spectrum of the trained update dW (relative to the original W0), r = {r}")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rank2_figures", description=__doc__.splitlines()[0])
    parser.add_argument("table", help="the experiment table JSON of round two (default path: runs/experiments/rank2.json)")
    parser.add_argument("--out-dir", default="docs", help="folder for the PNG files (default: docs)")
    parser.add_argument("--layer", type=int, default=15, help="decoder layer whose q_proj and v_proj spectra are drawn (default: 15)")
    parser.add_argument("--base", default=str(cache_dir()),
                        help="folder of the base model's .safetensors files, for W0 (default: the embedded model's cache, %(default)s)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        rows = read_rows(args.table)
        plot_val_curves(rows, out_dir / "rank2_val_curves.png")
        results = pissa_vs_lora(rows, args.base)
        plot_pissa_spectrum(rows, args.base, args.layer, out_dir / "rank2_pissa_spectrum.png")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(alignment_table(results, COMPARED_RANK))
    print(f"wrote {out_dir / 'rank2_val_curves.png'}, {out_dir / 'rank2_pissa_spectrum.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
