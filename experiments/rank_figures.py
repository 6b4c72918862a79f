"""The rank study's figures and its energy summary, from the table and the adapters it trained.

    python evaluate.py --experiments experiments/rank.json          # first: runs/experiments/rank.json
    python -m experiments.rank_figures runs/experiments/rank.json --out-dir docs

Writes, into --out-dir:
    rank_val_ppl.png     validation answer-perplexity against r, one line per variant (the seed-42
                         cells), and the extra seeds of a cell as points beside its line
    rank_spectrum.png    the singular values of dW = s B A for one q_proj and one v_proj module
                         (--layer), one line per rank, for the plain-LoRA cells of seed 42
and prints, per experiment, the share of ||dW||_F^2 in the top 1, 4 and 16 singular directions,
averaged over the adapted modules (the LoRA paper's section 7 question: how low is the rank of
the update that training actually uses?).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lora.inspect import inspect_adapter
from medlora.run_folder import ADAPTER

MAIN_SEED = 42  # the seed of the 3 x 3 grid; other seeds are repeats of one cell
ENERGY_DIRECTIONS = (1, 4, 16)  # top-k singular directions whose share of ||dW||_F^2 is printed


def read_rows(table: str | Path) -> list[dict]:
    """The rows of an experiment table JSON (experiments.runner.save_experiments); ValueError if unreadable."""
    try:
        rows = json.loads(Path(table).read_text())["experiments"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{table}: not an experiment table written by evaluate.py --experiments ({error})") from None
    needed = {"name", "r", "variant", "seed", "val_ppl", "run_dir"}
    if not rows or not all(needed <= set(row) for row in rows):
        raise ValueError(f"{table}: every row needs {', '.join(sorted(needed))} (rerun evaluate.py --experiments)")
    return rows


def energy_shares(singular_values: list[float]) -> dict[int, float]:
    """Share of sum s_i^2 held by the top k singular values, for each k in ENERGY_DIRECTIONS (1.0 past r)."""
    energy = [value * value for value in singular_values]
    total = sum(energy)
    return {k: sum(energy[:k]) / total if total > 0 else float("nan") for k in ENERGY_DIRECTIONS}


def energy_table(rows: list[dict]) -> str:
    """Per experiment: the mean over modules of the top-1/4/16 energy shares of dW, as a markdown table."""
    lines = ["| Experiment | " + " | ".join(f"top {k}" for k in ENERGY_DIRECTIONS) + " |",
             "|---|" + "---:|" * len(ENERGY_DIRECTIONS)]
    for row in rows:
        modules = inspect_adapter(Path(row["run_dir"]) / ADAPTER)["modules"]
        shares = [energy_shares(module["singular_values"]) for module in modules]
        means = [statistics.fmean(share[k] for share in shares) for k in ENERGY_DIRECTIONS]
        lines.append(f"| {row['name']} | " + " | ".join(f"{mean:.3f}" for mean in means) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def save_figure(figure, path: Path) -> None:
    """Lay out `figure`, write it to `path` as a 120-dpi PNG and free it."""
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)


def style_spectrum_axis(axis, layer: int, projection: str, legend_size: str | None = None) -> None:
    """One panel of a dW spectrum figure: log-log axes (index on base 2), its title and legend."""
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("index i")
    axis.set_title(f"layer {layer} {projection}")
    axis.legend(fontsize=legend_size)


def plot_val_ppl(rows: list[dict], path: Path) -> None:
    """Validation answer-perplexity against r (log axis), one line per variant; repeat seeds as grey points."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for variant in dict.fromkeys(row["variant"] for row in rows):
        cells = sorted((row["r"], row["val_ppl"]) for row in rows if row["variant"] == variant and row["seed"] == MAIN_SEED)
        axis.plot([r for r, _ in cells], [ppl for _, ppl in cells], marker="o", label=variant)
    repeats = [row for row in rows if row["seed"] != MAIN_SEED]
    if repeats:
        axis.scatter([row["r"] for row in repeats], [row["val_ppl"] for row in repeats], color="grey", marker="x",
                     zorder=3, label="other seeds (" + ", ".join(sorted({row["variant"] for row in repeats})) + ")")
    axis.set_xscale("log", base=2)
    ranks = sorted({row["r"] for row in rows})
    axis.set_xticks(ranks, [str(r) for r in ranks])
    axis.set_xlabel("rank r")
    axis.set_ylabel("validation answer-perplexity")
    axis.set_title("Rank study: validation perplexity after training")
    axis.legend()
    save_figure(figure, path)


def plot_spectrum(rows: list[dict], layer: int, path: Path) -> None:
    """Singular values of dW for layer `layer`'s q_proj and v_proj, one line per rank (plain LoRA, main seed)."""
    plt = pyplot()
    cells = sorted((row["r"], row["run_dir"]) for row in rows if row["variant"] == "lora" and row["seed"] == MAIN_SEED)
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for axis, projection in zip(axes, ("q_proj", "v_proj")):
        name = f"model.layers.{layer}.self_attn.{projection}"
        for r, run_dir in cells:
            modules = {module["name"]: module for module in inspect_adapter(Path(run_dir) / ADAPTER)["modules"]}
            if name not in modules:
                raise ValueError(f"{run_dir}: no adapted module {name} (choose another --layer)")
            values = modules[name]["singular_values"]
            axis.plot(range(1, len(values) + 1), values, marker=".", label=f"r = {r}")
        style_spectrum_axis(axis, layer, projection)
    axes[0].set_ylabel("singular value s_i of dW")
    figure.suptitle("Spectrum of the trained update dW = (alpha/r) B A (plain LoRA)")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rank_figures", description=__doc__.splitlines()[0])
    parser.add_argument("table", help="the experiment table JSON of the rank study (default path: runs/experiments/rank.json)")
    parser.add_argument("--out-dir", default="docs", help="folder for the PNG files (default: docs)")
    parser.add_argument("--layer", type=int, default=15, help="decoder layer whose q_proj and v_proj spectra are drawn (default: 15)")
    args = parser.parse_args(argv)
    try:
        rows = read_rows(args.table)
        out_dir = Path(args.out_dir)
        plot_val_ppl(rows, out_dir / "rank_val_ppl.png")
        plot_spectrum(rows, args.layer, out_dir / "rank_spectrum.png")
        print(energy_table(rows))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir / 'rank_val_ppl.png'}, {out_dir / 'rank_spectrum.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
