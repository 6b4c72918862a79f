#!/usr/bin/env bash
# The whole GPU check of the t4 preset in one call (issue 22), for a lent GPU machine:
#
#     bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else bench/results/gpu
#
# Carried wheels in .whl/ (transformers, TRL, PEFT, datasets at this project's versions) are
# installed first, and a tokenizer folder in .gputok/ is used when the embedded model is not built
# there. Each row is one `python -m bench.t4_step` call (its own processes, its own time limit),
# in order of importance, so a cut-short lease still returns the first rows. Results: one JSON per
# row and all output in gpu_check.log.
set -u
out=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$out"
log="$out/gpu_check.log"
if [ -d .whl ]; then
    rm -rf /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
tokenizer=()
[ -d .gputok ] && tokenizer=(--tokenizer .gputok)
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"; } >>"$log" 2>&1 || { tail -n 5 "$log"; exit 1; }
row() {  # row NAME SECONDS FLAGS...
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$log"
    timeout "$limit" python3 -m bench.t4_step --examples 128 "${tokenizer[@]}" --output "$out/$name.json" "$@" >>"$log" 2>&1 \
        || echo "== $name: exit $?" | tee -a "$log"
}
if [ "${GPU_CHECK_ROWS:-all}" = "memory" ]; then  # the short rerun: ours at the preset and at 16 x 1, memory per step
    row preset_ours 90 --impls ours
    row single_ours 60 --impls ours --batch-size 16
    grep -E '^\| (ours|trl) |^== ' "$log"; exit 0
fi
row preset 150 --impls ours,trl                                    # the t4 preset, both without cuDNN SDPA
row preset_compile 170 --impls ours --compile                      # ... ours with each decoder layer compiled
row single 90 --impls ours --batch-size 16                         # one 16-row micro-batch per step
row single_compile 170 --impls ours --batch-size 16 --compile
row trl_cudnn 90 --impls trl --cudnn-sdpa                          # TRL as it runs by default
row single_compile_nockpt 170 --impls ours --batch-size 16 --compile --no-grad-checkpointing
row ours_cudnn 90 --impls ours --cudnn-sdpa
grep -E '^\| (ours|trl) |^== ' "$log"
