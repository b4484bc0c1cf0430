"""The peers' MoE kernels as Transformers experts implementations, for the side-by-side benchmarks.

Each peer is an entry of Transformers' ExpertsInterface, so a `Qwen3MoeExperts` (standalone, inside a
`Qwen3MoeSparseMoeBlock` after its router, or under PEFT's LoRA wrappers) switches to it with
`config._experts_implementation = name`, exactly as it switches to `grouped_mm`:

- `sonicmoe`: Transformers' own entry (SonicMoE, CuTe DSL, Hopper or newer). Offline, `peers.install()`
  from the anchor site (../shared/tools/anchors/peers.py) replaces its Hub download.
- `scattermoe`: kernels-community scattermoe's `flatten_sort_count` and two `parallel_linear`s, called as
  its own `layers.ScatterMoEGatedMLP` calls them (SwiGLU between them in PyTorch, as there).
- `liger`: Liger-Kernel's `LigerFusedMoEFunction`, called as its `LigerExperts` (what
  `apply_liger_kernel_to_qwen3_moe` puts in place of `Qwen3MoeExperts`) calls it. Its first call per
  (H, I) autotunes (Triton's key is H and I only: later token counts reuse the first one's choice).

All of them read the module's own weight Parameters, gate_up_proj (E, 2I, H) with gate rows first and
down_proj (E, H, I), without a copy: Liger takes that layout as it is, scattermoe its (E, in, out)
layout as transposed views (its kernels take strides). So the gradients land on those Parameters.

    impls = peers_impls.load(impls, device)  # prints "<name> unavailable: <reason>" (stderr) and drops it
"""

from __future__ import annotations

import os
import sys

import torch

PEERS = ("sonicmoe", "scattermoe", "liger")
_loaded: dict[str, object] = {}  # peer name -> its Python module / autograd Function, once loaded
unavailable: dict[str, str] = {}  # peer name -> why it did not load (for the results' metadata)


def scattermoe_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """(T, H) output of scattermoe's kernels on `self.gate_up_proj` / `self.down_proj` (see the module doc)."""
    sm = _loaded["scattermoe"]
    top_k = top_k_index.size(-1)
    sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = sm.flatten_sort_count(top_k_index, num_experts=self.num_experts)
    routing = (sorted_expert_idxs, sorted_scattered_idxs, expert_offsets)
    gate_up = sm.parallel_linear(hidden_states, self.gate_up_proj.transpose(1, 2), top_k, *routing,
                                 grouped_in=False, grouped_out=True)  # (T*K, 2I), rows sorted by expert  # fmt: skip
    gate, up = gate_up.chunk(2, dim=-1)
    return sm.parallel_linear(self.act_fn(gate) * up, self.down_proj.transpose(1, 2), 1, *routing,
                              gates=top_k_weights.to(hidden_states.dtype), grouped_in=True, grouped_out=False)  # fmt: skip


def liger_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """(T, H) output of Liger-Kernel's fused MoE on `self.gate_up_proj` / `self.down_proj`."""
    return _loaded["liger"].apply(hidden_states, self.gate_up_proj, self.down_proj, top_k_index.to(torch.int32), top_k_weights)


def _triton_device(device: torch.device) -> None:
    if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError(f"its Triton kernels need CUDA (or TRITON_INTERPRET=1), not {device.type}")


def _load_sonicmoe(device):
    if device.type != "cuda":
        raise RuntimeError(f"it needs a CUDA device (Hopper or newer), not {device.type}")
    from transformers.integrations import sonicmoe

    sonicmoe.is_sonicmoe_loadable(raise_error=True)  # names what is missing: CUDA, sm90+, nvidia-cutlass-dsl
    import peers

    peers.install()
    return sonicmoe.load_sonicmoe_kernel()


def _load_scattermoe(device):
    _triton_device(device)
    import peers

    return peers.scattermoe()


def _load_liger(device):
    _triton_device(device)
    import peers

    return peers.liger_fused_moe()


_LOADERS = {"sonicmoe": _load_sonicmoe, "scattermoe": _load_scattermoe, "liger": _load_liger}
_FORWARDS = {"scattermoe": scattermoe_experts_forward, "liger": liger_experts_forward}


def load(impls: list[str], device: torch.device) -> list[str]:
    """`impls` less the peers that cannot run here (each named with its reason on stderr and in
    `unavailable`); the others are registered in Transformers' ExpertsInterface under their names."""
    from transformers.integrations.moe import ExpertsInterface

    kept = []
    for impl in impls:
        if impl in PEERS and impl not in _loaded:
            try:
                _loaded[impl] = _LOADERS[impl](torch.device(device))
            except Exception as e:  # a missing peer costs its column, never the run
                unavailable[impl] = f"{type(e).__name__}: {e}"
                print(f"{impl} unavailable: {unavailable[impl]}", file=sys.stderr, flush=True)
                continue
            unavailable.pop(impl, None)
            if impl in _FORWARDS:
                ExpertsInterface.register(impl, _FORWARDS[impl])
        kept.append(impl)
    return kept
