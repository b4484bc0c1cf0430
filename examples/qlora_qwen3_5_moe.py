"""QLoRA fine-tuning of Qwen3.6-35B-A3B (Qwen3.5 MoE architecture) on one GPU within 22 GiB.

    python examples/qlora_qwen3_5_moe.py            # CUDA: the real configuration, capped at 22 GiB
    python examples/qlora_qwen3_5_moe.py --tiny     # the same code path on CPU (Triton interpreter)

As examples/qlora_qwen3_30b_a3b.py, for `Qwen3_5MoeForCausalLM`: the model is built from
its configuration with random weights on the device (no download), one decoder layer at a
time, each quantized before the next exists: the routed experts to NF4 with the kernel's
`quantize_experts_4bit` (blocksize 128), every linear layer of the attention (full and Gated DeltaNet) and the lm_head to
bitsandbytes' `Linear4bit`; the shared expert and its gate stay bf16. `kernelize` swaps the
`Qwen3_5MoeSparseMoeBlock`s for the package's layer; PEFT adds LoRA with rslora (r = 4 on the
routed experts through `target_parameters`, r = 16 on attention and the shared expert; LoRA weights
in bf16); then
training steps with gradient checkpointing and 8-bit AdamW on random tokens. Prints peak
memory and tokens/s; exits non-zero if the memory cap is exceeded or the loss is not finite.
"""

import logging
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("HF_HUB_CACHE", str(ROOT / "build" / "hub-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Growable segments: less memory lost to fragmentation under the cap (set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.utils.checkpoint  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (before triton is imported)

import bitsandbytes as bnb  # noqa: E402
from kernels import LayerRepository, Mode, get_kernel, kernelize, replace_kernel_forward_from_hub, use_kernel_mapping  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from qlora_common import linear_4bit, parse_args, train  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Qwen3_5MoeTextConfig  # noqa: E402
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (  # noqa: E402
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeSparseMoeBlock,
    Qwen3_5MoeTextRotaryEmbedding,
)

# Qwen/Qwen3.6-35B-A3B's text configuration (the same architecture and sizes as
# Qwen3.5-35B-A3B: Qwen3_5MoeTextConfig's defaults), full attention every 4th layer.
QWEN3_6_35B_A3B = dict(
    vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
    head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=32, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    num_experts=256, num_experts_per_tok=8, max_position_embeddings=262144, rms_norm_eps=1e-6,
    tie_word_embeddings=False, hidden_act="silu", router_aux_loss_coef=0.001,
)  # fmt: skip
TINY = dict(
    QWEN3_6_35B_A3B, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
    max_position_embeddings=256, layer_types=["linear_attention", "full_attention"],
)  # fmt: skip
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SHARED = ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
EXPERTS_BLOCKSIZE = 128


@torch.no_grad()
def init_weights(module: nn.Module, device, std: float = 0.02):
    """Materialize a meta module on device with random weights (zero-centered norms at 0)."""
    module.to_empty(device=device)
    for name, param in module.named_parameters():
        if name.endswith("A_log"):
            param.uniform_(0.0, 2.0)
        elif name.endswith("dt_bias"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std)
    for sub in module.modules():
        if type(sub).__name__.endswith("RMSNorm"):  # Qwen3.5's norms scale by 1 + weight
            sub.weight.zero_()
        elif type(sub).__name__.endswith("RMSNormGated"):
            sub.weight.fill_(1.0)


def quantize_attention(layer: nn.Module, device):
    """Every nn.Linear of the layer's attention (full or Gated DeltaNet) to NF4."""
    attention = getattr(layer, "self_attn", None) or layer.linear_attn
    for name, child in list(attention.named_children()):
        if type(child) is nn.Linear:
            setattr(attention, name, linear_4bit(child, device))


def chunked_causal_lm_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 256):
    """Transformers' causal-LM loss (next-token cross-entropy in float32, mean over tokens) without
    the (T, vocab) logits: a 248k vocabulary makes them 1 GiB in bf16 and 2 GiB more in float32
    at 2048 tokens. Each chunk of rows is projected, scored and recomputed in the backward."""
    hidden, targets = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()

    def chunk_loss(h, t):
        return nn.functional.cross_entropy(lm_head(h).float(), t, reduction="sum")

    total = sum(
        torch.utils.checkpoint.checkpoint(chunk_loss, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
        for i in range(0, targets.numel(), chunk)
    )
    return total / targets.numel()


def build_model(config, kernel, device, dtype) -> Qwen3_5MoeForCausalLM:
    with torch.device("meta"):
        model = Qwen3_5MoeForCausalLM(config).to(dtype)
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        init_weights(module, device)
    # The frozen lm_head (248k x 2048) in NF4 too: 0.24 instead of 0.95 GiB, what the 22 GiB needs.
    model.lm_head = linear_4bit(model.lm_head, device)
    model.model.rotary_emb = Qwen3_5MoeTextRotaryEmbedding(config).to(device)  # its buffers were on meta
    for layer in model.model.layers:
        init_weights(layer, device)
        # 16-bit experts of one layer exist at a time. Blocksize 128: the absmax scales are float32
        # (no double quantization), 2 GiB for the 32 B expert weights at 64, 1 GiB at 128.
        kernel.quantize_experts_4bit(layer.mlp, blocksize=EXPERTS_BLOCKSIZE)
        quantize_attention(layer, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit layers (as from_pretrained sets it)
    return model


def main():
    logging.getLogger("kernels").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = parse_args(__doc__.split("\n")[0], memory_cap_gib=22.0)
    device, dtype, seq_len = args.device, args.dtype, args.seq_len
    torch.manual_seed(0)

    kernel = get_kernel("org/qwen3-moe-fused", version=1)
    config = Qwen3_5MoeTextConfig(**(TINY if args.tiny else QWEN3_6_35B_A3B))
    config._experts_implementation = "eager"
    t0 = time.perf_counter()
    model = build_model(config, kernel, device, dtype)
    print(f"built {'tiny ' if args.tiny else ''}Qwen3.6-35B-A3B on {device} in {time.perf_counter() - t0:.0f} s: "
          f"experts NF4 blocksize {EXPERTS_BLOCKSIZE} (qwen3-moe-fused), attention NF4 (bitsandbytes), the rest {dtype}")  # fmt: skip
    if device.type == "cuda":
        print(f"model {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB")

    name = Qwen3_5MoeSparseMoeBlock.__name__
    replace_kernel_forward_from_hub(Qwen3_5MoeSparseMoeBlock, name)
    repo = LayerRepository(repo_id="org/qwen3-moe-fused", layer_name=name, version=1)
    with use_kernel_mapping({name: {device.type: repo}}):
        kernelize(model, mode=Mode.TRAINING, device=device.type)

    lora = LoraConfig(
        r=16, lora_alpha=16, use_rslora=True, target_modules=[*ATTENTION, *SHARED], target_parameters=list(EXPERTS),
        rank_pattern={name: 4 for name in EXPERTS},  # PEFT matches parameter targets by "<module>.<parameter>"
    )  # fmt: skip
    warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
    # LoRA weights in the model's dtype (PEFT would make them float32: 0.9 GiB more for the
    # 239 M weights and their gradients, past the 22 GiB of a 24 GB GPU).
    model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    layer = next(layer for layer in model.base_model.model.model.layers if hasattr(layer, "self_attn"))
    experts_rank = {w.parameter_name: w.r["default"] for w in layer.mlp.experts.modules() if hasattr(w, "parameter_name")}
    shared_rank = layer.mlp.shared_expert.down_proj.r["default"]
    print(f"LoRA ranks: experts {experts_rank}, attention q_proj {layer.self_attn.q_proj.r['default']}, "
          f"shared expert {shared_rank}")  # fmt: skip
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"LoRA: {sum(p.numel() for p in trainable) / 1e6:.1f} M trainable parameters "
          f"({', '.join(sorted({str(p.dtype) for p in trainable}))})")  # fmt: skip
    optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-4)

    generator = torch.Generator().manual_seed(1)

    causal_lm = model.base_model.model

    def step():
        input_ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=generator).to(device)
        hidden = causal_lm.model(input_ids=input_ids).last_hidden_state
        loss = chunked_causal_lm_loss(causal_lm.lm_head, hidden, input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    train(step, trainable, args)


if __name__ == "__main__":
    main()
