#!/usr/bin/env bash
# The checks for a machine with a GPU, in one go: what the device is, the end-to-end tests with every
# master and worker on it (the reference stays on the CPU), where one hop's time goes
# (scripts/hop_probe.py, also busy-polling), then the benchmark in bf16 (all-local and two workers on
# loopback; on CUDA busy-polling is on by default, so two workers without it are measured too), and how
# long a stream pauses during another session's long prompt (scripts/prompt_bench.py stall), and the
# CPU benchmark with every node pinned to cores of its own where the machine has enough; then quantized
# weights (issue 16): int8 and int4 beside f32 and bf16 on the tiny and big models, and on CUDA a model of
# Llama 3 8B's shape (random bf16 weights built on the machine, 16 GB) in bf16, int8 and int4, each
# against the bandwidth limit for the bytes it reads; and other families (Qwen3, Mixtral, Qwen3-MoE) on the
# tiny shape, each against its own transformers class. Logs and the benchmark's JSON go to $OUT (default
# ./gpu-results).
#
#   bash scripts/gpu_check.sh                       # cuda, bf16
#   DEVICE=cpu DTYPE=f32 BENCH_ARGS=--quick bash scripts/gpu_check.sh   # dry run of the script itself
#
# Each step has its own time limit (TEST_TIMEOUT, HOP_TIMEOUT, BENCH_TIMEOUT, PROMPT_TIMEOUT, PINNED_TIMEOUT,
# BENCH_EAGER_TIMEOUT, QUANT_TIMEOUT, Q8B_TIMEOUT, ARCH_TIMEOUT, seconds) so a hang in one still leaves the others' logs; the
# script's status is the first failing step's. On CUDA the big model is measured a second time with
# CAKE_CUDA_GRAPHS=0, for the figures without CUDA graphs (EAGER=0 skips that). QUANT=0 skips the quantized
# steps, Q8B=0 the 8B one alone (its first run builds the model: minutes, and 16 GB under BENCH_WORKDIR),
# ARCH=0 the other families.
set -u
OUT=${OUT:-gpu-results}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # runs from a checkout, installed or not
status=0

step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, keep the first failure's status
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$status" -eq 0 ] && status=$rc
    return 0
}

if [ "${DEVICE%%:*}" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"
fi
step versions 60 "$PY" -c "
import torch, transformers, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('cuda', torch.version.cuda, p.name, p.total_memory // 2**20, 'MiB')"
step tests "${TEST_TIMEOUT:-180}" "$PY" -m pytest -q -p no:cacheprovider --device "$DEVICE" tests/test_pipeline.py tests/test_model.py
step hop "${HOP_TIMEOUT:-120}" "$PY" scripts/hop_probe.py --device "$DEVICE" --busy-poll "${HOP_BUSY_POLL:-20000}"
step bench "${BENCH_TIMEOUT:-360}" "$PY" scripts/bench.py --device "$DEVICE" --dtype "$DTYPE" \
    --workdir "${BENCH_WORKDIR:-/tmp/cake-bench}" --json "$OUT/bench.json" ${BENCH_ARGS:-}
step prompt "${PROMPT_TIMEOUT:-180}" "$PY" scripts/prompt_bench.py stall --device "$DEVICE" --dtype "$DTYPE" \
    --repeats 2 --workdir "${BENCH_WORKDIR:-/tmp/cake-bench}"
# The CPU targets with each node on cores of its own (the 2-vCPU development VM cannot give three nodes
# a core each): the big model in f32, the master and two workers on PINNED_CORES cores apiece, when the
# machine has them (PINNED=0 skips).
cores=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))" 2>/dev/null || echo 0)
per=${PINNED_CORES:-4}
case $per in ''|*[!0-9]*) echo "PINNED_CORES must be a number of cores; the pinned step is skipped"; per=0 ;; esac
if [ "${PINNED:-1}" = 1 ] && [ "$per" -gt 0 ] && [ "$cores" -ge $((3 * per)) ]; then
    step cpu-pinned "${PINNED_TIMEOUT:-300}" "$PY" scripts/bench.py --device cpu --dtype f32 --model big \
        --cores-per-node "$per" --repeats 2 --workdir "${BENCH_WORKDIR:-/tmp/cake-bench}" \
        --json "$OUT/bench-cpu-pinned.json" ${BENCH_ARGS:-}
fi
if [ "${DEVICE%%:*}" = cuda ] && [ "${EAGER:-1}" = 1 ]; then  # the big model without CUDA graphs (EAGER=0 skips)
    CAKE_CUDA_GRAPHS=0 step bench-eager "${BENCH_EAGER_TIMEOUT:-${BENCH_TIMEOUT:-360}}" "$PY" scripts/bench.py --device "$DEVICE" \
        --dtype "$DTYPE" --model big --workdir "${BENCH_WORKDIR:-/tmp/cake-bench}" --json "$OUT/bench-eager.json" ${BENCH_ARGS:-}
fi
# Quantized weights: f32, DTYPE, and int8/int4 with DTYPE activations, all-local and on two quantized workers.
if [ "${QUANT:-1}" = 1 ]; then
    step quant "${QUANT_TIMEOUT:-480}" "$PY" scripts/bench.py --device "$DEVICE" --dtype f32 --quant-dtype "$DTYPE" \
        --quantize int8,int4 --workdir "${BENCH_WORKDIR:-/tmp/cake-bench}" --json "$OUT/bench-quant.json" \
        ${BENCH_ARGS:-}
fi
# Llama 3 8B's shape (hidden 4096, intermediate 14336, 32 layers, GQA 32/8): bf16, int8, int4 (gpt-fast reports
# int8 1.48x and int4 1.88x bf16's decode on an A100); about 60 GB of GPU memory with every process up.
if [ "${DEVICE%%:*}" = cuda ] && [ "${QUANT:-1}" = 1 ] && [ "${Q8B:-1}" = 1 ]; then
    step quant-8b "${Q8B_TIMEOUT:-900}" "$PY" scripts/bench.py --device "$DEVICE" --model 8b --dtype bf16 \
        --quant-dtype bf16 --quantize int8,int4 --tokens 32 --workdir "${BENCH_WORKDIR:-/tmp/cake-bench}" \
        --json "$OUT/bench-8b.json" ${BENCH_ARGS:-}
fi
# Other families on the tiny shape (a mixture of experts runs eagerly: no CUDA graphs).
if [ "${ARCH:-1}" = 1 ]; then
    step arch "${ARCH_TIMEOUT:-480}" "$PY" scripts/bench.py --device "$DEVICE" --dtype "$DTYPE" --model tiny \
        --arch qwen3,mixtral,qwen3_moe --workers 1 --workdir "${BENCH_WORKDIR:-/tmp/cake-bench}" \
        --json "$OUT/bench-arch.json" ${BENCH_ARGS:-}
fi
exit "$status"
