"""The evaluation's outputs: the markdown table, the JSON report, the predictions, the bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from medlora.evaluation.run import Evaluation
from medlora.evaluation.scores import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, METRICS
from medlora.evaluation.settings import OUT_OF_DOMAIN_TOPIC

COLUMN_TITLES = {"base": "Base", "finetuned": "Fine-tuned"}


def format_value(summary: dict, name: str) -> str:
    """'value [low, high]' with the metric's decimals; declines also show the count."""
    value, interval, digits = summary[name], summary["intervals"][name], METRICS[name].digits
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    if name == "ood_decline_rate":
        text += f" ({summary['ood_declined']}/{summary['ood_n']})"
    return text


def format_delta(delta: dict | None, name: str) -> str:
    if delta is None:
        return "n/a"
    digits = METRICS[name].digits
    low, high = delta["interval"]
    return f"{delta['value']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]" + (" *" if delta["excludes_zero"] else "")


def markdown_table(report: dict) -> str:
    """Metric | Base | Fine-tuned | Delta, each cell 'value [95% interval]', and a footnote."""
    keys = [key for key in ("base", "finetuned") if key in report]
    has_delta = "delta" in report
    header = ["Metric"] + [COLUMN_TITLES[key] for key in keys] + (["Delta (fine-tuned - base)"] if has_delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name, metric in METRICS.items():
        cells = [metric.label] + [format_value(report[key], name) for key in keys]
        if has_delta:
            cells.append(format_delta(report["delta"][name], name))
        lines.append("| " + " | ".join(cells) + " |")
    first = report[keys[0]]
    settings = report["settings"]
    extra = len(settings["extra_ood_questions"])
    lines += [
        "",
        f"{first['n']} {settings['split']} examples; {first['ood_n']} out-of-domain questions "
        f"({first['ood_n'] - extra} from the split + {extra} held out). Perplexity: lower is better; "
        f"the others: higher is better. [low, high] = 95% bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples, "
        f"seed {BOOTSTRAP_SEED})" + ("; * = the paired interval of the delta excludes 0." if has_delta else "."),
    ]
    return "\n".join(lines)


def output_paths(output: str | Path) -> dict[str, Path]:
    """The files written for --output FILE.json: the report, predictions, chart and table."""
    path = Path(output)
    return {
        "json": path,
        "predictions": path.with_name(f"{path.stem}_predictions.jsonl"),
        "chart": path.with_name(f"{path.stem}_metrics.png"),
        "table": path.with_suffix(".md"),
    }


def prediction_rows(evaluation: Evaluation) -> list[dict]:
    """One row per question: question, reference, and each model's answer (held-out OOD rows have no reference)."""
    settings = evaluation.report["settings"]
    rows = [
        {"source": settings["split"], "topic": e.topic, "question": e.question, "reference": e.answer}
        for e in evaluation.examples
    ] + [
        {"source": "heldout_ood", "topic": OUT_OF_DOMAIN_TOPIC, "question": q, "reference": None}
        for q in settings["extra_ood_questions"]
    ]
    ood_rows = [i for i, row in enumerate(rows) if row["topic"] == OUT_OF_DOMAIN_TOPIC]
    for key in [key for key in ("base", "finetuned") if key in evaluation.outputs]:
        outputs = evaluation.outputs[key]
        for row, answer in zip(rows, outputs.answers):
            row[key] = answer
        for index, answer, declined in zip(ood_rows, outputs.ood_answers, outputs.ood_declines):
            rows[index][key] = answer
            rows[index][f"{key}_declined"] = bool(declined)
    return rows


def save_chart(report: dict, path: Path) -> None:
    """Bar chart of every metric per model with its 95% interval: scores in [0, 1] left, perplexities right."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    keys = [key for key in ("base", "finetuned") if key in report]
    colors = {"base": "#bbbbbb", "finetuned": "#4477aa"}
    panels = [
        ("score (higher is better)", ["bleu", "rouge1", "rouge2", "rougeL", "ood_decline_rate"]),
        ("perplexity (lower is better)", ["perplexity", "perplexity_full"]),
    ]
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [5, 2]})
    width = 0.8 / len(keys)
    for axis, (ylabel, names) in zip(axes, panels):
        names = [name for name in names if report[keys[0]][name] is not None]
        for offset, key in enumerate(keys):
            values = [report[key][name] for name in names]
            low = [value - report[key]["intervals"][name][0] for name, value in zip(names, values)]
            high = [report[key]["intervals"][name][1] - value for name, value in zip(names, values)]
            positions = [i + (offset - (len(keys) - 1) / 2) * width for i in range(len(names))]
            axis.bar(positions, values, width, yerr=[low, high], capsize=3, color=colors[key], label=COLUMN_TITLES[key])
        axis.set_xticks(range(len(names)), [METRICS[name].label.replace(" (", "\n(") for name in names], fontsize=8)
        axis.set_ylabel(ylabel)
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    figure.suptitle(f"{report['settings']['split']} split, n = {report[keys[0]]['n']} (error bars: 95% bootstrap interval)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def save_evaluation(evaluation: Evaluation, output: str | Path) -> dict[str, Path]:
    """Write the JSON report, the predictions JSONL, the bar chart PNG and the markdown table."""
    paths = output_paths(output)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(evaluation.report, indent=2) + "\n")
    with open(paths["predictions"], "w") as handle:
        for row in prediction_rows(evaluation):
            handle.write(json.dumps(row) + "\n")
    save_chart(evaluation.report, paths["chart"])
    paths["table"].write_text(markdown_table(evaluation.report) + "\n")
    return paths
