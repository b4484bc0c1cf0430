"""Worker of tests/test_multi_gpu.py: run by torchrun with 2 gloo ranks on CPU.

    torchrun --nproc_per_node 2 tests/multi_gpu_worker.py CHECKPOINT OUT CASE [CASE ...]

A CASE is "mode:path:variant":
  mode     ddp (torch DDP), fsdp2 (torch fully_shard per decoder layer, 4-bit tensors in
           ignored_params; fsdp2-all: sharded too), hf-fsdp2 / hf-ep /
           hf-ep-router / hf-fsdp-ep / hf-tp (Transformers' DistributedConfig), acc-ddp /
           acc-fsdp2 (accelerate)
  path     kernelize (kernels.kernelize swaps the block's forward; with expert / tensor
           parallel also experts_implementation="qwen3_moe_fused"), impl
           (experts_implementation="qwen3_moe_fused"), eager (Transformers alone),
           eager-kernelize (kernelize without our experts implementation)
  variant  full (every weight trainable), lora (PEFT LoRA on the experts), qlora (4-bit experts
           + LoRA)
WORKER_DEVICE=cuda (default cpu) runs on each rank's CUDA GPU with nccl instead of gloo (the
real Triton kernels: leave TRITON_INTERPRET unset), WORKER_DTYPE=bfloat16 (default float32) the
model in bf16 (scripts/gpu_multi_gpu_ws1.sh: world size 1 on one GPU).
For each case every rank runs one forward + backward of the tiny model on its share of a fixed
batch; rank 0 also runs the same model in one process (no process group) on the whole batch.
Rank 0 writes OUT/CASE.pt: {"loss", "grads" (full tensors by parameter name), "ref_loss",
"ref_grads"} or {"error": message}.

A "save:MODE:VARIANT" case (the kernelized block) trains one AdamW step, saves a checkpoint
the way docs/multi_gpu.md says (full, MODE fsdp2: torch DCP of model and optimizer; hf-fsdp2:
save_pretrained, gathered and distributed_checkpoint=True; lora / qlora, MODE fsdp2, acc-fsdp2,
ddp, acc-ddp, hf-fsdp2 or hf-ep: PEFT's adapter files, see _save_adapter), loads it back and
writes the losses of the whole eval batch (see run_save_case).
"""

import copy
import math
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import TINY_CONFIG, kernelize_moe, moe_blocks, sample_batch  # noqa: E402

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
DEVICE_TYPE = os.environ.get("WORKER_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("WORKER_DTYPE", "float32"))


def _device():
    if DEVICE_TYPE == "cpu":
        return torch.device("cpu")
    return torch.device(DEVICE_TYPE, int(os.environ.get("LOCAL_RANK", "0")))
# Modes whose ranks all see the same batch (Transformers gives a tensor-parallel group one batch).
REPLICATED_BATCH = {"hf-ep", "hf-ep-router", "hf-tp"}
# Modes in which nothing averages the gradients of PEFT parameters added after loading.
UNMANAGED_PEFT = {"hf-fsdp2", "hf-fsdp-ep"}
# Modes that shard the experts and install their own forward on them: the kernelized block runs
# that forward, which calls the configured experts implementation, so it must be ours.
SHARDED_EXPERTS = {"hf-ep", "hf-ep-router", "hf-fsdp-ep", "hf-tp"}


def _kernel():
    from kernels import get_kernel
    from transformers.integrations.moe import ExpertsInterface

    kernel = get_kernel("org/qwen3-moe-fused", version=1)
    ExpertsInterface.register("qwen3_moe_fused", kernel.experts_forward)
    return kernel


def _distributed_config(mode):
    from transformers.distributed import DistributedConfig

    n = dist.get_world_size()
    return {
        "hf-fsdp2": lambda: DistributedConfig(fsdp_size=n),
        "hf-ep": lambda: DistributedConfig(ep_size=n, tp_size=n, tp_plan={}),
        "hf-ep-router": lambda: DistributedConfig(
            ep_size=n,
            tp_size=n,
            tp_plan={},
            ep_plan={"model.layers.*.mlp.gate": "ep_router", "model.layers.*.mlp.experts": "moe_tp_experts"},
        ),
        "hf-fsdp-ep": lambda: DistributedConfig(fsdp_size=n, ep_size=n),
        "hf-tp": lambda: DistributedConfig(tp_size=n),
    }[mode]()


def randomize_lora(model, seed=0):
    """Deterministic non-zero LoRA weights by parameter name (PEFT's B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                fan = param.shape[1] if ".lora_A." in name else TINY_CONFIG["num_experts"]
                param.copy_(0.5 * torch.randn(param.shape, generator=generator) / math.sqrt(fan))


def build(checkpoint, mode, path, variant, distributed: bool):
    """The model of a case: loaded, kernelized or not, 4-bit and LoRA as asked, wrapped by the mode."""
    from kernels import Mode
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeForCausalLM

    kernel = _kernel()
    # eager: Transformers' own experts; eager-kernelize: the kernelized block without our
    # experts implementation (which expert / tensor parallel needs: a clear error).
    ours = path == "impl" or (path == "kernelize" and mode in SHARDED_EXPERTS)
    load = dict(dtype=DTYPE, experts_implementation="qwen3_moe_fused" if ours else "eager")
    if distributed and mode.startswith("hf-"):
        load["distributed_config"] = _distributed_config(mode)  # Transformers puts it on the rank's device
    model = Qwen3MoeForCausalLM.from_pretrained(checkpoint, **load)
    if next(model.parameters()).device.type != DEVICE_TYPE:
        # Not placed by Transformers: no distributed_config, or one of size 1 (which it ignores).
        model.to(_device())
    if path in ("kernelize", "eager-kernelize"):
        # The MoE blocks only: kernelize(model) also resets the forward of the RMSNorm layers, which
        # drops the forward Transformers' tensor parallel installs on q_norm / k_norm.
        for block in moe_blocks(model):
            kernelize_moe(block, Mode.TRAINING)
    if variant == "qlora":
        kernel.quantize_experts_4bit(model)
    if variant in ("lora", "qlora"):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERT_TARGETS)
        model = get_peft_model(model, config)
        randomize_lora(model)
    model.train()
    if not distributed:
        return model
    if mode in ("ddp", "acc-ddp", "fsdp2", "fsdp2-all", "acc-fsdp2"):
        return _wrap(model, mode)
    return model


def _decoder_layers(model):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    return [m for m in model.modules() if isinstance(m, Qwen3MoeDecoderLayer)]


def _quantized_params(model):
    return {p for p in model.parameters() if getattr(p, "quant_type", None) is not None}


def _wrap(model, mode):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if mode in ("fsdp2", "fsdp2-all"):
        from torch.distributed.fsdp import fully_shard

        # fsdp2: the 4-bit storage stays whole on every rank (frozen); fsdp2-all shards it too.
        ignored = _quantized_params(model) if mode == "fsdp2" else set()
        for layer in _decoder_layers(model):
            fully_shard(layer, ignored_params=ignored or None)
        return fully_shard(model, ignored_params=ignored or None)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps its state (DDP or FSDP, the plugin) process-wide from the first Accelerator:
    # without a reset, an FSDP2 case after a DDP one would run under DDP. The partial state too: on
    # CUDA, AcceleratorState writes FSDP into it, and a second FSDP2 case would then find FSDP
    # there and skip setting its plugin (AttributeError: no attribute 'is_fsdp2' in prepare).
    AcceleratorState._reset_state(reset_partial_state=True)
    if mode == "acc-ddp":
        return Accelerator(cpu=DEVICE_TYPE == "cpu").prepare_model(model)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen3MoeDecoderLayer"],
        cpu_ram_efficient_loading=False,
        state_dict_type="SHARDED_STATE_DICT",
        # 4-bit experts: the modules owning the uint8 storage stay out of the sharding (FSDP2
        # cannot shard it); accelerate passes their parameters to fully_shard as ignored_params.
        ignored_modules=[m for m in model.modules() if _quantized_params(m) & set(m.parameters(recurse=False))] or None,
    )
    accelerator = Accelerator(cpu=DEVICE_TYPE == "cpu", fsdp_plugin=plugin)
    from accelerate.utils import DistributedType

    if accelerator.state.distributed_type != DistributedType.FSDP:
        # accelerate 1.15 turns FSDP on only for accelerator devices (MULTI_GPU, ...), not for
        # MULTI_CPU (gloo) nor one process: set what it sets there, so prepare_model runs its FSDP2 code.
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    # accelerate's FSDP2 prepares the model with its optimizer (it re-points the optimizer at the
    # sharded parameters); _train_one_step takes that one.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.prepared_optimizer = optimizer
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(wrapped, FSDPModule):
        raise RuntimeError(f"accelerate did not apply FSDP2: {type(wrapped).__name__}")
    return wrapped


def _batches(mode, world_size):
    """(each rank's batch, the batches of the whole step): a data-parallel rank takes one row."""
    input_ids, attention_mask, labels = sample_batch(TINY_CONFIG["vocab_size"], batch=2, seq_len=11)
    if mode in REPLICATED_BATCH:
        whole = (input_ids, attention_mask, labels)
        return [whole] * world_size, [whole]
    rows = [(input_ids[r : r + 1], attention_mask[r : r + 1], labels[r : r + 1]) for r in range(world_size)]
    return rows, rows


def _clean(name: str) -> str:
    for part in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(part, "")
    return name


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gradients(model):
    return {_clean(n): _full(p.grad).detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, batches):
    """Mean loss over `batches` (as data-parallel ranks average their gradients), then backward."""
    device = _device()
    losses = [model(input_ids=i.to(device), attention_mask=m.to(device), labels=lab.to(device)).loss for i, m, lab in batches]
    loss = sum(losses) / len(losses)
    loss.backward()
    return loss.detach().float().cpu()


def _storage_bytes(model):
    """Bytes of 4-bit expert storage this rank holds (its local shards under expert parallel)."""
    return sum(_local(p).numel() for p in model.parameters() if getattr(p, "quant_type", None) is not None)


def average_unmanaged_grads(model):
    """Gradients of trainable plain-tensor parameters averaged over all ranks (what DDP does):
    Transformers' FSDP2 does not manage PEFT parameters added after loading."""
    world = dist.get_world_size()
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce(p.grad)
            p.grad /= world


def run_case(checkpoint, case):
    mode, path, variant = case.split(":")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank, whole = _batches(mode, world)
    result = {}
    if rank == 0:
        ref = build(checkpoint, mode, path, variant, distributed=False)
        result["ref_loss"] = _step(ref, whole)
        result["ref_grads"] = gradients(ref)
        result["ref_storage_bytes"] = _storage_bytes(ref)
        del ref
    model = build(checkpoint, mode, path, variant, distributed=True)
    result["storage_bytes"] = _storage_bytes(model)
    loss = _step(model, [per_rank[rank]])
    if variant != "full" and mode in UNMANAGED_PEFT:
        average_unmanaged_grads(model)
    loss = loss.to(_device())
    dist.all_reduce(loss)
    result["loss"] = loss.cpu() / world
    result["grads"] = gradients(model)
    return result


# ---------------------------------------------------------------- checkpoints


def _eval_loss(model, batch):
    """Loss of the whole eval batch (every rank runs all of it: the sharded model gives the loss
    one process gives), no gradients."""
    input_ids, attention_mask, labels = (t.to(_device()) for t in batch)
    with torch.no_grad():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.detach().float()
    _reshard(model)
    if dist.is_initialized() and _is_sharded(model):
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return loss


def _reshard(model):
    """FSDP2 keeps some parameters unsharded after a forward, for the backward (the root
    module's; with DistributedConfig(fsdp_size=N) also the final norm + lm_head group): after a
    forward without backward, reshard them, or model.parameters() holds the unsharded tensors:
    an optimizer built then never trains them, and get_optimizer_state_dict raises KeyError."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _is_sharded(model):
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_params(model, trainable_only=False):
    """{name: full tensor} of the parameters (a collective: every rank calls it)."""
    return {
        _clean(n): _full(p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad or not trainable_only
    }


def _train_one_step(model, rank, mode, variant):
    """One AdamW step on this rank's share of the training batch (_batches); -> the optimizer."""
    optimizer = getattr(model, "prepared_optimizer", None)  # accelerate FSDP2 (_wrap)
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_rank, _ = _batches(mode, dist.get_world_size())
    _step(model, [per_rank[rank]])
    if variant != "full" and mode in UNMANAGED_PEFT:
        average_unmanaged_grads(model)  # docs/multi_gpu.md, footnote (1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _optimizer_mismatches(a, b):
    """(tensors of optimizer state compared, how many differ), over all ranks (each compares its shards)."""
    compared = torch.zeros(2, dtype=torch.int64)
    pa = [p for group in a.param_groups for p in group["params"]]
    pb = [p for group in b.param_groups for p in group["params"]]
    for x, y in zip(pa, pb, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            left, right = _local(a.state[x][key]), _local(b.state[y][key])
            compared += torch.tensor([1, int(not torch.equal(left, right))])
    dist.all_reduce(compared)
    return compared.tolist()


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _plain_model(checkpoint, variant):
    """The model of one process, no process group involved: Transformers' eager experts, or
    (qlora) the kernelized block with the same 4-bit experts (quantizing is deterministic)."""
    from kernels import Mode
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=DTYPE, experts_implementation="eager").to(_device())
    if variant == "qlora":
        for block in moe_blocks(model):
            kernelize_moe(block, Mode.TRAINING)
        _kernel().quantize_experts_4bit(model)
    return model.eval()


def _save_load_fsdp2_full(checkpoint, folder, model, optimizer, result):
    """torch DCP: sharded model + optimizer state, loaded into a fresh sharded model; and the
    same files loaded by one process (no_dist) into a plain model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=folder)  # every rank writes its shards

    fresh = build(checkpoint, "fsdp2", "kernelize", "full", distributed=True)
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    result["fresh_loss"] = _eval_loss(fresh, _eval_batch())  # before loading: must differ
    state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_optimizer)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_optimizer, state["optim"])
    result["reloaded_loss"] = _eval_loss(fresh, _eval_batch())
    result["reloaded_params"] = full_params(fresh)
    result["optimizer_compared"], result["optimizer_mismatches"] = _optimizer_mismatches(optimizer, fresh_optimizer)

    if dist.get_rank() == 0:  # one process reads the sharded files (no collectives)
        plain = _plain_model(checkpoint, "full")
        plain_state = plain.state_dict()
        dcp.load({"model": plain_state}, checkpoint_id=folder, no_dist=True)
        plain.load_state_dict(plain_state)
        result["one_process_loss"] = _eval_loss(plain, _eval_batch())


def _save_load_hf_fsdp2_full(checkpoint, folder, model, result):
    """Transformers' save_pretrained of a DistributedConfig(fsdp_size=2) model: gathered (rank 0
    writes the Hub layout) and distributed_checkpoint=True (DCP files of every rank)."""
    import shutil

    from transformers.distributed.checkpoint import consolidate_distributed_checkpoint

    gathered, sharded = folder / "gathered", folder / "sharded"
    model.save_pretrained(gathered)
    model.save_pretrained(sharded, distributed_checkpoint=True)
    reloaded = build(sharded, "hf-fsdp2", "kernelize", "full", distributed=True)  # DCP load, sharded
    result["reloaded_loss"] = _eval_loss(reloaded, _eval_batch())
    result["reloaded_params"] = full_params(reloaded)
    if dist.get_rank() == 0:
        result["one_process_loss"] = _eval_loss(_plain_model(gathered, "full"), _eval_batch())
        consolidated = folder / "consolidated"
        consolidate_distributed_checkpoint(sharded, consolidated)
        shutil.copy(sharded / "config.json", consolidated / "config.json")
        result["consolidated_loss"] = _eval_loss(_plain_model(consolidated, "full"), _eval_batch())


def _save_adapter(model, folder, mode):
    """PEFT's adapter files of the trained `model`, written the way docs/multi_gpu.md says for
    `mode` (every rank calls this)."""
    rank = dist.get_rank()
    if mode in ("fsdp2", "acc-fsdp2"):
        # LoRA factors are DTensor shards: gather the trainable parameters (full tensors on rank 0).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        adapter_state = get_model_state_dict(model, options=options)  # every rank; {} on ranks > 0
        if rank == 0:
            model.save_pretrained(folder, state_dict=adapter_state)
    elif mode in ("ddp", "acc-ddp"):
        # The factors are whole and equal on every rank: rank 0 writes those of the wrapped model
        # (accelerate: accelerator.unwrap_model(model), which is extract_model_from_parallel).
        from accelerate.utils import extract_model_from_parallel

        if rank == 0:
            extract_model_from_parallel(model).save_pretrained(folder)
    elif mode in ("hf-fsdp2", "hf-ep"):
        # DistributedConfig: the factors are whole plain tensors on every rank (fsdp_size: PEFT's,
        # unmanaged, gradients averaged by hand; ep_size: gradients summed over the shards).
        model.save_pretrained(folder, is_main_process=rank == 0)
    else:
        raise ValueError(f"no adapter recipe for mode {mode}")


def _save_load_adapter(checkpoint, folder, model, mode, variant, result):
    """Save the adapter (_save_adapter); rank 0 loads it into a plain one-process PEFT model."""
    from peft import PeftModel
    from safetensors import safe_open

    _save_adapter(model, folder, mode)
    dist.barrier()
    if dist.get_rank() == 0:
        with safe_open(folder / "adapter_model.safetensors", "pt") as saved:
            result["saved_keys"] = sorted(saved.keys())
        loaded = PeftModel.from_pretrained(_plain_model(checkpoint, variant), folder)
        result["one_process_loss"] = _eval_loss(loaded.eval(), _eval_batch())
        lora = {n: p for n, p in loaded.named_parameters() if ".lora_" in n}
        result["one_process_params"] = {_clean(n): p.detach().clone() for n, p in lora.items()}


def _eval_batch():
    return sample_batch(TINY_CONFIG["vocab_size"], batch=2, seq_len=11, seed=2)


def run_save_case(checkpoint, out, case):
    """Train one step, save, load back. Rank 0 returns {"initial_loss" (before the step),
    "loss" (after), "params" (full, after), then per recipe "reloaded_loss" / "reloaded_params"
    (a fresh sharded model loaded from the files), "one_process_loss" (a plain model of one
    process loaded from them), ...}; see the _save_load_* functions."""
    _, mode, variant = case.split(":")
    rank = dist.get_rank()
    folder = [str(Path(out) / f"ckpt-{case.replace(':', '_')}")]
    dist.broadcast_object_list(folder)
    folder = Path(folder[0])
    model = build(checkpoint, mode, "kernelize", variant, distributed=True)
    result = {"initial_loss": _eval_loss(model, _eval_batch())}
    result["initial_params"] = full_params(model, trainable_only=variant != "full")
    optimizer = _train_one_step(model, rank, mode, variant)
    result["loss"] = _eval_loss(model, _eval_batch())
    result["params"] = full_params(model, trainable_only=variant != "full")
    if mode == "fsdp2" and variant == "full":
        _save_load_fsdp2_full(checkpoint, folder, model, optimizer, result)
    elif mode == "hf-fsdp2" and variant == "full":
        _save_load_hf_fsdp2_full(checkpoint, folder, model, result)
    elif variant in ("lora", "qlora"):
        _save_load_adapter(checkpoint, folder, model, mode, variant, result)
    else:
        raise ValueError(f"unknown save case {case}")
    return result


def main():
    checkpoint, out, *cases = sys.argv[1:]
    if DEVICE_TYPE == "cuda":
        torch.cuda.set_device(_device())
    dist.init_process_group("gloo" if DEVICE_TYPE == "cpu" else "nccl")
    if os.environ.get("WORKER_DUMP_AFTER"):
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["WORKER_DUMP_AFTER"]), exit=True)
    _kernel()
    for case in cases:
        try:
            result = run_save_case(checkpoint, out, case) if case.startswith("save:") else run_case(checkpoint, case)
        except Exception as error:  # recorded: the test says which case failed and why
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            # On stderr too: when one rank fails alone, the other waits in a collective and never saves.
            print(f"rank {dist.get_rank()} case {case}:\n{result['traceback']}", file=sys.stderr, flush=True)
        if dist.get_rank() == 0:
            torch.save(result, Path(out) / f"{case.replace(':', '_')}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
