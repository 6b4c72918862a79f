"""The medlora library: everything the scripts share, above lora/ (the LoRA math) and data/.

    model.py           load the base model and tokenizer; device and precision choice; the shared-prefix cache
    config.py          TrainConfig (one validate, to_json/from_json) and the presets
    flags.py           the command-line flags train.py and evaluate.py share, with one help text each
    schedule.py        steps of a run and the learning rate of each step
    loss.py            answer-token NLL per row and per batch; sequence log-probabilities; held-out NLL; validation loss
    preference.py      DPO and ORPO: the losses, pairs built from the training rows (on-policy), the reference log-probabilities
    optimizer_step.py  one optimizer step: forward/backward per micro-batch, unscale, clip, step or skip, zero
    checkpoint.py      one checkpoint folder, written atomically and checksummed
    run_folder.py      the run folder: config.json, metrics.jsonl, summary.json, adapter/, checkpoints/
    distributed.py     torchrun ranks: who does what, gradient all-reduce, a failed rank stops the others
    generation.py      load base + merged adapter; batched and streamed answers
    metrics.py         BLEU, ROUGE, perplexity, bootstrap and Wilson intervals
    scope.py           the one rule for declines and referrals
    scope_gate.py      a learned scope gate on the model's own prompt state, fitted after training
    answer.py          the answer path: prompt -> model (+ scope gate) -> route -> answer, for chat and evaluation
    sources.py         BM25 over the training flashcards, shown beside answers
    evaluation/        settings, one evaluation run, scores with intervals, grounding rows, cache, report files
    export/            the merged model out: Hugging Face folder, GGUF (llama.cpp), LoRA GGUF, Ollama folder
    errors.py          the failures users can act on, report_failure and the exit codes

It imports lora/ and data/, never a script (train.py, evaluate.py, chat.py, export.py).
"""
