"""float64 references for the kernel tests (independent of the package's code)."""

import math

import torch
import torch.nn.functional as F


def moe_experts_reference(x, gate_up, down, top_k_index, top_k_weights):
    """Dense float64 evaluation of every expert on every token, then pick the top-k rows.

    x (T, H), gate_up (E, 2I, H), down (E, H, I), top_k_index (T, K), top_k_weights (T, K).
    """
    x, gate_up, down, top_k_weights = (t.double() for t in (x, gate_up, down, top_k_weights))
    gate, up = torch.einsum("th,eoh->teo", x, gate_up).chunk(2, dim=-1)
    y = torch.einsum("tei,ehi->teh", F.silu(gate) * up, down)  # (T, E, H)
    picked = y.gather(1, top_k_index.long()[..., None].expand(-1, -1, x.shape[1]))  # (T, K, H)
    return (picked * top_k_weights[..., None]).sum(1)


def grouped_gemm_reference(x, weight, m_sizes):
    x, weight = x.double(), weight.double()
    expert = torch.repeat_interleave(torch.arange(weight.shape[0]), m_sizes.long().cpu()).to(x.device)
    return torch.einsum("mk,mnk->mn", x, weight[expert])


def rel_err(a, b, chunk=2**26):
    """||a - b|| / ||b|| in float64, a chunk of elements at a time (a 397B-shape expert gradient
    whole in float64 would take 32 GiB)."""
    a, b = a.reshape(-1), b.reshape(-1)
    diff = norm = 0.0
    for i in range(0, b.numel(), chunk):
        a_i, b_i = a[i : i + chunk].double(), b[i : i + chunk].double()
        diff += (a_i - b_i).square().sum().item()
        norm += b_i.square().sum().item()
    return math.sqrt(diff) / max(math.sqrt(norm), 1e-30)


def random_routing(num_tokens, num_experts, top_k, mode="random", device="cpu", generator=None):
    """top-k ids (T, K) and normalized weights (T, K) float32 from random router logits.

    mode: "random", "one" (every token's first choice is expert 0), "skip" (odd experts get no tokens).
    """
    logits = torch.randn(num_tokens, num_experts, generator=generator).to(device)
    if mode == "one":
        logits[:, 0] += 100.0
    if mode == "skip":
        logits[:, 1::2] = -1e9
    probs = logits.softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def moe_experts_lora_reference(x, gate_up, down, top_k_index, top_k_weights, gate_up_lora=None, down_lora=None):
    """Dense float64: every expert (base + LoRA, the LoRA as x·Aᵀ·Bᵀ beside the base GEMM) on
    every token, then the top-k rows weighted. A (E, r, in), B (E, out, r), scaling inside B."""
    x, gate_up, down, top_k_weights = (t.double() for t in (x, gate_up, down, top_k_weights))
    h = torch.einsum("th,eoh->teo", x, gate_up)  # (T, E, 2I)
    if gate_up_lora is not None:
        a, b = (t.double() for t in gate_up_lora)
        h = h + torch.einsum("ter,eor->teo", torch.einsum("th,erh->ter", x, a), b)
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) * up  # (T, E, I)
    y = torch.einsum("tei,ehi->teh", act, down)  # (T, E, H)
    if down_lora is not None:
        a, b = (t.double() for t in down_lora)
        y = y + torch.einsum("ter,ehr->teh", torch.einsum("tei,eri->ter", act, a), b)
    picked = y.gather(1, top_k_index.long()[..., None].expand(-1, -1, x.shape[1]))  # (T, K, H)
    return (picked * top_k_weights[..., None]).sum(1)
