"""QLoRA fine-tuning of Qwen3-30B-A3B on one 24 GB GPU with the qwen3-moe-fused kernels.

    python examples/qlora_qwen3_30b_a3b.py            # CUDA: the real configuration, capped at 24 GB
    python examples/qlora_qwen3_30b_a3b.py --tiny     # the same code path on CPU (Triton interpreter)

Builds Qwen3-30B-A3B from its configuration with random weights created directly on the
device (no download), one decoder layer at a time, each quantized before the next exists:
the experts to NF4 with the kernel's `quantize_experts_4bit`, the attention projections to
bitsandbytes' `Linear4bit` (NF4), as `BitsAndBytesConfig(load_in_4bit=True)` would. Then
`kernelize` swaps the MoE blocks for the package's layer, PEFT adds LoRA with rslora (r = 4
on the experts through `target_parameters`, r = 16 on attention), and full training steps
run with gradient checkpointing and bitsandbytes' 8-bit AdamW on random token sequences.
Prints peak memory and tokens/s; exits non-zero if the memory cap is exceeded or the
loss is not finite. The kernel is loaded the way users load it (the cache `make
publish-local` writes, offline).
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

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (before triton is imported)

import bitsandbytes as bnb  # noqa: E402
from kernels import LayerRepository, Mode, get_kernel, kernelize, replace_kernel_forward_from_hub, use_kernel_mapping  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from qlora_common import linear_4bit, parse_args, train  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding, Qwen3MoeSparseMoeBlock  # noqa: E402

# Qwen/Qwen3-30B-A3B's config.json
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, hidden_act="silu", decoder_sparse_step=1, mlp_only_layers=[],
    bos_token_id=151643, eos_token_id=151645,
)  # fmt: skip
TINY = dict(
    QWEN3_30B_A3B, vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
    num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@torch.no_grad()
def init_weights(module: nn.Module, device, std: float = 0.02):
    """Materialize a meta module on device with random weights (norms at 1)."""
    module.to_empty(device=device)
    for param in module.parameters():
        param.normal_(0.0, std)
    for sub in module.modules():
        if type(sub).__name__.endswith("RMSNorm"):
            sub.weight.fill_(1.0)


def build_model(config: Qwen3MoeConfig, kernel, device, dtype) -> Qwen3MoeForCausalLM:
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config).to(dtype)
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        init_weights(module, device)
    model.model.rotary_emb = Qwen3MoeRotaryEmbedding(config).to(device)  # its buffers were on meta
    for layer in model.model.layers:
        init_weights(layer, device)
        kernel.quantize_experts_4bit(layer.mlp)  # 16-bit experts of one layer exist at a time
        for name in ATTENTION:
            setattr(layer.self_attn, name, linear_4bit(getattr(layer.self_attn, name), device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit layers (as from_pretrained sets it)
    return model


def main():
    logging.getLogger("kernels").setLevel(logging.ERROR)
    args = parse_args(__doc__.split("\n")[0], memory_cap_gib=24.0)
    device, dtype, seq_len = args.device, args.dtype, args.seq_len
    torch.manual_seed(0)

    kernel = get_kernel("org/qwen3-moe-fused", version=1)
    config = Qwen3MoeConfig(**(TINY if args.tiny else QWEN3_30B_A3B))
    config._experts_implementation = "eager"
    t0 = time.perf_counter()
    model = build_model(config, kernel, device, dtype)
    print(f"built {'tiny ' if args.tiny else ''}Qwen3-30B-A3B on {device} in {time.perf_counter() - t0:.0f} s: "
          f"experts NF4 (qwen3-moe-fused), attention NF4 (bitsandbytes), the rest {dtype}")  # fmt: skip

    replace_kernel_forward_from_hub(Qwen3MoeSparseMoeBlock, "Qwen3MoeSparseMoeBlock")
    repo = LayerRepository(repo_id="org/qwen3-moe-fused", layer_name="Qwen3MoeSparseMoeBlock", version=1)
    with use_kernel_mapping({"Qwen3MoeSparseMoeBlock": {device.type: repo}}):
        kernelize(model, mode=Mode.TRAINING, device=device.type)

    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    lora = LoraConfig(
        r=16, lora_alpha=16, use_rslora=True, target_modules=list(ATTENTION), target_parameters=experts,
        rank_pattern={name: 4 for name in experts},  # PEFT matches parameter targets by "<module>.<parameter>"
    )  # fmt: skip
    # PEFT 0.21 checks rank_pattern against target_modules only and warns; it does apply it to
    # target_parameters (the ranks are printed below).
    warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
    model = get_peft_model(model, lora)
    layer = model.base_model.model.model.layers[0]
    experts_rank = {w.parameter_name: w.r["default"] for w in layer.mlp.experts.modules() if hasattr(w, "parameter_name")}
    print(f"LoRA ranks: experts {experts_rank}, attention q_proj {layer.self_attn.q_proj.r['default']}")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"LoRA: {sum(p.numel() for p in trainable) / 1e6:.1f} M trainable parameters")
    optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-4)

    generator = torch.Generator().manual_seed(1)

    def step():
        input_ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=generator).to(device)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    train(step, trainable, args)


if __name__ == "__main__":
    main()
