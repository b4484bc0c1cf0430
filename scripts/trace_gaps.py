"""The GPU's idle gaps in a chrome trace of scripts/profile_kernels.py --trace: per gap, the kernels
around it and when the host finished launching the second (after the first had ended: the GPU
waited for the host). --skip-first N: leave out the first N GPU events; --second-half: the
second of the two traced steps only (the first starts from a synchronized, idle queue).

    python3 scripts/trace_gaps.py TRACE.json [--skip-first N | --second-half]
"""
import argparse
import json

parser = argparse.ArgumentParser()
parser.add_argument('trace')
parser.add_argument('--skip-first', type=int, default=0)
parser.add_argument('--second-half', action='store_true', help='only the second of the two traced steps')
args = parser.parse_args()
t = json.load(open(args.trace))
ev = t["traceEvents"] if isinstance(t, dict) else t
gpu = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
gpu.sort(key=lambda e: e["ts"])
gpu = gpu[len(gpu) // 2 if args.second_half else args.skip_first:]
launch = {}
cpu_ops = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver", "python_function")]
for e in cpu_ops:
    c = e.get("args", {}).get("correlation")
    if c is not None and e.get("cat") in ("cuda_runtime", "cuda_driver"):
        launch[c] = e
total_gap = 0
rows = []
for a, b in zip(gpu, gpu[1:]):
    gap = b["ts"] - (a["ts"] + a["dur"])
    if gap <= 0:
        continue
    total_gap += gap
    l = launch.get(b.get("args", {}).get("correlation"))
    late = (l["ts"] + l["dur"]) - (a["ts"] + a["dur"]) if l else None
    rows.append((gap, a["name"][:40], b["name"][:40], late, l["name"] if l else None, l["ts"] if l else None))
print(f"GPU events {len(gpu)}, span {(gpu[-1]['ts'] + gpu[-1]['dur'] - gpu[0]['ts'])/1e3:.3f} ms, gaps {total_gap/1e3:.3f} ms")
for r in sorted(rows, reverse=True)[:25]:
    gap, a, b, late, lname, lts = r
    # what the host was doing right before the late launch
    prev = ""
    if lts is not None:
        before = [e for e in cpu_ops if e.get("cat") == "cpu_op" and e["ts"] <= lts <= e["ts"] + e["dur"]]
        prev = " / ".join(e["name"][:40] for e in sorted(before, key=lambda e: e["ts"]))
    print(f"{gap:8.1f} us  {a} -> {b}  launch ended {late if late is None else round(late,1)} us after prev kernel end [{lname}] in: {prev}")
