"""4-bit NF4 storage of the Qwen3 MoE expert tensors on the model.

`quantize_experts_4bit(model)` replaces every experts module's `gate_up_proj` (E, 2I, H) and
`down_proj` (E, H, I) by a frozen uint8 Parameter of the same name: ONE 1-D tensor

    [ codes: ceil(n/2) bytes | zeros up to a multiple of 16 bytes | absmax: ceil(n/blocksize) float32 ]

in the format of nf4.py (bitsandbytes' quantize_4bit, NF4, no double quantization). The
Parameter object carries what it holds: `quant_type` ("nf4"), `quant_shape` (E, out, in),
`quant_dtype` (the dtype that was quantized: the compute dtype), `quant_blocksize`,
`quant_requires_grad`, and `ds_shape` = quant_shape, which PEFT's ParamWrapper reads to size
the LoRA factors. `nf4_weight(param)` gives views of the codes and absmax (no copy).

One tensor keeps codes and scales together and exact: `.to(device)`, `model.to(torch.bfloat16)`
and `.half()` (which leave integer tensors alone), `state_dict()` and `load_state_dict()`.

Saving and loading: `model.state_dict()` holds the uint8 storage under the tensor's usual key.
To load, build the model in the same dtype, call `quantize_experts_4bit(model, blocksize=...)`
with the saved blocksize (the shapes then match), then `model.load_state_dict(state)` or
`safetensors.torch.load_model(model, path)`: the bytes are copied as they are, lossless. (Not
`assign=True`: that would replace the Parameter and drop its attributes.) `torch.save` of the
Parameter and `copy.deepcopy` of the model keep them too.

Under Transformers' expert parallel (`DistributedConfig(ep_size=N)`, either of its plans) the
expert tensors are DTensors sharded by expert, and the forward Transformers installs on the
experts module hands the experts function their local parts. Each rank then quantizes its own
shard (E/N experts): the module's Parameter stays a DTensor, of the uint8 storage sharded the
same way (so Transformers' forward still sees sharded experts and, with the router plan,
all-reduces their output), carrying `quant_type`, `quant_dtype`, `quant_blocksize` and
`ds_shape` = the whole (E, out, in) tensor (PEFT's LoRA factors stay whole on every rank); the
local Nf4Parameter (`quant_shape` (E/N, out, in)) is kept on the experts module, and
`expert_tensor(module, name)` gives it in place of the plain local view Transformers' forward
swaps in. FSDP2 sharding (Transformers' `fsdp_size`, or `fully_shard` before quantizing) and
tensor parallel cannot shard 4-bit storage: a clear error.
"""

import copy
from math import prod
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..parallel import FSDPModule, is_dtensor
from .nf4 import check_blocksize, dequantize_nf4, num_blocks, quantize_nf4_into

EXPERT_TENSORS = ("gate_up_proj", "down_proj")
# Attribute of an expert-parallel experts module: {tensor name: this rank's local Nf4Parameter}.
_LOCAL_4BIT = "_qwen3_moe_fused_local_4bit"


class Nf4Weight(NamedTuple):
    """The parts of a quantized expert tensor (views into its storage)."""

    codes: Tensor  # (ceil(n/2),) uint8, two indices a byte, the first in the high nibble
    absmax: Tensor  # (ceil(n/blocksize),) float32
    shape: tuple  # (E, out, in) of the dense tensor
    dtype: torch.dtype  # the dense tensor's dtype
    blocksize: int


def _layout(numel: int, blocksize: int) -> tuple[int, int, int]:
    """(bytes of codes, byte offset of absmax, total bytes) of the storage of `numel` values."""
    code_bytes = (numel + 1) // 2
    absmax_offset = -(-code_bytes // 16) * 16  # aligned, so the float32 view is legal and loads vectorize
    return code_bytes, absmax_offset, absmax_offset + 4 * num_blocks(numel, blocksize)


def nf4_views(storage: Tensor, shape, dtype: torch.dtype, blocksize: int) -> Nf4Weight:
    """Nf4Weight of a bare 1-D uint8 storage tensor of a (shape) tensor: for code that gets the
    storage without its attributes (a custom op's inputs)."""
    shape = tuple(shape)
    code_bytes, absmax_offset, total = _layout(prod(shape), blocksize)
    if storage.dtype != torch.uint8 or storage.shape != (total,):
        raise ValueError(
            f"NF4 storage of shape {shape}, blocksize {blocksize} must be ({total},) uint8, "
            f"got {tuple(storage.shape)} {storage.dtype}"
        )
    storage = storage.detach()
    return Nf4Weight(storage[:code_bytes], storage[absmax_offset:].view(torch.float32), shape, dtype, blocksize)


def nf4_weight(param: Tensor | None) -> Nf4Weight | None:
    """The codes / absmax views of a tensor made by quantize_experts_4bit, None for any other tensor
    (a sharded 4-bit DTensor too: its local part is `expert_tensor(module, name)` in the forward)."""
    if getattr(param, "quant_type", None) != "nf4" or param.dtype != torch.uint8 or param.dim() != 1:
        return None
    if is_dtensor(param):
        return None
    return nf4_views(param, param.quant_shape, param.quant_dtype, param.quant_blocksize)


def is_quantized(t: Tensor | None) -> bool:
    return nf4_weight(t) is not None


def is_sharded_4bit(t: Tensor | None) -> bool:
    """A DTensor of 4-bit storage sharded by expert (quantize_experts_4bit under expert parallel)."""
    return is_dtensor(t) and getattr(t, "quant_type", None) == "nf4"


def expert_tensor(module: nn.Module, name: str) -> Tensor:
    """`module.<name>` as the kernels read it. Inside the forward Transformers' expert parallel
    installs, a sharded tensor is swapped for its local part: for 4-bit storage a plain uint8
    view, which is replaced here by the local Nf4Parameter it views (codes, scales, shape)."""
    weight = getattr(module, name)
    local = vars(module).get(_LOCAL_4BIT, {}).get(name)
    if local is None or is_dtensor(weight) or is_quantized(weight):
        return weight
    if weight.dtype != torch.uint8 or weight.shape != local.shape or weight.data_ptr() != local.data_ptr():
        raise RuntimeError(
            f"qwen3_moe_fused: experts.{name} is not the 4-bit local shard quantize_experts_4bit made under "
            "expert parallel (moved or replaced since): call quantize_experts_4bit after the model is on its device"
        )
    return local


_FORWARD_HELP = (
    "only qwen3_moe_fused's kernels read it: kernelize the model with the qwen3_moe_fused layer, or load it "
    'with experts_implementation="qwen3_moe_fused" (Transformers\' own experts forward cannot run 4-bit experts)'
)
_SPLIT_HELP = (
    "4-bit experts cannot be split. From save_pretrained (Transformers' checkpoint layout): save the LoRA "
    "adapter with peft_model.save_pretrained(path) (the base model reloads and quantizes the same bytes), the "
    "whole model losslessly with safetensors.torch.save_model(model, path) and load it with "
    "quantize_experts_4bit(model, blocksize=...) then safetensors.torch.load_model(model, path), or a 16-bit "
    "checkpoint with dequantize_experts_4bit(model).save_pretrained(path). From FSDP2 (fully_shard): keep the "
    "4-bit expert tensors out of it with fully_shard(..., ignored_params={p for p in model.parameters() "
    "if p.dtype == torch.uint8})"
)
_MERGE_HELP = (
    "merging LoRA into 4-bit experts is not supported (NF4 cannot hold W + BA without a lossy requantization): "
    "call qwen3_moe_fused.dequantize_experts_4bit(peft_model) first, then merge_adapter() or merge_and_unload() "
    "merges into that 16-bit copy"
)
# Ops that read the storage as the dense (E, out, in) tensor it stands for, and the step that does it.
_DENSE_OPS = {
    torch.Tensor.transpose: _FORWARD_HELP, torch.transpose: _FORWARD_HELP, torch.Tensor.permute: _FORWARD_HELP,
    torch.permute: _FORWARD_HELP, torch.nn.functional.linear: _FORWARD_HELP, torch.matmul: _FORWARD_HELP,
    torch.Tensor.__matmul__: _FORWARD_HELP, torch.bmm: _FORWARD_HELP, torch.einsum: _FORWARD_HELP,
    torch.chunk: _SPLIT_HELP, torch.Tensor.chunk: _SPLIT_HELP, torch.split: _SPLIT_HELP,
    torch.Tensor.split: _SPLIT_HELP, torch.unbind: _SPLIT_HELP, torch.Tensor.unbind: _SPLIT_HELP,
}  # fmt: skip
if hasattr(torch, "_grouped_mm"):
    _DENSE_OPS[torch._grouped_mm] = _FORWARD_HELP
_IN_PLACE_ARITHMETIC = {torch.Tensor.__iadd__, torch.Tensor.__isub__, torch.Tensor.add_, torch.Tensor.sub_}


def _refused(args, func) -> str | None:
    """What to do instead, when `func` would read 4-bit storage as the dense weight."""
    if func in _IN_PLACE_ARITHMETIC:
        return _MERGE_HELP
    if func is Tensor.__getitem__ and not isinstance(args[1], slice):  # experts indexed one by one
        return _FORWARD_HELP
    return _DENSE_OPS.get(func)


def _guarded_call(func, args, kwargs):
    # PEFT's ParamWrapper forward (the experts_implementation path) parametrizes the tensor as
    # baddbmm(W, B, A) while the experts run, and evaluates that once to check it. 4-bit storage
    # cannot hold W + s·B@A: it stays as it is, and the package's experts function reads the
    # factors from the parametrization (wrappers.parametrized_lora).
    if func is torch.baddbmm and args and is_quantized(args[0]):
        return args[0]
    help = _refused(args, func)
    if help is not None:
        name = getattr(func, "__name__", str(func))
        raise RuntimeError(f"qwen3_moe_fused: {name} on a 4-bit expert tensor (uint8 NF4 storage): {help}")
    with torch._C.DisableTorchFunctionSubclass():
        out = func(*args, **(kwargs or {}))
    # .data and .detach() (state_dict, PEFT's merge) keep the guard; everything else is plain.
    is_data = getattr(func, "__self__", None) is Tensor.data and func.__name__ == "__get__"
    if func in (Tensor.detach, Tensor.clone) or is_data:
        return out.as_subclass(_Nf4Bytes)
    return out


class _Nf4Bytes(Tensor):
    """`.data` / `.detach()` of an Nf4Parameter (what state_dict() and PEFT's merge see): the
    same bytes, with the same refusals."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _guarded_call(func, args, kwargs)

    def __reduce_ex__(self, protocol):
        return self.as_subclass(Tensor).__reduce_ex__(protocol)


class Nf4Parameter(nn.Parameter):
    """The uint8 storage Parameter; a deep copy keeps the attributes saying what it holds
    (nn.Parameter's own copies only the data). Code that would read it as a dense weight
    (Transformers' experts forward, save_pretrained's checkpoint conversion, PEFT's merge)
    gets an error saying what to do instead of a shape error."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _guarded_call(func, args, kwargs)

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            copied = super().__deepcopy__(memo)
            copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return memo[id(self)]


@torch.no_grad()
def _quantize_param(param: Tensor, blocksize: int) -> nn.Parameter:
    code_bytes, absmax_offset, total = _layout(param.numel(), blocksize)
    storage = torch.empty(total, dtype=torch.uint8, device=param.device)
    storage[code_bytes:absmax_offset] = 0  # padding: deterministic bytes in saved files
    quantize_nf4_into(param, storage[:code_bytes], storage[absmax_offset:].view(torch.float32), blocksize)
    quantized = Nf4Parameter(storage, requires_grad=False)
    quantized.quant_type = "nf4"
    quantized.quant_shape = param.shape
    quantized.quant_dtype = param.dtype
    quantized.quant_blocksize = blocksize
    quantized.quant_requires_grad = param.requires_grad
    quantized.ds_shape = param.shape  # PEFT sizes LoRA factors from getattr(param, "ds_shape", param.shape)
    return quantized


def _is_expert_tensor(param: Tensor | None) -> bool:
    if param is None:
        return False
    return is_quantized(param) or is_sharded_4bit(param) or (param.dim() == 3 and param.is_floating_point())


def _fsdp_managed(model: nn.Module) -> set[int]:
    """ids of the modules that FSDP2 (fully_shard) manages: FSDP modules and everything inside them."""
    return {id(m) for root in model.modules() if isinstance(root, FSDPModule) for m in root.modules()}


def _check_expert_parallel(module: nn.Module, name: str, param: Tensor, fsdp_managed: bool) -> None:
    """Raise unless `param` is sharded by Transformers' expert parallel alone (by expert, under
    the forward it installs), the one sharding whose local parts are whole experts."""
    if fsdp_managed or "forward" not in vars(module):
        raise ValueError(
            f"quantize_experts_4bit: {name} is a DTensor sharded by FSDP2 (Transformers' "
            "DistributedConfig(fsdp_size=N), alone or with ep_size, or fully_shard applied before quantizing): "
            "4-bit experts cannot be sharded by FSDP2. Use DistributedConfig(ep_size=N) without fsdp_size "
            "(each rank quantizes its own experts), DDP, or torch fully_shard applied after quantizing, with the "
            "4-bit tensors in ignored_params"
        )
    if not all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in param.placements):
        raise ValueError(
            f"quantize_experts_4bit: {name} is sharded by Transformers' tensor parallel ({param.placements}, "
            "DistributedConfig(tp_size=N) without ep_size): 4-bit experts cannot be split inside an expert. "
            "Use expert parallel: DistributedConfig(ep_size=N, tp_size=N, tp_plan={}) or its router plan"
        )


@torch.no_grad()
def _quantize_shard(module: nn.Module, name: str, param: Tensor, blocksize: int) -> nn.Parameter:
    """Quantize this rank's expert shard of the DTensor `param`; -> a DTensor Parameter of the
    uint8 storage sharded the same way (module keeps the local Nf4Parameter)."""
    from torch.distributed.tensor import DTensor

    local = _quantize_param(param.to_local(), blocksize)
    local.quant_requires_grad = param.requires_grad
    vars(module).setdefault(_LOCAL_4BIT, {})[name] = local
    shards = prod(param.device_mesh.size(i) for i, p in enumerate(param.placements) if p.is_shard())
    storage = DTensor.from_local(
        local.data.as_subclass(Tensor), param.device_mesh, param.placements, run_check=False,
        shape=(shards * local.numel(),), stride=(1,),
    )  # fmt: skip
    sharded = nn.Parameter(storage, requires_grad=False)
    sharded.quant_type = "nf4"
    sharded.quant_dtype = param.dtype
    sharded.quant_blocksize = blocksize
    sharded.quant_requires_grad = param.requires_grad
    sharded.ds_shape = param.shape  # the whole tensor: PEFT sizes its (replicated) LoRA factors from it
    return sharded


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    """Modules owning 3-D `gate_up_proj` and `down_proj` (Transformers' Qwen3MoeExperts). Owning:
    in `_parameters`, so PEFT's wrappers, which only forward attribute reads, are not counted."""
    return [m for m in model.modules() if all(_is_expert_tensor(m._parameters.get(name)) for name in EXPERT_TENSORS)]


def quantize_experts_4bit(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64) -> nn.Module:
    """Store every Qwen3 MoE expert tensor of `model` in 4-bit NF4, in place, on its own device.

    `model`: a Qwen3 MoE model, a PEFT model of one, a Qwen3MoeSparseMoeBlock or the experts module.
    Tensors already quantized are left as they are. Returns `model`.
    """
    if quant_type != "nf4":
        raise ValueError(f"quant_type {quant_type!r} is not supported: only 'nf4' is")
    check_blocksize(blocksize)
    experts = _experts_modules(model)
    if not experts:
        raise ValueError(
            f"no Qwen3 MoE experts in {type(model).__name__}: expected modules with 3-D gate_up_proj and down_proj"
        )
    fsdp_managed = _fsdp_managed(model)
    for module in experts:
        for name in EXPERT_TENSORS:
            param = module._parameters[name]
            if is_quantized(param) or is_sharded_4bit(param):
                continue
            if is_dtensor(param):
                _check_expert_parallel(module, name, param, id(module) in fsdp_managed)
                quantized = _quantize_shard(module, name, param, blocksize)
            else:
                quantized = _quantize_param(param, blocksize)
            setattr(module, name, quantized)
            del param  # the 16-bit tensor is freed once nothing else holds it
    return model


@torch.no_grad()
def dequantize_experts_4bit(model: nn.Module) -> nn.Module:
    """Replace every tensor made by quantize_experts_4bit with a dense Parameter of its
    quant_dtype (bitsandbytes' dequantize_4bit values), requires_grad as before quantizing."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if is_sharded_4bit(param):
                raise NotImplementedError(
                    f"dequantize_experts_4bit: {name} is 4-bit storage sharded by expert parallel; dequantize a "
                    "model of one process (load the adapter there to merge it)"
                )
            weight = nf4_weight(param)
            if weight is None:
                continue
            dense = dequantize_nf4(weight.codes, weight.absmax, weight.shape, weight.dtype, weight.blocksize)
            setattr(module, name, nn.Parameter(dense, requires_grad=param.quant_requires_grad))
    return model
