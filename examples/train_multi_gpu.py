"""Fine-tune a Qwen3 MoE model on several GPUs with the qwen3-moe-fused kernels and an engine
that already exists: torch DDP, torch FSDP2 (fully_shard), Transformers' expert parallel
(DistributedConfig, all-to-all token dispatch) or accelerate. Full fine-tuning, LoRA on the
experts (PEFT) or QLoRA (4-bit experts + LoRA). docs/multi_gpu.md says which combinations work.

Qwen3-30B-A3B on 8 GPUs:

    torchrun --nproc_per_node 8 examples/train_multi_gpu.py --model Qwen/Qwen3-30B-A3B --mode fsdp2 --finetune full
    torchrun --nproc_per_node 8 examples/train_multi_gpu.py --model Qwen/Qwen3-30B-A3B --mode ep --finetune lora
    torchrun --nproc_per_node 8 examples/train_multi_gpu.py --model Qwen/Qwen3-30B-A3B --mode ddp --finetune qlora
    accelerate launch --num_processes 8 --use_fsdp --fsdp_version 2 \\
        examples/train_multi_gpu.py --model Qwen/Qwen3-30B-A3B --mode accelerate --finetune qlora

Qwen3-235B-A22B on 8 GPUs (expert parallel: each GPU holds 16 of the 128 experts of a layer):

    torchrun --nproc_per_node 8 examples/train_multi_gpu.py --model Qwen/Qwen3-235B-A22B --mode ep --finetune full
    torchrun --nproc_per_node 8 examples/train_multi_gpu.py --model Qwen/Qwen3-235B-A22B --mode ep --finetune lora
    torchrun --nproc_per_node 8 examples/train_multi_gpu.py --model Qwen/Qwen3-235B-A22B --mode ep --finetune qlora

(full fine-tuning of 235B with AdamW needs more than 8 x 141 GB: that line is for several
nodes. QLoRA under expert parallel: each rank quantizes its own 16 experts a layer after
loading them in 16-bit; docs/multi_gpu.md has the memory estimate.)

On CPU, --tiny writes a tiny random checkpoint and runs the same code with gloo and Triton's
interpreter (float32); tests/test_multi_gpu_example.py runs it with 2 ranks:

    torchrun --standalone --nproc_per_node 2 examples/train_multi_gpu.py --tiny --mode ep --finetune lora

With LoRA under --mode ep or fsdp2, rank 0 saves the adapter (docs/multi_gpu.md, "Checkpoints")
and checks that it loads into a plain one-process PEFT model (no kernel, Transformers' eager
experts) with the loss the trained model gives.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_CACHE", str(ROOT / "build" / "hub-cache"))  # `make publish-local`
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (before triton is imported)

import torch.distributed as dist  # noqa: E402
from kernels import LayerRepository, Mode, get_kernel, kernelize, replace_kernel_forward_from_hub  # noqa: E402
from kernels import use_kernel_mapping  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import ExpertsInterface  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeSparseMoeBlock  # noqa: E402

REPO = "org/qwen3-moe-fused"
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def load(args, kernel, device, dtype):
    """from_pretrained with our experts implementation, the MoE blocks kernelized, 4-bit and LoRA as asked."""
    ExpertsInterface.register("qwen3_moe_fused", kernel.experts_forward)
    kwargs = dict(dtype=dtype, experts_implementation="qwen3_moe_fused")
    if args.mode == "ep":
        from transformers.distributed import DistributedConfig

        # Experts sharded over all ranks, tokens dispatched all-to-all; the rest replicated, one batch for all.
        kwargs["distributed_config"] = DistributedConfig(ep_size=dist.get_world_size(), tp_size=dist.get_world_size(), tp_plan={})
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if args.mode != "ep":
        model.to(device)
    # Only the MoE blocks: kernelize(model) would also reset forwards Transformers' parallelism installs.
    replace_kernel_forward_from_hub(Qwen3MoeSparseMoeBlock, "Qwen3MoeSparseMoeBlock")
    repo = LayerRepository(repo_id=REPO, layer_name="Qwen3MoeSparseMoeBlock", version=1)
    with use_kernel_mapping({"Qwen3MoeSparseMoeBlock": {device.type: repo}}):
        for block in [m for m in model.modules() if isinstance(m, Qwen3MoeSparseMoeBlock)]:
            kernelize(block, mode=Mode.TRAINING, device=device.type)
    if args.finetune == "qlora":
        kernel.quantize_experts_4bit(model)
    if args.finetune in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        # The LoRA factors are replicated: every rank must start from the same ones.
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=[], target_parameters=EXPERT_TARGETS))
        if args.tiny:  # PEFT's B starts at zero; make the check below see LoRA
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".lora_B." in name:
                        p.normal_(0, 0.05, generator=torch.Generator(p.device).manual_seed(0))
    model.train()
    return model


def wrap(model, mode, device):
    """The data-parallel engine; for "ep" Transformers has already sharded the model."""
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        four_bit = {p for p in model.parameters() if p.dtype == torch.uint8}  # frozen; FSDP2 cannot shard them
        for layer in [m for m in model.modules() if isinstance(m, Qwen3MoeDecoderLayer)]:
            fully_shard(layer, ignored_params=four_bit or None)
        return fully_shard(model, ignored_params=four_bit or None)
    if mode == "accelerate":  # FSDP2 or DDP, as `accelerate launch` configured it
        from accelerate import Accelerator

        return Accelerator(cpu=device.type == "cpu").prepare_model(model)
    return model


def batch(vocab_size, rows, seq_len, seed, device):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab_size, (rows, seq_len), generator=generator).to(device)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Hub name or folder of a Qwen3 MoE checkpoint")
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "ep", "accelerate"], default="fsdp2")
    parser.add_argument("--finetune", choices=["full", "lora", "qlora"], default="lora")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on CPU (gloo, Triton's interpreter)")
    parser.add_argument("--out", help="where to save the adapter (default: a temporary folder)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    tmp = tempfile.TemporaryDirectory()
    shared = [tmp.name]
    dist.broadcast_object_list(shared)  # one folder for all ranks: rank 0's
    tmp_name = shared[0]
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import write_tiny_checkpoint

        args.model, args.seq_len = f"{tmp_name}/checkpoint", 12
        if rank == 0:
            write_tiny_checkpoint(args.model)
        dist.barrier()

    kernel = get_kernel(REPO, version=1)
    model = load(args, kernel, device, dtype)
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.get_base_model().config.vocab_size
    trained = wrap(model, args.mode, device)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3)
    # "ep": every rank gets the same batch (the experts' all-to-all splits its rows); else one batch a rank.
    seed = lambda step: 1000 * step + (0 if args.mode == "ep" else rank)  # noqa: E731
    for step in range(args.steps):
        loss = trained(**batch(vocab, 2, args.seq_len, seed(step), device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    if args.finetune != "full" and args.mode in ("ep", "fsdp2"):
        check = batch(vocab, 2, args.seq_len, 12345, device)
        with torch.no_grad():
            trained_loss = trained(**check).loss.item()
        out = Path(args.out or f"{tmp_name}/adapter")
        if args.mode == "fsdp2":
            # The LoRA factors are DTensor shards, which PEFT cannot write: gather the trainable
            # parameters (the adapter only) to rank 0, every rank taking part, then rank 0 writes.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            from torch.distributed.fsdp import FSDPModule

            for module in trained.modules():  # the forward above left the root's parameters unsharded
                if isinstance(module, FSDPModule):
                    module.reshard()
            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            adapter = get_model_state_dict(trained, options=options)  # {} on ranks > 0
            if rank == 0:
                model.save_pretrained(out, state_dict=adapter)
        else:
            # Expert-parallel LoRA factors are whole on every rank (their gradients summed over the ranks);
            # every rank takes part (saving reads the sharded model), rank 0 writes.
            model.save_pretrained(out, is_main_process=rank == 0)
        if rank == 0:
            if args.finetune == "lora":
                from peft import PeftModel

                plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, experts_implementation="eager")
                loaded = PeftModel.from_pretrained(plain.to(device), out)
                with torch.no_grad():
                    loaded_loss = loaded(**check).loss.item()
                print(f"adapter reloaded into one process: loss {loaded_loss:.6f}, trained model {trained_loss:.6f}")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
