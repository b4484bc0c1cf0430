"""Print the README's benchmark table from block_side_by_side.py --json output: one column per
implementation the JSON has (ours, grouped_mm, then the peers in COLUMNS' order).

    python3 scripts/readme_table.py block.json [lora.json]
"""

import json
import sys

NAMES = {"30b-t16384": "Qwen3-30B-A3B, 16384 tokens", "30b-t2048": "Qwen3-30B-A3B, 2048 tokens",
         "30b-t64": "Qwen3-30B-A3B, 64 tokens", "235b-t8192": "Qwen3-235B-A22B, 8192 tokens",
         "qwen3.5-35b-t16384": "Qwen3.5/3.6-35B-A3B, 16384 tokens", "next80b-t16384": "Qwen3-Next-80B-A3B, 16384 tokens",
         "qwen3.5-397b-t8192": "Qwen3.5-397B-A17B, 8192 tokens", "coder480b-t8192": "Qwen3-Coder-480B-A35B, 8192 tokens"}  # fmt: skip
COLUMNS = {"ours": "qwen3-moe-fused", "grouped_mm": "Transformers `grouped_mm`", "sonicmoe": "`sonicmoe` (SonicMoE)",
           "scattermoe": "scattermoe", "liger": "Liger-Kernel"}  # fmt: skip


def rows_of(path):
    return [r for r in json.load(open(path))["rows"]]


def cell(rows, case, impl, mode):
    r = next((r for r in rows if r["case"] == case and r["impl"] == impl and r.get("mode", "full") == mode), None)
    if r is None or "error" in r:
        return "—"
    return f"{r['fwd_ms']:.2f} / {r['fwd_bwd_ms']:.2f}"


def main(paths):
    rows = [r for p in paths for r in rows_of(p)]
    impls = [i for i in COLUMNS if any(r["impl"] == i for r in rows)]
    print("| case | " + " | ".join(COLUMNS[i] for i in impls) + " |")
    print("|---|" + "---|" * len(impls))
    suffix = {"full": "", "lora": ", LoRA r=16 (PEFT's for the others)", "qlora": ", QLoRA r=16 (4-bit experts)"}
    for mode in suffix:
        for case, name in NAMES.items():
            if any(r["case"] == case and r.get("mode", "full") == mode for r in rows):
                print(f"| {name}{suffix[mode]} | " + " | ".join(cell(rows, case, i, mode) for i in impls) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
