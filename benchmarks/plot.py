"""Plot TFLOP/s against tokens from side_by_side.py --json output (needs matplotlib).

    python benchmarks/plot.py side_by_side.json benchmarks/tflops_h100.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    meta = data["metadata"]
    rows = [r for r in data["results"] if r["model"] == "Qwen3-30B-A3B" and r.get("fwd_ms") and not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, phase in zip(axes, ("fwd", "fwd_bwd")):
        for impl in ("ours", "grouped_mm"):
            pts = sorted((r["tokens"], r[f"{phase}_tflops"]) for r in rows if r["impl"] == impl)
            if pts:
                label = "qwen3-moe-fused" if impl == "ours" else "Transformers grouped_mm"
                ax.plot(*zip(*pts), marker="o", label=label)
        if data.get("dense_matmul"):
            ax.axhline(data["dense_matmul"]["tflops"], color="gray", ls="--", label="dense bf16 GEMM")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title("forward" if phase == "fwd" else "forward + backward")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[0].legend()
    fig.suptitle(f"Qwen3-30B-A3B MoE block (H 2048, I 768, E 128, K 8), bf16, {meta.get('gpu', '')}")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
