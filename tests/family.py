"""Tiny models of every block class of the Qwen3 MoE family (Transformers 5.22.2), for the
family tests and examples/qlora_qwen3_5_moe.py --tiny.

Each is built from its own Transformers configuration class with small sizes: Qwen3.5 MoE
and Qwen3-Next with one linear-attention (Gated DeltaNet) and one full-attention layer and
a shared expert, Qwen3-VL MoE's and Qwen3-Omni's thinker text models without one. Shared
and routed intermediate sizes are equal (as in the real models) so join_shared_expert applies.
"""

import importlib
from dataclasses import dataclass

import torch
from tiny_model import TINY_CONFIG, tiny_state_dict

COMMON = {k: TINY_CONFIG[k] for k in (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "output_router_logits", "router_aux_loss_coef", "max_position_embeddings",
    "hidden_act", "pad_token_id",
)}  # fmt: skip
COMMON.update(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)
LINEAR_ATTENTION = dict(
    linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"],
    shared_expert_intermediate_size=COMMON["moe_intermediate_size"],
)  # fmt: skip


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # transformers.models.<module>
    config_cls: str
    model_cls: str
    block_cls: str
    config: dict
    causal_lm: bool  # the model returns logits, loss and aux_loss
    shared_expert: bool
    per_expert_checkpoint: bool  # the Hub stores its experts one tensor per expert

    def _attr(self, kind: str, name: str):
        return getattr(importlib.import_module(f"transformers.models.{self.module}.{kind}_{self.module}"), name)

    @property
    def block(self):
        return self._attr("modeling", self.block_cls)

    def make_config(self, **overrides):
        return self._attr("configuration", self.config_cls)(**{**self.config, **overrides})

    def model_class(self):
        return self._attr("modeling", self.model_cls)


FAMILIES = {
    f.name: f
    for f in [
        Family("qwen3_5_moe", "qwen3_5_moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
               "Qwen3_5MoeSparseMoeBlock", dict(COMMON, **LINEAR_ATTENTION), True, True, True),
        Family("qwen3_next", "qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM", "Qwen3NextSparseMoeBlock",
               dict(COMMON, **LINEAR_ATTENTION, norm_topk_prob=True), True, True, True),
        Family("qwen3_vl_moe", "qwen3_vl_moe", "Qwen3VLMoeTextConfig", "Qwen3VLMoeTextModel",
               "Qwen3VLMoeTextSparseMoeBlock", dict(COMMON), False, False, False),
        Family("qwen3_omni_moe", "qwen3_omni_moe", "Qwen3OmniMoeTextConfig", "Qwen3OmniMoeThinkerTextModel",
               "Qwen3OmniMoeThinkerTextSparseMoeBlock", dict(COMMON, norm_topk_prob=True), False, False, True),
    ]
}  # fmt: skip


def write_checkpoint(family: Family, path, seed: int = 0, **overrides):
    """config.json and model.safetensors of random weights, experts per expert (the Hub's layout)."""
    from safetensors.torch import save_file

    config = family.make_config(**overrides)
    config.save_pretrained(path)
    state = tiny_state_dict(config, seed, family.model_class())
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return state


def build_model(family: Family, seed: int = 0, experts_implementation="eager", **overrides):
    """The tiny model with random weights (no checkpoint), float32, on CPU."""
    config = family.make_config(**overrides)
    config._experts_implementation = experts_implementation
    model = family.model_class()(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            std = 2.0 if name.endswith("mlp.gate.weight") else 1.0  # router: decisive top-k
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.dim() >= 2:
                param.copy_(std * torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    return model


def load(family: Family, path, experts_implementation="eager", **kwargs):
    return family.model_class().from_pretrained(
        path, dtype=torch.float32, experts_implementation=experts_implementation, **kwargs
    )
