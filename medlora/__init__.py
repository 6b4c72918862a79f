"""The medlora library: everything the scripts share, above lora/ (the LoRA math) and data/.

    model.py        load the base model and tokenizer; device and precision choice
    config.py       TrainConfig (one validate, to_json/from_json) and the presets
    schedule.py     steps of a run and the learning rate of each step
    loss.py         answer-token NLL per row and per batch; held-out NLL; validation loss
    checkpoint.py   one checkpoint folder, written atomically and checksummed
    run_folder.py   the run folder: config.json, metrics.jsonl, summary.json, adapter/, checkpoints/
    generation.py   load base + merged adapter; batched and streamed answers
    metrics.py      BLEU, ROUGE, perplexity, bootstrap and Wilson intervals
    scope.py        the one rule for declines and referrals
    evaluation/     settings, one evaluation run, scores with intervals, report files
    export/         the merged model out: Hugging Face folder, GGUF (llama.cpp), LoRA GGUF, Ollama folder
    scope_gate.py   a learned scope gate on the model's own prompt state, fitted after training
    errors.py       the failures users can act on, report_failure and the exit codes

It imports lora/ and data/, never a script (train.py, evaluate.py, chat.py).
"""
