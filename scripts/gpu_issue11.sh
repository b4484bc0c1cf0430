#!/usr/bin/env bash
# The measurements issue 11 (beat SonicMoE on the H200) still needs, in device calls of at most
# 10 minutes each, logs under $OUT (default ./gpu-issue11). Run from the repo root.
#   bash scripts/gpu_issue11.sh tests     the pinned wheels in .whl (carry .whl): the GPU tests
#   bash scripts/gpu_issue11.sh ours      ours / ours-router / grouped_mm side by side at 64,
#                                         2048 and 16384 tokens (30B), 235B at 8192, full, LoRA
#                                         and QLoRA (~6 min; the wheels of `tests` if still there)
#   bash scripts/gpu_issue11.sh sonic     after `source .anchor/setup.sh` (the anchor site):
#                                         SonicMoE with grouped_mm and ours in one process, 30B
#                                         16384 and 235B 8192 (CASES=...: others; its first call per
#                                         shape autotunes; SonicMoE's compiled kernels come back as
#                                         $OUT/quack_cache.tar.xz, its tuning as quack_autotune_<GPU>.tar.xz:
#                                         keep both in .anchor/ and carry them with part.ab next time)
#   bash scripts/gpu_issue11.sh sonic-small   the same, then (call after call, the machine still
#                                         warm) 30B at 2048 and 64 tokens, LoRA (PEFT + each peer)
#                                         at 16384 and 2048, QLoRA (ours) at 16384
#   bash scripts/gpu_issue11.sh lora-profile  the kernels of our LoRA and QLoRA steps at 30B 16384
#                                         and 2048 tokens (scripts/profile_kernels.py --mode)
#   bash scripts/gpu_issue11.sh lora-tune     LoRA's thin GEMMs tuned (scripts/tune.py --quick --only lora;
#                                         the JSON comes back in $OUT)
#   bash scripts/gpu_issue11.sh host      where the host time of the host-bound steps goes: 30B at 2048
#                                         tokens, LoRA and full, and at 64 tokens (scripts/host_breakdown.py
#                                         --profile), and this host's CPU in the replica (scripts/host_cpu.py)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-issue11}
mkdir -p "$out"
step=${1:?tests, ours, sonic, sonic-small, lora-profile, lora-tune or host}
if [ "${step%-small}" != sonic ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
if [ "${step%-small}" != sonic ] && [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:${PYTHONPATH:-}; fi
python3 scripts/build.py >/dev/null && python3 scripts/publish_local.py >/dev/null || exit 1
export HF_HUB_OFFLINE=1 HF_HUB_CACHE=$PWD/build/hub-cache PYTHONUNBUFFERED=1
bench=benchmarks/block_side_by_side.py
# SonicMoE's compiled CuTe DSL kernels (quack.cache.jit's .o files) outlive the machine: the sonic
# steps start from .anchor/quack_cache.tar.xz when carried and leave the cache in $OUT, so that its
# first call per shape (148-216 s of compiling and autotuning on 2026-12-07) compiles nothing that an
# earlier run compiled. Its autotuning results (*.autotune.json: the timings of each config, keyed by
# shapes, not by GPU) come back apart, as quack_autotune_<GPU name>.tar.xz, and are restored only on
# a GPU of that name: SonicMoE then runs the configs its own tuning chose on that GPU model, without
# timing them again; on any other GPU it tunes as usual.
gpu_name() { python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))"; }
restore_quack_cache() {
  export QUACK_CACHE_DIR=/tmp/quack_cache
  mkdir -p "$QUACK_CACHE_DIR"
  if [ -f .anchor/quack_cache.tar.xz ]; then tar -xJf .anchor/quack_cache.tar.xz -C "$QUACK_CACHE_DIR"; fi
  local tuned=".anchor/quack_autotune_$(gpu_name).tar.xz"
  if [ -f "$tuned" ]; then tar -xJf "$tuned" -C "$QUACK_CACHE_DIR" && echo "SonicMoE's tuning restored from $tuned"; fi
}
save_quack_cache() {  # at most 16 MiB comes back from $OUT per file
  tar -cJf "$out/quack_cache.tar.xz" --exclude='*.autotune.json' -C "$QUACK_CACHE_DIR" . &&
    [ "$(stat -c %s "$out/quack_cache.tar.xz")" -le $((16 * 1024 * 1024)) ] ||
    { echo "quack cache over 16 MiB: not kept"; rm -f "$out/quack_cache.tar.xz"; }
  local tuned
  tuned="$(cd "$out" && pwd)/quack_autotune_$(gpu_name).tar.xz"
  (cd "$QUACK_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar -cJf "$tuned" --null -T -)
}
case $step in
  tests)
    # test_family alone: its 397B shape needs the GPU's memory to itself.
    python3 -m pytest -q -m gpu -s tests/test_gpu.py > "$out/test_gpu.log" 2>&1 &
    python3 -m pytest -q -m gpu tests/test_gemm_kernels.py tests/test_quant_format.py tests/test_loading.py \
      tests/test_model_parity.py > "$out/test_gpu_rest.log" 2>&1
    wait
    python3 -m pytest -q -m gpu tests/test_family.py > "$out/test_family.log" 2>&1
    grep -hE "passed|failed|^router T=" "$out"/test_*.log
    ;;
  lora-profile)
    for mode in lora qlora; do
      python3 scripts/profile_kernels.py --cases 30b-t16384,30b-t2048 --mode $mode > "$out/profile_kernels_$mode.log" 2>&1
    done
    grep -hE "^== " "$out"/profile_kernels_*.log
    ;;
  lora-tune)
    timeout "${TUNE_S:-300}" python3 scripts/tune.py --quick --only lora > "$out/tune_lora.log" 2>&1
    cp torch-ext/qwen3_moe_fused/configs/NVIDIA_H200.json "$out/"
    grep -E " ms " "$out/tune_lora.log"
    ;;
  host)
    for case in 2048:lora 2048:full 64:full; do
      timeout 150 python3 scripts/host_breakdown.py --tokens ${case%:*} --mode ${case#*:} --profile \
        > "$out/host_breakdown_t${case%:*}_${case#*:}.log" 2>&1
    done
    for mode in full lora; do  # the replica on this host's CPU, to compare with a CPU machine's
      timeout 60 python3 scripts/host_cpu.py --tokens 64,2048 --mode $mode > "$out/host_cpu_$mode.log" 2>&1
    done
    grep -hE "^\| (fwd|fwd\+bwd|step)|stubbed|same output" "$out"/host_breakdown_*.log
    grep -hE "^\| [0-9]" "$out"/host_cpu_*.log
    ;;
  ours)
    python3 $bench --cases 30b-t64,30b-t2048,30b-t16384,235b-t8192 --impls grouped_mm,ours,ours-router \
      --modes full,lora,qlora --lora-cases 30b-t2048,30b-t16384 --repeats 3 \
      --json "$out/block_ours.json" > "$out/block_ours.log" 2>&1
    for run in 1 2 3 4 5; do  # the decode target: below grouped_mm in each of 5 runs
      python3 $bench --cases 30b-t64 --impls grouped_mm,ours > "$out/block_t64_run$run.log" 2>&1
    done
    grep -E "^\| " "$out/block_ours.log"
    grep -hE "^\| 30b" "$out"/block_t64_run*.log
    ;;
  sonic)
    restore_quack_cache
    python3 $bench --cases "${CASES:-30b-t16384,235b-t8192}" --impls grouped_mm,ours,sonicmoe \
      --json "$out/block_sonic.json" > "$out/block_sonic.log" 2>&1
    save_quack_cache
    grep -E "^\| " "$out/block_sonic.log"
    ;;
  sonic-small)
    restore_quack_cache
    python3 $bench --cases 30b-t2048,30b-t64 --impls grouped_mm,ours,sonicmoe --modes full,lora,qlora \
      --lora-cases 30b-t16384,30b-t2048 --json "$out/block_sonic_small.json" > "$out/block_sonic_small.log" 2>&1
    save_quack_cache
    grep -E "^\| " "$out/block_sonic_small.log"
    ;;
esac
