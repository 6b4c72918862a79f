"""The evaluation's outputs: the markdown table, the JSON report, the predictions, the bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from medlora.evaluation.run import Evaluation
from medlora.evaluation.scores import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, METRICS
from medlora.evaluation.settings import NON_MEDICAL_TOPICS, SCOPE_MAX_NEW_TOKENS
from medlora.scope import REFERRAL_KINDS, is_decline, is_referral

COLUMN_TITLES = {"base": "Base", "finetuned": "Fine-tuned"}


def format_value(summary: dict, name: str) -> str:
    """'value [low, high]' with the metric's decimals; scope rates also show count/total."""
    value, interval, digits = summary[name], summary["intervals"][name], METRICS[name].digits
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    if METRICS[name].population == "scope":
        text += f" ({summary['scope'][name]['count']}/{summary['scope'][name]['total']})"
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
    scope_total = sum(rate["total"] for rate in first["scope"].values())
    scope_note = (
        f" Scope rates: {scope_total} held-out prompts ({Path(settings['scope_set'] or 'scope_heldout.jsonl').name}, answers of at most "
        f"{SCOPE_MAX_NEW_TOKENS} new tokens), (count/total), [low, high] = Wilson 95% interval." if scope_total else ""
    )
    lines += [
        "",
        f"Perplexity, BLEU, ROUGE: {first['n']} medical {settings['split']} examples (rows of topic "
        f"{' or '.join(NON_MEDICAL_TOPICS)} left out); [low, high] = 95% bootstrap interval "
        f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}).{scope_note} Lower is better for perplexity and "
        "the false-decline rate, higher for the others"
        + ("; * = the paired bootstrap interval of the delta excludes 0." if has_delta else "."),
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
    """One row per question: each model's answer beside the reference (split rows) or the scope verdict.

    Split rows: source (the split), topic, question, reference, base, finetuned. Held-out scope rows:
    source "scope_heldout", kind, category, question, each model's answer, KEY_declined and, for
    emergency and personal-dose prompts, KEY_referred (medlora.scope's rule).
    """
    settings = evaluation.report["settings"]
    keys = [key for key in ("base", "finetuned") if key in evaluation.outputs]
    rows = []
    for index, example in enumerate(evaluation.examples):
        row = {"source": settings["split"], "topic": example.topic, "question": example.question, "reference": example.answer}
        rows.append(row | {key: evaluation.outputs[key].answers[index] for key in keys})
    for index, prompt in enumerate(evaluation.scope_prompts):
        row = {"source": "scope_heldout", "kind": prompt.kind, "category": prompt.category, "question": prompt.question}
        for key in keys:
            answer = evaluation.outputs[key].scope_answers[index]
            row |= {key: answer, f"{key}_declined": is_decline(answer)}
            if prompt.kind in REFERRAL_KINDS:
                row[f"{key}_referred"] = is_referral(answer, prompt.kind)
        rows.append(row)
    return rows


def save_chart(report: dict, path: Path) -> None:
    """Bar chart of every metric per model with its 95% interval: scores in [0, 1] left, perplexities right."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    keys = [key for key in ("base", "finetuned") if key in report]
    colors = {"base": "#bbbbbb", "finetuned": "#4477aa"}
    panels = [
        ("score (false declines: lower is better)", ["bleu", "rouge1", "rouge2", "rougeL", "ood_decline_rate", "medical_false_decline_rate", "emergency_referral_rate"]),
        ("perplexity (lower is better)", ["perplexity", "perplexity_full"]),
    ]
    figure = Figure(figsize=(13, 4.2))
    axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [7, 2]})
    width = 0.8 / len(keys)
    for axis, (ylabel, names) in zip(axes, panels):
        names = [name for name in names if report[keys[0]][name] is not None]
        for offset, key in enumerate(keys):
            values = [report[key][name] for name in names]
            # max(0, ...): a Wilson bound at 0/n or n/n can sit a rounding error inside the value.
            low = [max(0.0, value - report[key]["intervals"][name][0]) for name, value in zip(names, values)]
            high = [max(0.0, report[key]["intervals"][name][1] - value) for name, value in zip(names, values)]
            positions = [i + (offset - (len(keys) - 1) / 2) * width for i in range(len(names))]
            axis.bar(positions, values, width, yerr=[low, high], capsize=3, color=colors[key], label=COLUMN_TITLES[key])
        axis.set_xticks(range(len(names)), [METRICS[name].label.replace(" (", "\n(") for name in names], fontsize=8)
        axis.set_ylabel(ylabel)
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    figure.suptitle(f"medical {report['settings']['split']} rows, n = {report[keys[0]]['n']}; scope rates on the held-out "
                    "scope set (error bars: 95% interval, bootstrap / Wilson)", fontsize=10)
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
