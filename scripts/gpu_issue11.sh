#!/usr/bin/env bash
# The measurements issue 11 (beat SonicMoE on the H200) still needs, in device calls of at most
# 10 minutes each, logs under $OUT (default ./gpu-issue11). Run from the repo root.
#   bash scripts/gpu_issue11.sh tests     the pinned wheels in .whl (carry .whl): the GPU tests,
#                                         the host-time profiles at 64 tokens (~6 min)
#   bash scripts/gpu_issue11.sh ours      ours / ours-router / grouped_mm side by side at 64,
#                                         2048 and 16384 tokens (30B), 235B at 8192; the dW
#                                         GEMMs with and without DwConfig.tma (~6 min)
#   bash scripts/gpu_issue11.sh sonic     after `source .anchor/setup.sh` (the anchor site):
#                                         SonicMoE with them in one process, 30B 16384 and
#                                         2048 (its first call per shape autotunes ~2.5 min)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-issue11}
mkdir -p "$out"
step=${1:?tests, ours or sonic}
if [ "$step" != sonic ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 scripts/build.py >/dev/null && python3 scripts/publish_local.py >/dev/null || exit 1
export HF_HUB_OFFLINE=1 HF_HUB_CACHE=$PWD/build/hub-cache PYTHONUNBUFFERED=1
bench=benchmarks/block_side_by_side.py
case $step in
  tests)
    # test_family alone: its 397B shape needs the GPU's memory to itself.
    python3 -m pytest -q -m gpu -s tests/test_gpu.py > "$out/test_gpu.log" 2>&1 &
    python3 -m pytest -q -m gpu tests/test_gemm_kernels.py tests/test_quant_format.py tests/test_loading.py \
      tests/test_model_parity.py > "$out/test_gpu_rest.log" 2>&1
    wait
    python3 -m pytest -q -m gpu tests/test_family.py > "$out/test_family.log" 2>&1
    python3 scripts/profile_layer.py --tokens 64 --backward > "$out/profile_layer_t64.log" 2>&1
    python3 scripts/bench_launch.py > "$out/bench_launch_t64.log" 2>&1
    grep -hE "passed|failed|^router T=" "$out"/test_*.log
    grep -E "host .* us/call" "$out/profile_layer_t64.log"
    ;;
  ours)
    python3 $bench --cases 30b-t64,30b-t2048,30b-t16384,235b-t8192 --impls grouped_mm,ours,ours-router --repeats 3 \
      --json "$out/block_ours.json" > "$out/block_ours.log" 2>&1
    python3 benchmarks/gemm_options.py TMA 0 1 > "$out/dw_tma.log" 2>&1  # the dW GEMMs' TMA option
    grep -E "^\| " "$out/block_ours.log"
    cat "$out/dw_tma.log"
    ;;
  sonic)
    python3 $bench --cases 30b-t16384,30b-t2048 --impls grouped_mm,ours,ours-router,sonicmoe \
      --json "$out/block_sonic.json" > "$out/block_sonic.log" 2>&1
    grep -E "^\| " "$out/block_sonic.log"
    ;;
esac
