#!/usr/bin/env bash
# The multi-GPU worker (tests/multi_gpu_worker.py) with world size 1 on one CUDA GPU: each engine
# (torch DDP / fully_shard, accelerate DDP / FSDP2, Transformers' DistributedConfig) wrapped
# around the real Triton kernels (no TRITON_INTERPRET), nccl, against the same model in one
# process without a process group. One line a case: case, loss, max relative error (loss and
# every trainable gradient) vs one process, ok/FAIL; exits 1 on any FAIL.
#   bash scripts/gpu_multi_gpu_ws1.sh            CUDA, nccl, float32 (WORKER_DTYPE=bfloat16 for bf16)
#   bash scripts/gpu_multi_gpu_ws1.sh --cpu      gloo + CPU + Triton's interpreter (a dry run here)
# With one rank, expert parallel holds every expert (no sentinels): the sharded-expert code is
# exercised by tests/test_multi_gpu.py (2 gloo ranks). impl + qlora is not a supported path
# (PEFT casts LoRA factors to the 4-bit storage's dtype), so it is not listed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --cpu ]; then
  py=${PYTHON:-.venv/bin/python}
  export WORKER_DEVICE=cpu TRITON_INTERPRET=1 OMP_NUM_THREADS=1
else
  py=${PYTHON:-python3}
  export WORKER_DEVICE=cuda
  unset TRITON_INTERPRET
fi
export WORKER_DTYPE=${WORKER_DTYPE:-float32}
export HF_HUB_OFFLINE=1 HF_HUB_CACHE=$PWD/build/hub-cache PYTHONUNBUFFERED=1
"$py" scripts/build.py >/dev/null && "$py" scripts/publish_local.py >/dev/null || exit 1
cases=${CASES:-"ddp:kernelize:full ddp:kernelize:lora ddp:kernelize:qlora ddp:impl:full ddp:impl:lora
  fsdp2:kernelize:full fsdp2:kernelize:lora fsdp2:kernelize:qlora fsdp2:impl:full
  acc-ddp:kernelize:full acc-ddp:kernelize:lora acc-ddp:kernelize:qlora acc-ddp:impl:full acc-ddp:impl:lora
  acc-fsdp2:kernelize:full acc-fsdp2:kernelize:lora acc-fsdp2:kernelize:qlora
  hf-fsdp2:kernelize:full hf-fsdp2:kernelize:lora hf-fsdp2:impl:full hf-fsdp2:impl:lora
  hf-ep:kernelize:full hf-ep:kernelize:lora hf-ep:kernelize:qlora hf-ep:impl:full
  hf-ep-router:kernelize:full hf-ep-router:kernelize:lora hf-ep-router:kernelize:qlora"}
out=$(mktemp -d)
"$py" -c "import sys; sys.path.insert(0, 'tests'); from tiny_model import write_tiny_checkpoint; write_tiny_checkpoint('$out/checkpoint')" || exit 1
"$py" -m torch.distributed.run --standalone --nproc_per_node 1 tests/multi_gpu_worker.py "$out/checkpoint" "$out" $cases \
  > "$out/worker.log" 2>&1 || { tail -50 "$out/worker.log"; exit 1; }
"$py" - "$out" $cases <<'EOF'
import os, sys
sys.path.insert(0, "tests")
import torch
from reference import rel_err

out, cases = sys.argv[1], sys.argv[2:]
rtol = float(os.environ.get("RTOL", 1e-2 if os.environ["WORKER_DTYPE"] == "bfloat16" else 1e-4))
import accelerate, peft, transformers

print(f"device {os.environ['WORKER_DEVICE']}, {os.environ['WORKER_DTYPE']}, world size 1, rtol {rtol:g}; torch "
      f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate "
      f"{accelerate.__version__} ({os.path.dirname(accelerate.__file__)})")
failed = 0
for case in cases:
    result = torch.load(f"{out}/{case.replace(':', '_')}.pt", weights_only=False, map_location="cpu")
    if "error" in result:
        failed += 1
        print(f"{case:32s} FAIL {result['error'][:300]}")
        if "traceback" in result:
            print("    " + result["traceback"][-1500:].replace("\n", "\n    "))
        continue
    ref = result["ref_grads"]
    same_keys = bool(ref) and result["grads"].keys() == ref.keys()
    errors = [rel_err(result["loss"], result["ref_loss"])]
    errors += [rel_err(result["grads"][n].float(), g.float()) for n, g in ref.items() if n in result["grads"]]
    worst = max(errors)
    lora_ok = not case.endswith("lora") or any(".lora_A." in n for n in result["grads"])
    ok = same_keys and lora_ok and worst <= rtol
    failed += not ok
    note = "" if same_keys else " (gradient names differ)"
    print(f"{case:32s} loss {float(result['loss']):.6f} max rel err {worst:.2e} {'ok' if ok else 'FAIL'}{note}")
print(f"{len(cases) - failed}/{len(cases)} ok")
sys.exit(1 if failed else 0)
EOF
