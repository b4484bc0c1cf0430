"""Plot benchmark JSON (needs matplotlib).

    python benchmarks/plot.py block.json benchmarks/block_h200.png        # block_side_by_side.py --json
    python benchmarks/plot.py side_by_side.json benchmarks/tflops_h100.png  # side_by_side.py --json

block_side_by_side.py output: ms of forward and forward+backward per case, one bar per
implementation the JSON has (of LABELS: ours, grouped_mm and the peers), lower is better.
side_by_side.py output: TFLOP/s against tokens for the 30B-A3B block, one line per implementation.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"ours": "qwen3-moe-fused", "grouped_mm": "Transformers grouped_mm", "sonicmoe": "SonicMoE (sonicmoe)",
          "scattermoe": "scattermoe", "liger": "Liger-Kernel fused MoE"}  # fmt: skip


def plot_block(data: dict, dst: str) -> None:
    meta, rows = data["meta"], [r for r in data["rows"] if "error" not in r]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = [i for i in LABELS if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(impls)
    for ax, phase in zip(axes, ("fwd_ms", "fwd_bwd_ms")):
        for j, impl in enumerate(impls):
            # Cases this implementation did not run get no bar.
            found = {c: next((r[phase] for r in rows if r["case"] == c and r["impl"] == impl), None) for c in cases}
            xs = [i + j * width for i, c in enumerate(cases) if found[c] is not None]
            bars = ax.bar(xs, [v for v in found.values() if v is not None], width, label=LABELS.get(impl, impl))
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ticks = [i + width * (len(impls) - 1) / 2 for i in range(len(cases))]
        ax.set_xticks(ticks, cases, fontsize=8, rotation=30, ha="right")  # long case names: no overlap
        ax.set_ylabel("ms (lower is better)")
        ax.set_title("forward" if phase == "fwd_ms" else "forward + backward")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Qwen3 MoE block (router included), bf16, {meta['device']}, {meta['date']}"
                 f"{' — LoRA r=16' if rows and rows[0].get('lora') else ''}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


def plot_tokens(data: dict, dst: str) -> None:
    meta = data["metadata"]
    rows = [r for r in data["results"] if r["model"] == "Qwen3-30B-A3B" and r.get("fwd_ms") and not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, phase in zip(axes, ("fwd", "fwd_bwd")):
        for impl in LABELS:
            pts = sorted((r["tokens"], r[f"{phase}_tflops"]) for r in rows if r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS[impl])
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


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    (plot_block if "rows" in data else plot_tokens)(data, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
