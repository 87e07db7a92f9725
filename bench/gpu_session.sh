#!/usr/bin/env bash
# One prepared command for a session that is lent a GPU. Run from the repo root on the GPU machine:
#
#     OUT=/some/dir bash bench/gpu_session.sh          # PYTHON=... to pick the interpreter (default python3)
#     OUT=/some/dir PARTS="1 3" bash bench/gpu_session.sh   # some parts only (each part's time is bounded below)
#
# 1. (<= 150 s) token-identity checks on tiny models: GPU vs CPU, decoder and whole-step graphs vs eager, and
#    alone vs batched in bf16 with each GEMM kind (model/gemm.py: the batch-invariant Triton kernel, then the
#    library's), with where batching first changes a row's bits; tiny-model step times;
# 2. (<= 100 s) where batching changes a row's bits at the published shape, bf16, default GEMM kind;
# 3. (<= 200 s) the published shape with the engine's defaults (decoder graphs), step times with each GEMM kind
#    side by side (the batch-invariant kernel's cost);
# 4. (<= 120 s) the published shape with whole-step graphs (`--step-graphs`, not yet validated on a GPU): step
#    times, where the step synchronises, a profile at 1 row;
# 5. (<= 150 s, only when asked: PARTS="... 5") part 1's checks with cuBLAS set up without split-K
#    (`--cublas-no-split-k`, vLLM's approach on Hopper): is the library invariant that way?
# 6. (<= 150 s, only when asked) the published shape with 32,768-token sampler blocks instead of 8,192
#    (`--vocab-chunk`): what 4x fewer sampler kernels per step buy at 1 and 16 rows (compare with part 3).
# Each part has its own timeout, so one that hangs or fails leaves the others' output. Logs go to $OUT.
# Read in part 1: "alone vs batched" should be 16/16 with batch_invariant GEMMs; every "graphs (N replays, C
# captures)" line should show C > 1 (the batch changes as requests finish) and no "OFF" (a capture that failed
# turns graphs off; tokens would still match, only slower); a "batch-invariant GEMMs are off" warning says why
# the kernel was not used.
set -u
OUT=${OUT:-bench_out}
PY=${PYTHON:-python3}
PARTS=${PARTS:-1 2 3 4}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part 1; then
    timeout 150 "$PY" bench/gpu_step.py --config tiny-test --rows 1,16 --prefix 64 \
        --gemm batch_invariant,library >"$OUT/checks.log" 2>&1
    grep -E "^check|^ *[a-z_]+ +[0-9]+ |graph|Error|WARNING" "$OUT/checks.log"
fi
if part 2; then
    timeout 100 "$PY" bench/invariance.py --config diffusiongemma-26b-a4b --rows 16 --prompt-step 37 \
        >"$OUT/invariance.log" 2>&1
    tail -6 "$OUT/invariance.log"
fi
if part 3; then
    timeout 200 "$PY" bench/gpu_step.py --no-checks --rows 1,16,64 --gemm batch_invariant,library \
        >"$OUT/decoder_graphs.log" 2>&1
    tail -9 "$OUT/decoder_graphs.log"
fi
if part 5; then
    timeout 150 "$PY" bench/gpu_step.py --config tiny-test --rows 1,16 --prefix 64 --cublas-no-split-k \
        --gemm library,batch_invariant >"$OUT/checks_cublas.log" 2>&1
    grep -E "^check|^ *[a-z_]+ +[0-9]+ |cuBLAS|Error|WARNING" "$OUT/checks_cublas.log"
fi
if part 6; then
    timeout 150 "$PY" bench/gpu_step.py --no-checks --rows 1,16 --vocab-chunk 32768 >"$OUT/vocab_chunk.log" 2>&1
    tail -5 "$OUT/vocab_chunk.log"
fi
if part 4; then
    timeout 120 "$PY" bench/gpu_step.py --no-checks --rows 1,16 --step-graphs --sync-sites --profile "$OUT" \
        --profile-rows 1 >"$OUT/step_graphs.log" 2>&1
    grep -vE "^      1  deployments/model_runner|_warn_once|UserWarning" "$OUT/step_graphs.log" | tail -16
fi
