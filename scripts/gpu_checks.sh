#!/usr/bin/env bash
# What only a GPU can show, in phases that each fit one 10-minute command on the GPU machine:
#
#   scripts/gpu_checks.sh quick     # all three below, cut to fit one short lease (9.5 minutes at most):
#                                   # each step under its own time limit, the targets' sizes only
#   scripts/gpu_checks.sh tests     # kernel tests compiled for the GPU (Triton and Mosaic GPU)
#   scripts/gpu_checks.sh kernels   # scripts/bench_kernels.py: prefill TFLOP/s, decode GB/s
#   scripts/gpu_checks.sh quant     # scripts/bench_quant.py speed: 8B-shaped decode, bf16/int8/fp8
#
# Logs and JSON go to $OUT (default /tmp/gpu_checks). Wheels in .whl/ (say tokamax, for the
# kernel benchmark) are installed first. SMOKE=1 runs the benchmarks at tiny sizes, which also
# works on a CPU (the kernels then run in interpret mode): a check of this script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: scripts/gpu_checks.sh quick|tests|kernels|quant}
out=${OUT:-/tmp/gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
smoke=()
[[ ${SMOKE:-0} == 1 ]] && smoke=(--smoke)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee "$out/device.txt"
case $phase in
    quick)  # a step past its limit is stopped (exit 124) and the next one still runs
        timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_mgpu.py 2>&1 \
            | tee "$out/kernel_tests.log"
        timeout 210 python3 scripts/bench_kernels.py --quick "${smoke[@]}" --out "$out/kernels.json" 2>&1 \
            | tee "$out/bench_kernels.log"
        timeout 210 python3 scripts/bench_quant.py speed --batch 1 --calls 4 "${smoke[@]}" \
            --out "$out/quant_speed.json" 2>&1 | tee "$out/bench_quant.log" ;;
    tests)
        python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_mgpu.py 2>&1 | tee "$out/kernel_tests.log" ;;
    kernels)
        python3 scripts/bench_kernels.py "${smoke[@]}" --out "$out/kernels.json" 2>&1 | tee "$out/bench_kernels.log" ;;
    quant)
        python3 scripts/bench_quant.py speed "${smoke[@]}" --out "$out/quant_speed.json" 2>&1 | tee "$out/bench_quant.log" ;;
    *)
        echo "unknown phase $phase: quick, tests, kernels or quant" >&2; exit 2 ;;
esac
