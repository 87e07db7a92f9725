#!/usr/bin/env bash
# One prepared command for a session that is lent a GPU (about 5-6 minutes on an H200, most of it building the
# published shape's 50 GB of random weights four times). Run from the repo root on the GPU machine:
#
#     OUT=/some/dir bash bench/gpu_session.sh          # PYTHON=... to pick the interpreter (default python3)
#
# 1. the token-identity checks on tiny models (GPU vs CPU, decoder and whole-step graphs vs eager, alone vs
#    batched, and where batching first changes a row's bits) and tiny-model step times;
# 1b. where batching changes a row's bits at the published shape, bf16 (bench/invariance.py);
# 2. the published shape with whole-step graphs (`--step-graphs`, not yet validated on a GPU): step times,
#    where the step synchronises, a profile at 1 row;
# 3. the published shape with the engine's defaults (decoder graphs), for the same-run comparison.
# Each part has its own timeout, so one that hangs or fails leaves the others' output. Logs go to $OUT.
# Read in part 1: every "graphs (N replays, C captures)" line should show C > 1 (the batch changes as requests
# finish) and no "OFF" (a capture that failed turns graphs off; tokens would still match, only slower).
set -u
OUT=${OUT:-bench_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
timeout 150 "$PY" bench/gpu_step.py --config tiny-test --rows 1,16 --prefix 64 >"$OUT/checks.log" 2>&1
grep -E "^check|^ +[0-9]+ |graph|Error" "$OUT/checks.log"
timeout 120 "$PY" bench/invariance.py --config diffusiongemma-26b-a4b --rows 16 --prompt-step 37 \
    >"$OUT/invariance.log" 2>&1
tail -5 "$OUT/invariance.log"
timeout 200 "$PY" bench/gpu_step.py --no-checks --step-graphs --sync-sites --profile "$OUT" --profile-rows 1 \
    >"$OUT/step_graphs.log" 2>&1
grep -vE "^      1  deployments/model_runner|_warn_once|UserWarning" "$OUT/step_graphs.log" | tail -16
timeout 200 "$PY" bench/gpu_step.py --no-checks >"$OUT/decoder_graphs.log" 2>&1
tail -8 "$OUT/decoder_graphs.log"
