"""Evaluation of an adapter against its base model on the split training held out.

    settings.py   flags + the adapter's run folder + defaults -> EvalSettings, each with its source
    run.py        the split, each model's perplexity statistics and answers -> the report
    scores.py     every metric from per-example statistics (the scope rates too), bootstrap intervals, paired deltas
    grounding.py  the grounding rows: ROUGE-L with the closest flashcards in the prompt, and of the top card alone
    cache.py      the base model's outputs, reused when model, data, settings and code are unchanged (--no-cache)
    report.py     markdown table, JSON report, predictions JSONL, bar chart

evaluate.py is the thin script around it:

    settings = resolve_settings({"adapter": "runs/cpu/adapter", "compare_base": True})
    evaluation = run_evaluation(settings)        # defaults read from runs/cpu/config.json
    print(markdown_table(evaluation.report))
    save_evaluation(evaluation, settings.output) # eval.json, eval_predictions.jsonl, eval_metrics.png, eval.md
"""
