#!/usr/bin/env bash
# One call on a CUDA machine (the lent H100/H200): build, GPU tests, and every benchmark of
# benchmarks/RESULTS.md, logs under $OUT (default ./gpu-check). On an offline machine, bring
# the pinned kernels / transformers / peft wheels in .whl/ (../shared/tools/device-wheels.sh).
#   bash scripts/gpu_check.sh [quick]     quick: tests and the three headline cases only
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 scripts/build.py >/dev/null && python3 scripts/publish_local.py >/dev/null || exit 1
export HF_HUB_OFFLINE=1 HF_HUB_CACHE=$PWD/build/hub-cache PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu -s tests 2>&1 | tee "$out/test_gpu.log" | grep -E "rel err|passed|failed|Error"
cases=30b-a3b-t2048,30b-a3b-t16384,235b-a22b-t8192
[ "${1:-}" = quick ] || cases=30b-a3b-t1,30b-a3b-t16,30b-a3b-t64,$cases,30b-a3b-t256,30b-a3b-t512,30b-a3b-t1024,30b-a3b-t4096,30b-a3b-t8192,30b-a3b-t32768
impls="ours,grouped_mm"
[ "${1:-}" = quick ] || impls="ours,grouped_mm,eager --eager"
python3 benchmarks/side_by_side.py --cases "$cases" --impls $impls --json "$out/side_by_side.json" > "$out/side_by_side.log" 2>&1
python3 benchmarks/host_overhead.py > "$out/host_overhead.log" 2>&1
python3 benchmarks/lora_side_by_side.py --json "$out/lora.json" > "$out/lora.log" 2>&1
python3 benchmarks/qlora_side_by_side.py --json "$out/qlora.json" > "$out/qlora.log" 2>&1
[ "${1:-}" = quick ] || python3 examples/qlora_qwen3_30b_a3b.py --steps 3 > "$out/qlora_example.log" 2>&1
[ "${1:-}" = quick ] || python3 benchmarks/benchmark_moe.py > "$out/benchmark_moe.log" 2>&1
grep -E "^\| " "$out/side_by_side.log" | cut -d'|' -f2,4,5,8,11,12
grep -E "^\| [0-9]" "$out/host_overhead.log"
grep -E "^T=" "$out/lora.log"
grep -E "^ +[0-9]+ |^T=" "$out/qlora.log"
[ "${1:-}" = quick ] || grep -E "step time|peak memory" "$out/qlora_example.log"
