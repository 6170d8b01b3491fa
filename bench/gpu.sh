#!/usr/bin/env bash
# A GPU run ready to go (one CUDA GPU, at most 8 minutes): the three scripts' default runs with --bf16, the DPO and
# PPO speed and memory comparison against TRL on a Qwen2.5-0.5B-shaped model (bench/bench_vocab.py: its config,
# random weights, the real 151,936-token vocabulary), and a single-GPU torchrun (NCCL) with --fsdp. Every stage has
# a time limit; a stage that runs out of time is reported as such. Writes one markdown table for docs/results.md.
#
#     bash bench/gpu.sh                          # on the GPU machine: $OUT/gpu_results.md (OUT=runs/gpu)
#     DRY_RUN=1 bash bench/gpu.sh                # on a CPU: the same stages at tiny shapes, to exercise them
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
TABLE="$OUT/gpu_results.md"

if [[ -n "${DRY_RUN:-}" ]]; then  # CPU: tiny budgets and shapes, nothing about the GPU measured
    DEVICE=cpu BF16="" QUICK=(--total-steps 2 --max-eval-rows 8) PPO_QUICK=(--sft-steps 5 --batch-size 8)
    VOCAB=(--size cpu --lengths 128 --pairs 1 --steps 1 --rounds 1 --ppo-prompts 2)
    LIMITS=(300 300 300 600 300)
else
    DEVICE=cuda BF16=--bf16 QUICK=() PPO_QUICK=()
    VOCAB=(--size 0.5b --bf16 --lengths 1024 --pairs 8 --steps 5 --rounds 2 --ppo-prompts 16)
    LIMITS=(60 75 120 180 45)  # seconds per stage: 480 in all
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
fi

{
    echo "GPU run ($(date -u +%F), $(git rev-parse --short HEAD 2>/dev/null), $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'))"
    echo
    echo "| stage | command | exit | seconds | result |"
    echo "|---|---|---|---|---|"
} > "$TABLE"

stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log to $OUT/NAME.log, add a row to the table
    local name=$1 limit=$2 start rc result
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    result=$(grep -E "s in all|after [0-9]+ (DPO )?steps" "$OUT/$name.log" | tail -1 | tr '|' '/' | cut -c1-160)
    [[ $rc == 124 ]] && result="stopped at the ${limit} s limit; $result"
    [[ $rc != 0 && $rc != 124 ]] && result="failed: $(tail -1 "$OUT/$name.log" | tr '|' '/' | cut -c1-160)"
    echo "| $name | \`${*: 2}\` | $rc | $(( $(date +%s) - start )) | $result |" >> "$TABLE"
}

stage reward "${LIMITS[0]}" "$PY" dro_reward.py $BF16 "${QUICK[@]}" --output-dir "$OUT/reward"
stage dpo "${LIMITS[1]}" "$PY" dro_dpo.py $BF16 "${QUICK[@]}" --output-dir "$OUT/dpo"
stage ppo "${LIMITS[2]}" "$PY" dro_ppo.py $BF16 "${QUICK[@]}" "${PPO_QUICK[@]}" --output-dir "$OUT/ppo"
stage vs_trl "${LIMITS[3]}" "$PY" bench/bench_vocab.py --device "$DEVICE" "${VOCAB[@]}" --sections dpo ppo \
    --out "$OUT/vs_trl.md"
stage fsdp "${LIMITS[4]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 dro_dpo.py --fsdp \
    $BF16 --total-steps 20 --max-eval-rows 16 --output-dir "$OUT/fsdp"

if [[ -f "$OUT/vs_trl.md" ]]; then
    { echo; echo "Against TRL (\`bench/bench_vocab.py --device $DEVICE ${VOCAB[*]} --sections dpo ppo\`):"; echo
      tail -n +3 "$OUT/vs_trl.md"; } >> "$TABLE"
fi
cat "$TABLE"
