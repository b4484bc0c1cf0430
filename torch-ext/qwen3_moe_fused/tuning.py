"""Tile configurations of the grouped GEMMs.

Tuned configs ship as JSON in configs/<device name>.json (written by scripts/tune.py),
keyed by GEMM kind, problem shape and row tile; anything not found there falls back to
the heuristics below, so a first call never autotunes.

GEMM kinds (routed GEMMs, grouped_gemm/forward.py, key "<kind>|N=..|K=..|BM=.."):
    gate_up      x[token] @ gate_up[e]^T with SwiGLU         (N = I, K = H)
    down         act @ down[e]^T, weighted scatter            (N = H, K = I)
    down_dx      dOut[token] @ down[e]                        (N = I, K = H)
    down_dx_swiglu   down_dx with the SwiGLU backward in its epilogue (FUSE_DSWIGLU)
    gate_up_dx   dh @ gate_up[e], scatter                     (N = H, K = 2I)
    plain / plain_dx   grouped_gemm() and its dX
    <kind>_nf4   the same GEMM on 4-bit experts (B dequantized in the load)
    <kind>+lora  the same GEMM with the LoRA term in its epilogue
Weight-gradient kinds (grouped_gemm/backward_dw.py, key "<kind>|M=..|N=..|BM=.."):
    gate_up_dw (M = 2I, N = H), down_dw (M = H, N = I), plain_dw, lora_dw
A routed GEMM's entry is a GemmConfig, a weight-gradient GEMM's a DwConfig, under the
JSON keys of _GEMM_KEYS / _DW_KEYS.
"""

import functools
import json
import os
import re
from dataclasses import asdict, dataclass

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The backward's down_dx GEMM computes the SwiGLU backward in its epilogue (kind
# "down_dx_swiglu") instead of writing g for activation.py's kernel. Off: on the H200 (30B-A3B
# block, benchmarks/RESULTS.md) it was 0.31 ms slower at 16384 tokens, and at 2048 and 64 tokens
# faster in one run (run 2) and slower in another (run 6), both within those sizes' run-to-run
# noise. Read at each call.
FUSE_DSWIGLU = False
# The weight-gradient GEMMs read the token rows (x, dOut) copied into sorted order (expand.py)
# instead of gathering them one row index per step: both operands then come through TMA
# descriptors. On the H200 (benchmarks/RESULTS.md, 2026-12-02, third session) a copy takes 0.17 ms
# and the dW GEMMs gain more: the experts' forward+backward 8.26 -> 7.73 ms (30B-A3B, 16384
# tokens) and 16.35 -> 15.0-15.2 ms (235B-A22B, 8192), the same bits. The copy is transient,
# one (T*K, H) buffer at a time (+512 MiB of peak memory in that 30B block's backward). Only from
# SORT_BEFORE_DW_ROWS_PER_EXPERT rows per expert (measured down to 128, 30B-A3B at 2048 tokens):
# with few rows per expert the dW GEMMs have few whole BLOCK_K steps for the descriptors, and
# the copy's three launches cost host time that small batches pay. Read at each call.
SORT_BEFORE_DW = True
SORT_BEFORE_DW_ROWS_PER_EXPERT = 128


def sort_before_dw(num_rows: int, num_experts: int) -> bool:
    """Whether the dW GEMMs read the token rows copied into sorted order (SORT_BEFORE_DW)."""
    return SORT_BEFORE_DW and num_rows >= SORT_BEFORE_DW_ROWS_PER_EXPERT * num_experts


# The layers run Transformers' router classes (block.gate) with their softmax / top-k /
# normalization in router.py's kernels (gate.py); False: the gate's own forward. Read at each call.
FUSED_ROUTER = True
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass(frozen=True)
class GemmConfig:
    """A routed GEMM (grouped_gemm/forward.py). The row tile is the routing's block_m.

    tma_b: load a dense B through a TMA descriptor (CUDA only; same bits as without).
    persistent: programs per SM of a persistent grid whose programs walk the tiles;
    0: one program per tile (same bits either way).
    """

    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma_b: bool = False
    persistent: int = 0

    @classmethod
    def from_json(cls, entry: dict) -> "GemmConfig":
        return cls(**_from_json(entry, _GEMM_KEYS, cls.__name__))

    def to_json(self) -> dict:
        return _to_json(self, _GEMM_KEYS, dict(tma_b=False, persistent=0))


@dataclass(frozen=True)
class DwConfig:
    """A weight-gradient GEMM (grouped_gemm/backward_dw.py): an output tile (block_m, block_n) of one expert,
    block_k routed rows per step.

    persistent: programs per SM of a persistent grid whose programs walk the (expert, tile)
    pairs; 0: one program per tile (same bits either way).
    tma: load the operands read in sorted order through TMA descriptors in the expert's whole
    row steps (CUDA; same bits as without, see backward_dw.py).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    persistent: int = 0
    tma: bool = False

    @classmethod
    def from_json(cls, entry: dict) -> "DwConfig":
        return cls(**_from_json(entry, _DW_KEYS, cls.__name__))

    def to_json(self) -> dict:
        return _to_json(self, _DW_KEYS, dict(persistent=0, tma=False))


_GEMM_KEYS = dict(
    block_n="BLOCK_N", block_k="BLOCK_K", group_m="GROUP_M", num_warps="num_warps", num_stages="num_stages",
    tma_b="TMA_B", persistent="PERSISTENT",
)  # fmt: skip
_DW_KEYS = dict(
    block_m="BLOCK_M", block_n="BLOCK_N", block_k="BLOCK_K", num_warps="num_warps", num_stages="num_stages",
    persistent="PERSISTENT", tma="TMA",
)  # fmt: skip


def _from_json(entry: dict, keys: dict, name: str) -> dict:
    fields = {json_key: field for field, json_key in keys.items()}
    unknown = set(entry) - set(fields)
    if unknown:
        raise ValueError(f"qwen3_moe_fused: unknown {name} keys {sorted(unknown)} (known: {sorted(fields)})")
    return {fields[key]: value for key, value in entry.items()}


def _to_json(config, keys: dict, defaults: dict) -> dict:
    """The JSON entry; switches at their defaults are left out, as in the shipped files."""
    return {keys[f]: v for f, v in asdict(config).items() if not (f in defaults and v == defaults[f])}


def device_key(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' (the config file's name)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


def parse_configs(entries: dict) -> dict:
    """A configs JSON file's entries -> {key: GemmConfig or DwConfig} (weight-gradient kinds end in "_dw")."""
    return {
        key: (DwConfig if key.split("|")[0].endswith("_dw") else GemmConfig).from_json(entry)
        for key, entry in entries.items()
    }


@functools.lru_cache(maxsize=None)
def _shipped_configs(device_index: int) -> dict:
    name = device_key(torch.cuda.get_device_name(device_index))
    path = os.path.join(CONFIG_DIR, f"{name}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return parse_configs(json.load(f))


def _lookup(device: torch.device, key: str):
    if INTERPRET or device.type != "cuda":
        return None
    return _shipped_configs(device.index if device.index is not None else torch.cuda.current_device()).get(key)


def block_m_for(num_rows: int, num_experts: int) -> int:
    """Row tile of the routed GEMMs: small for decode, large for training batches."""
    if INTERPRET:
        return 16
    rows_per_expert = num_rows / max(num_experts, 1)
    # Measured on the H100 (30B-A3B, tuned configs): at 128 rows per expert 64- and 128-row
    # tiles tie on forward+backward and 128 wins the forward; at 64 rows per expert 64 wins.
    for block_m in (16, 32, 64):
        if rows_per_expert <= block_m:
            return block_m
    return 128


def dequantize_first(num_rows: int, num_experts: int) -> bool:
    """4-bit experts: dequantize all weights, then run the 16-bit GEMMs, when there are this
    many rows per expert (the dequantization is then a small part of the GEMM time); below,
    the GEMMs dequantize B tiles in their loads and read a quarter of the bytes."""
    return num_rows >= DEQUANTIZE_FIRST_ROWS_PER_EXPERT * num_experts


DEQUANTIZE_FIRST_ROWS_PER_EXPERT = 256


def default_gemm_config(kind: str, block_m: int) -> GemmConfig:
    if INTERPRET:
        return GemmConfig(block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=1)
    if kind == "lora":  # thin: N is the LoRA rank
        return GemmConfig(block_n=32, block_k=64, group_m=8, num_warps=4, num_stages=3)
    if kind.endswith("_nf4"):  # B dequantized in the load: its gathers and registers want small tiles
        return GemmConfig(block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=1)
    # SwiGLU keeps two accumulators: halve the column tile to keep registers in budget.
    block_n = 64 if (kind == "gate_up" and block_m >= 64) or block_m <= 32 else 128
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return GemmConfig(block_n=block_n, block_k=64, group_m=8, num_warps=num_warps, num_stages=3)


def default_dw_config(kind: str, m: int, n: int) -> DwConfig:
    if INTERPRET:
        return DwConfig(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=1)
    if kind == "lora_dw":  # one side is the LoRA rank: a thin tile along it
        block_m, block_n = (32, 128) if m < n else (128, 32)
        return DwConfig(block_m=block_m, block_n=block_n, block_k=64, num_warps=4, num_stages=3)
    return DwConfig(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3)


def gemm_key(kind: str, n: int, k: int, block_m: int) -> str:
    return f"{kind}|N={n}|K={k}|BM={block_m}"


def dw_key(kind: str, m: int, n: int, block_m: int) -> str:
    return f"{kind}|M={m}|N={n}|BM={block_m}"


# A pure function of its arguments (the shipped JSON is read once a device): cached, since every
# GEMM launch asks.
@functools.lru_cache(maxsize=4096)
def gemm_config(kind: str, n: int, k: int, block_m: int, device: torch.device, lora: bool = False) -> GemmConfig:
    """Config of a routed GEMM (grouped_gemm/forward.py); lora: with the LoRA term in its
    epilogue, which has its own entries ("<kind>+lora") where tuned."""
    found = _lookup(device, gemm_key(f"{kind}+lora", n, k, block_m)) if lora else None
    return found or _lookup(device, gemm_key(kind, n, k, block_m)) or default_gemm_config(kind, block_m)


@functools.lru_cache(maxsize=4096)
def dw_config(kind: str, m: int, n: int, block_m: int, device: torch.device) -> DwConfig:
    """Config of a weight-gradient GEMM (grouped_gemm/backward_dw.py); block_m tracks rows per expert."""
    return _lookup(device, dw_key(kind, m, n, block_m)) or default_dw_config(kind, m, n)


def rows_block() -> int:
    """Rows per program of the elementwise SwiGLU backward."""
    return 16 if INTERPRET else 8
