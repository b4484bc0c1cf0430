"""The experts under Transformers' own parallelism (`DistributedConfig`: expert parallel, tensor parallel).

Transformers shards `gate_up_proj` / `down_proj` as DTensors (by expert for expert parallel, by
the intermediate dimension for tensor parallel) and installs its own `forward` on the experts
module (an instance attribute): all-to-all token dispatch ("ep_dispatch_experts"), or router
masking + all-reduce ("ep_router" + "moe_tp_experts"), or the tensor-parallel all-reduce
("moe_tp_experts"). That forward hands the configured experts implementation local weights,
local expert ids and sentinel ids (>= the local expert count, routing weight zero).

So the block calls that forward (`call_sharded_experts`) instead of the experts function, and
our experts function (`experts_implementation="qwen3_moe_fused"`) runs inside it. PEFT's LoRA
factors stay whole (replicated) on every rank: the block cuts them to this rank's shard of the
weight and hands them over (`take_lora`); their gradients, which then cover only the local
shard, are summed over the shard's process group in the backward and divided by the number of
distinct batches that group holds, as Transformers does for the expert weights.
"""

import contextlib

import torch
from torch import Tensor, nn

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = FSDPModule = ()

_HANDED_LORA = "_qwen3_moe_fused_handed_lora"  # attribute of the experts module while the block hands LoRA


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def is_sharded_experts(experts: nn.Module) -> bool:
    """Whether Transformers' expert / tensor parallel owns this experts module: it installed its
    own forward, or the expert tensors are DTensors."""
    return "forward" in vars(experts) or any(is_dtensor(experts._parameters.get(n)) for n in ("gate_up_proj", "down_proj"))


def _local_index(weight: Tensor, dim: int) -> Tensor | None:
    """Indices along `dim` of the global weight that this rank's local shard holds; None: all."""
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    placements, sharded = [], False
    for p in weight.placements:
        if isinstance(p, _StridedShard) and p.dim == dim:
            placements.append(_StridedShard(0, split_factor=p.split_factor))
        elif isinstance(p, Shard) and p.dim == dim:
            placements.append(Shard(0))
        else:
            placements.append(Replicate())
        sharded |= not isinstance(placements[-1], Replicate)
    if not sharded:
        return None
    # ds_shape: the dense (E, out, in) of 4-bit storage sharded by expert (quant/experts.py)
    index = torch.arange(getattr(weight, "ds_shape", weight.shape)[dim], device=weight.device_mesh.device_type)
    # src_data_rank=None: each rank takes its own chunk, no communication.
    return distribute_tensor(index, weight.device_mesh, placements, src_data_rank=None).to_local().to(weight.device)


class _SumOverShards(torch.autograd.Function):
    """Identity forward; backward: all-reduce-sum the gradient over `group`, divided by `divisor`."""

    @staticmethod
    def forward(ctx, t, group, divisor):
        ctx.group, ctx.divisor = group, divisor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return (grad / ctx.divisor if ctx.divisor != 1 else grad), None, None


def _batches_per_group(experts: nn.Module, group_size: int) -> int:
    """How many distinct batches the ranks of a shard group hold: Transformers gives the ranks of
    one tensor-parallel group the same batch (and expert parallel spans ep_size / tp_size of them)."""
    config = getattr(getattr(experts, "config", None), "distributed_config", None)
    tp_size = getattr(config, "tp_size", None)
    if tp_size is None:
        raise ValueError(
            "qwen3_moe_fused: LoRA on sharded experts needs Transformers' DistributedConfig "
            "(experts.config.distributed_config) to know how many batches the shard group holds"
        )
    return max(group_size // tp_size, 1)


def local_lora(lora, weight: Tensor, experts: nn.Module):
    """LoRA (A (E, R, in), B (E, out, R)) of the global weight (E, out, in), cut to the local shard
    of the DTensor `weight`; the cut factors' gradients are summed over the shard group."""
    if lora is None or not is_dtensor(weight):
        return lora
    lora_a, lora_b = lora
    experts_index, out_index, in_index = (_local_index(weight, d) for d in range(3))
    if experts_index is None and out_index is None and in_index is None:
        return lora
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"qwen3_moe_fused: LoRA on expert tensors sharded over a {mesh.ndim}-D mesh "
            f"({weight.placements}) is not supported; shard the experts over one mesh dimension"
        )
    group = mesh.get_group()
    divisor = _batches_per_group(experts, mesh.size())
    lora_a, lora_b = (_SumOverShards.apply(t, group, divisor) for t in (lora_a, lora_b))
    if experts_index is not None:
        lora_a, lora_b = lora_a.index_select(0, experts_index), lora_b.index_select(0, experts_index)
    if in_index is not None:
        lora_a = lora_a.index_select(2, in_index)
    if out_index is not None:
        lora_b = lora_b.index_select(1, out_index)
    return lora_a, lora_b.contiguous()


@contextlib.contextmanager
def _handing(experts: nn.Module, gate_up_lora, down_lora):
    # A plain attribute of the experts module (not a ContextVar): take_lora runs on every call of
    # experts_forward, also under torch.compile, and Dynamo traces a module attribute read.
    handed = {"lora": (gate_up_lora, down_lora), "taken": False}
    experts.__dict__[_HANDED_LORA] = handed
    try:
        yield handed
    finally:
        experts.__dict__.pop(_HANDED_LORA, None)


def take_lora(experts: nn.Module):
    """(gate_up_lora, down_lora) handed by the block for this experts module, or None."""
    handed = getattr(experts, _HANDED_LORA, None)
    if handed is None:
        return None
    handed["taken"] = True
    return handed["lora"]


def call_sharded_experts(experts: nn.Module, x, top_k_index, top_k_weights, gate_up_lora, down_lora):
    """Run the sharded experts through the forward Transformers installed on them, with our experts
    function inside it reading the local shard of the LoRA factors."""
    if gate_up_lora is not None or down_lora is not None:
        if isinstance(experts, FSDPModule):
            # FSDP2 on the expert replicas (Transformers' efsdp): gather them now, so the shard
            # read below is the expert-parallel one the installed forward computes with.
            experts.unshard()
    gate_up_lora = local_lora(gate_up_lora, experts.gate_up_proj, experts)
    down_lora = local_lora(down_lora, experts.down_proj, experts)
    with _handing(experts, gate_up_lora, down_lora) as handed:
        out = experts(x, top_k_index, top_k_weights)
    if not handed["taken"]:
        implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        raise RuntimeError(
            "qwen3_moe_fused: these experts are sharded by Transformers' expert / tensor parallel, so the "
            "kernelized block runs them through the forward Transformers installed, which calls the configured "
            f"experts implementation ({implementation!r}), not this package's. Load the model with "
            'experts_implementation="qwen3_moe_fused" (after ExpertsInterface.register("qwen3_moe_fused", '
            "kernel.experts_forward))."
        )
    return out
