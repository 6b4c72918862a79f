"""The evaluation's outputs: the markdown table, the JSON report, the predictions, the bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from medlora.evaluation.grounding import grounding_table
from medlora.evaluation.run import GATED, MODEL_KEYS, Evaluation
from medlora.scope_gate import GATE_CLASSES
from medlora.evaluation.scores import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, METRICS
from medlora.evaluation.settings import NON_MEDICAL_TOPICS, SCOPE_MAX_NEW_TOKENS
from medlora.scope import REFERRAL_KINDS, is_decline, is_referral

COLUMN_TITLES = {"base": "Base", "finetuned": "Fine-tuned", GATED: "Fine-tuned + gate"}
SCOPE_COLUMN_TITLES = {"base": "Base", "finetuned": "Fine-tuned (model only)", GATED: "Fine-tuned + gate (what a user gets)"}


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
    """The split table (Metric | Base | Fine-tuned | Delta, each cell 'value [95% interval]'), then
    the scope table (one column per model, the gate's included) and its per-kind confusion, with footnotes."""
    keys = [key for key in ("base", "finetuned") if key in report]
    has_delta = "delta" in report
    header = ["Metric"] + [COLUMN_TITLES[key] for key in keys] + (["Delta (fine-tuned - base)"] if has_delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name, metric in METRICS.items():
        if metric.population != "split":
            continue
        cells = [metric.label] + [format_value(report[key], name) for key in keys]
        if has_delta:
            cells.append(format_delta(report["delta"][name], name))
        lines.append("| " + " | ".join(cells) + " |")
    first, settings = report[keys[0]], report["settings"]
    lines += [
        "",
        f"{first['n']} medical {settings['split']} examples (rows of topic {' or '.join(NON_MEDICAL_TOPICS)} left out); "
        f"[low, high] = 95% bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}). Lower is better for "
        "perplexity, higher for the others" + ("; * = the paired bootstrap interval of the delta excludes 0." if has_delta else "."),
    ]
    if "grounding" in report:
        lines += ["", grounding_table(report["grounding"])]
    if "scope_confusion" in report:
        lines += ["", *scope_table(report)]
    return "\n".join(lines)


def scope_table(report: dict) -> list[str]:
    """Scope rates per model (Wilson 95% intervals, count/total) and, per model, the per-kind confusion."""
    keys = [key for key in MODEL_KEYS if key in report]
    lines = ["| Scope rate | " + " | ".join(SCOPE_COLUMN_TITLES[key] for key in keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, metric in METRICS.items():
        if metric.population == "scope":
            lines.append(f"| {metric.label} | " + " | ".join(format_value(report[key], name) for key in keys) + " |")
    confusion = report["scope_confusion"]
    total = sum(sum(counts.values()) for counts in next(iter(confusion.values())).values())
    lines += ["", f"{total} held-out scope prompts ({Path(report['settings']['scope_set'] or 'scope_heldout.jsonl').name}, never "
              f"trained on; answers of at most {SCOPE_MAX_NEW_TOKENS} new tokens), judged by medlora/scope.py; (count/total), "
              "[low, high] = Wilson 95% interval. Lower is better for false declines and false alarms, higher for the others.", ""]
    outcomes = list(GATE_CLASSES)
    lines.append("| Model | Held-out kind | " + " | ".join(f"read as {outcome}" for outcome in outcomes) + " |")
    lines.append("|---|---|" + "---:|" * len(outcomes))
    for key in keys:
        for kind, counts in confusion[key].items():
            lines.append(f"| {COLUMN_TITLES[key]} | {kind} | " + " | ".join(str(counts[outcome]) for outcome in outcomes) + " |")
    return lines


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
        for key in [key for key in MODEL_KEYS if key in evaluation.outputs]:
            answer = evaluation.outputs[key].scope_answers[index]
            row |= {key: answer, f"{key}_declined": is_decline(answer)}
            if prompt.kind in REFERRAL_KINDS:
                row[f"{key}_referred"] = is_referral(answer, prompt.kind)
        rows.append(row)
    return rows


def save_chart(report: dict, path: Path) -> None:
    """Bar chart of every metric per model with its 95% interval: scores in [0, 1] left, perplexities right."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    colors = {"base": "#bbbbbb", "finetuned": "#4477aa", GATED: "#228833"}
    panels = [
        ("score (higher is better)", ["bleu", "rouge1", "rouge2", "rougeL"]),
        ("scope rate (false declines, false alarms: lower is better)", [name for name, m in METRICS.items() if m.population == "scope"]),
        ("perplexity (lower is better)", ["perplexity", "perplexity_full"]),
    ]
    figure = Figure(figsize=(16, 4.2))
    axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [4, 6, 2]})
    for axis, (ylabel, names) in zip(axes, panels):
        keys = [key for key in MODEL_KEYS if key in report and any(report[key][name] is not None for name in names)]
        names = [name for name in names if keys and all(report[key][name] is not None for key in keys)]
        if not names:
            axis.set_axis_off()
            continue
        width = 0.8 / len(keys)
        for offset, key in enumerate(keys):
            values = [report[key][name] for name in names]
            # max(0, ...): a Wilson bound at 0/n or n/n can sit a rounding error inside the value.
            low = [max(0.0, value - report[key]["intervals"][name][0]) for name, value in zip(names, values)]
            high = [max(0.0, report[key]["intervals"][name][1] - value) for name, value in zip(names, values)]
            positions = [i + (offset - (len(keys) - 1) / 2) * width for i in range(len(names))]
            axis.bar(positions, values, width, yerr=[low, high], capsize=3, color=colors[key], label=COLUMN_TITLES[key])
        axis.set_xticks(range(len(names)), [METRICS[name].label.replace(" (", "\n(") for name in names], fontsize=8)
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8)
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(0, 1)
    figure.suptitle(f"medical {report['settings']['split']} rows, n = {report['finetuned' if 'finetuned' in report else 'base']['n']}; scope rates on the held-out "
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
