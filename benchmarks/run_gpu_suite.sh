#!/usr/bin/env bash
# Every GPU benchmark in one call on a 4-GPU machine, each step under its own time limit and
# all of them under one wall-clock budget; logs and result files land under $OUT.
#
#   OUT=/some/dir bash benchmarks/run_gpu_suite.sh            # from the repository root
#   STEPS="e2e_pft e2e_deepspeed" bash benchmarks/run_gpu_suite.sh   # a subset, in this order
#   SMOKE=1 OUT=/tmp/suite bash benchmarks/run_gpu_suite.sh    # CPU smoke test (gloo, tiny)
#
# Steps (default order: the end-to-end runs first, as they matter most when time runs out):
#   gemm_sweep               Triton grouped GEMM tile configs ($GEMM_CONFIGS) vs _grouped_mm
#   moe_profile              one pft layer (fwd+bwd) by kernel under torch.profiler, 1 GPU
#   e2e_pft, e2e_deepspeed   benchmarks/e2e.py on 4 GPUs, small preset at $E2E_LAYERS layers,
#                            micro-batch $E2E_MB, global batch $E2E_GB, $E2E_STEPS timed steps
#                            (4); one profiled step each;
#                            pft runs the plain config, $E2E_VARIANT2 (dropless by default)
#                            and, if set, $E2E_VARIANT3 and $E2E_VARIANT4 (comma-separated overrides)
#   e2e_full                 pft, as many layers as fit (the whole preset on 2+ H200s)
#   moe_1gpu, moe_2gpu, moe_4gpu   benchmarks/moe_layer.py on 1 GPU and under torchrun 2 and 4
#   ssmb                     benchmarks/ssmb.py under torchrun 4
#   rbd                      benchmarks/rbd.py (spawns its 4 ranks itself)
#   planner                  benchmarks/planner_validate.py, the first two layouts on 4 GPUs
# The 4-GPU steps use every GPU when the machine has fewer (moe_4gpu is then skipped).
# Result files are written to benchmarks/results/ (relative paths, so the commands they
# record carry no machine paths) and archived into $OUT/results.tar after every step; each step's
# output goes to $OUT/logs/<step>.log and one line per step to $OUT/summary.txt.
# TRACE=1 also keeps the Chrome trace of the profiled pft window ($OUT/logs, large).
# BUDGET_S (default 520) bounds the whole suite: a step gets what is left of it, at most
# its own limit, and is skipped when less than 40 s remain.
# On the GPU machine the carried wheels in .whl/ (DeepSpeed and its pure dependencies for
# Python 3.12) are installed into /tmp/site first.

set -u
START=$(date +%s)
OUT=${OUT:?set OUT to the directory for logs and results}
BUDGET_S=${BUDGET_S:-520}
SMOKE=${SMOKE:-0}
PY=${PY:-python3}
mkdir -p "$OUT/logs"
export NCCL_NVLS_ENABLE=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/xmoe-triton-cache}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/xmoe-cache}  # the sample corpus's token cache

if [ "$SMOKE" = 1 ]; then
    RES=$OUT/smoke-results   # never overwrite the recorded GPU results from a smoke test
    NP4=2                    # two gloo ranks stand in for four GPUs
    export PYTHONPATH=$PWD
else
    RES=benchmarks/results
    NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    NP4=$((NGPU < 4 ? NGPU : 4))  # the "4-GPU" steps run on what the machine has, up to 4
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # 64 cores for 4 ranks (the h200 profile's value)
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    else
        echo "no .whl/ folder: using the installed DeepSpeed" | tee -a "$OUT/summary.txt"
        export PYTHONPATH=$PWD
    fi
fi
mkdir -p "$RES"
if command -v torchrun >/dev/null 2>&1; then TORCHRUN=torchrun; else TORCHRUN="$PY -m torch.distributed.run"; fi

"$PY" - <<'EOF' 2>&1 | tee "$OUT/logs/environment.log"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(" ", i, torch.cuda.get_device_name(i))
try:
    import deepspeed, triton
    print("deepspeed", deepspeed.__version__, "triton", triton.__version__)
except ImportError as e:
    print("missing:", e)
EOF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi topo -m >>"$OUT/logs/environment.log" 2>&1

# run_step NAME LIMIT_S GPU_COMMAND... [-- SMOKE_EXTRA_ARGS...]: the command, with the smoke
# test's extra arguments appended when SMOKE=1
run_step() {
    local name=$1 limit=$2
    shift 2
    local cmd=() extra=() seen=0
    for a in "$@"; do
        if [ "$a" = "--" ] && [ $seen = 0 ]; then seen=1; continue; fi
        if [ $seen = 0 ]; then cmd+=("$a"); else extra+=("$a"); fi
    done
    [ "$SMOKE" = 1 ] && cmd+=("${extra[@]}")
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt 40 ]; then
        echo "$name: skipped, ${left}s of the budget left" | tee -a "$OUT/summary.txt"
        return
    fi
    [ "$limit" -gt $((left - 10)) ] && limit=$((left - 10))
    echo "== $name (limit ${limit}s): ${cmd[*]}"
    local t0=$(date +%s)
    timeout -k 15 "$limit" "${cmd[@]}" >"$OUT/logs/$name.log" 2>&1
    local rc=$?
    local took=$(($(date +%s) - t0))
    local what="ok"
    [ $rc = 124 ] && what="TIMEOUT"
    [ $rc != 0 ] && [ $rc != 124 ] && what="FAILED"
    grep -qi "out of memory" "$OUT/logs/$name.log" && what="$what (OOM in log)"
    echo "$name: rc=$rc $what ${took}s" | tee -a "$OUT/summary.txt"
    grep -v -e "^\[W" -e "^W1" -e "Warning" -e "warn(" "$OUT/logs/$name.log" | tail -n 24
    # one archive, not a file each: what comes back from the machine is limited in count
    tar -C "$RES" -cf "$OUT/results.tar" . 2>/dev/null
}

step_moe_profile() {
    run_step moe_profile 60 "$PY" benchmarks/moe_layer.py --quick --profile pft \
        --out "$RES/moe_layer.json" -- --device cpu --tiny
}
GEMM_CONFIGS=${GEMM_CONFIGS:-"128,256,64,8,3;128,256,64,8,4;128,128,64,4,4;128,128,64,8,4;256,128,64,8,3;64,256,64,4,4"}
step_gemm_sweep() {
    run_step gemm_sweep 90 "$PY" benchmarks/moe_layer.py --sweep-gemm "$GEMM_CONFIGS" \
        --out "$RES/moe_layer.json" -- --device cpu --tiny
}
E2E_SMOKE=(--device cpu --tiny --warmup 1 --steps 2 --profile-micro-batches 1)
# e2e_pft / e2e_deepspeed: the two dispatchers side by side at one layer count that fits
# both (pft also dropless); e2e_full: pft with as many of the preset's layers as fit
E2E_COMPARE=(--layers "${E2E_LAYERS:-16}" --micro-batch "${E2E_MB:-4}" --global-batch "${E2E_GB:-128}"
    --warmup 1 --steps "${E2E_STEPS:-4}" --profile --append --out "$RES/e2e.json")
step_e2e_pft() {
    run_step e2e_pft 200 $TORCHRUN --nproc_per_node $NP4 benchmarks/e2e.py --dispatchers pft \
        "${E2E_COMPARE[@]}" --variant "" --variant "${E2E_VARIANT2:-moe.capacity_factor=null}" \
        ${E2E_VARIANT3:+--variant "$E2E_VARIANT3"} ${E2E_VARIANT4:+--variant "$E2E_VARIANT4"} \
        ${TRACE:+--trace "$OUT/logs/e2e_pft_trace.json"} -- "${E2E_SMOKE[@]}"
}
step_e2e_deepspeed() {
    run_step e2e_deepspeed 190 $TORCHRUN --nproc_per_node $NP4 benchmarks/e2e.py \
        --dispatchers deepspeed "${E2E_COMPARE[@]}" -- "${E2E_SMOKE[@]}"
}
step_e2e_full() {
    run_step e2e_full 120 $TORCHRUN --nproc_per_node $NP4 benchmarks/e2e.py --dispatchers pft \
        --micro-batch 2 --global-batch "${E2E_GB:-64}" --warmup 1 --steps 2 --append \
        --out "$RES/e2e.json" -- "${E2E_SMOKE[@]}"
}
step_moe_1gpu() {
    run_step moe_1gpu 100 "$PY" benchmarks/moe_layer.py --quick --check ${MOE_IMPLS:+--impls "$MOE_IMPLS"} --append \
        --out "$RES/moe_layer.json" \
        -- --device cpu --tiny
}
step_moe_2gpu() {
    run_step moe_2gpu 90 $TORCHRUN --nproc_per_node 2 benchmarks/moe_layer.py --quick \
        ${MOE_IMPLS:+--impls "$MOE_IMPLS"} --out "$RES/moe_layer.json" --append -- --device cpu --tiny
}
step_moe_4gpu() {
    if [ "$SMOKE" != 1 ] && [ "$NP4" -lt 4 ]; then
        echo "moe_4gpu: skipped, $NP4 GPUs" | tee -a "$OUT/summary.txt"
        return
    fi
    run_step moe_4gpu 70 $TORCHRUN --nproc_per_node $NP4 benchmarks/moe_layer.py --quick \
        --out "$RES/moe_layer.json" --append -- --device cpu --tiny
}
step_ssmb() {
    run_step ssmb 70 $TORCHRUN --nproc_per_node $NP4 benchmarks/ssmb.py --out "$RES/ssmb.json" \
        -- --device cpu --tiny
}
step_rbd() {
    run_step rbd 70 "$PY" benchmarks/rbd.py --out "$RES/rbd.json" \
        -- --cpu --gpus 2 --node-sizes 1 --capacity-factors 0 --tokens 256 --hidden 64 \
        --experts 8 --top-k 2 --expert-hidden 64 --iters 2 --sim-tokens 2048
}
step_planner() {
    run_step planner "${PLANNER_LIMIT:-150}" "$PY" benchmarks/planner_validate.py --gpus $NP4 --only ${PLANNER_ONLY:-0 1} --timeout 70 \
        --layers "${PLANNER_LAYERS:-8}" \
        --out "$RES/planner.json" -- --cpu --gpus 2 --tiny
}

for s in ${STEPS:-moe_profile e2e_pft e2e_deepspeed moe_1gpu moe_2gpu moe_4gpu ssmb rbd planner}; do
    if declare -F "step_$s" >/dev/null; then "step_$s"; else echo "unknown step $s" | tee -a "$OUT/summary.txt"; fi
done
echo "suite: $(($(date +%s) - START))s of ${BUDGET_S}s" >>"$OUT/summary.txt"
echo "== summary"
cat "$OUT/summary.txt"
