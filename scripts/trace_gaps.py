"""The GPU's idle gaps in a chrome trace of `scripts/profile_kernels.py --trace`: per gap, the
kernels around it, how long after the first had ended the host finished launching the second
(positive: the GPU waited for the host) and the host op it was launched from.

    python3 scripts/trace_gaps.py TRACE.json [--second-half]

--second-half: the second of the two traced steps only (the first starts from a synchronized,
idle queue, so its gaps are the host catching up, not the steady state).
"""

import argparse
import json

GPU_EVENTS = ("kernel", "gpu_memset", "gpu_memcpy")
HOST_EVENTS = ("cpu_op", "cuda_runtime", "cuda_driver")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--second-half", action="store_true", help="only the second of the two traced steps")
    parser.add_argument("--top", type=int, default=25, help="gaps listed, largest first")
    args = parser.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_EVENTS), key=lambda e: e["ts"])
    gpu = gpu[len(gpu) // 2:] if args.second_half else gpu
    host = [e for e in events if e.get("cat") in HOST_EVENTS]
    # The runtime / driver call that launched each GPU event, by the profiler's correlation id.
    launches = {e["args"]["correlation"]: e for e in host if e["cat"] != "cpu_op" and "correlation" in e.get("args", {})}
    ops = [e for e in host if e["cat"] == "cpu_op"]

    rows = []
    for before, after in zip(gpu, gpu[1:]):
        before_end = before["ts"] + before["dur"]
        gap = after["ts"] - before_end
        if gap > 0:
            rows.append((gap, before_end, before, after, launches.get(after.get("args", {}).get("correlation"))))
    span = (gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]) / 1e3
    print(f"GPU events {len(gpu)}, span {span:.3f} ms, gaps {sum(r[0] for r in rows) / 1e3:.3f} ms")
    for gap, before_end, before, after, launch in sorted(rows, key=lambda r: -r[0])[: args.top]:
        where = ""
        if launch is not None:
            late = launch["ts"] + launch["dur"] - before_end
            inside = sorted((e for e in ops if e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]), key=lambda e: e["ts"])
            where = f"launch ended {late:.1f} us after it [{launch['name']}] in: " + " / ".join(e["name"][:40] for e in inside)
        print(f"{gap:8.1f} us  {before['name'][:40]} -> {after['name'][:40]}  {where}")


if __name__ == "__main__":
    main()
