"""Helpers of the model-level tests and of examples/train_tiny_qwen3_moe.py (one copy):
a tiny Qwen3 MoE checkpoint in the Hub's per-expert layout, loading and kernelizing it the
way users do, and a recorder of what of the package actually runs.

The checkpoint is written by hand: `model.safetensors` holds one tensor per expert and
projection (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`),
as Qwen3 MoE checkpoints on the Hub do, so `from_pretrained` goes through Transformers'
conversion to the fused (E, 2I, H) / (E, H, I) expert tensors. Weights are random and
non-trivial (the router too, so experts get uneven loads).
"""

import contextlib
import math
import os
from pathlib import Path

import torch

# Small enough for Triton's interpreter, big enough to route unevenly. moe_intermediate_size
# and the token counts used by the tests are not multiples of the kernels' tiles.
TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    output_router_logits=True,
    router_aux_loss_coef=0.02,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=128,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=0,
)

EXPERT_KEY = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"

REPO_ID = "org/qwen3-moe-fused"
LAYER_NAME = "Qwen3MoeSparseMoeBlock"


def tiny_config(**overrides):
    """Qwen3MoeConfig of TINY_CONFIG with `overrides`."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**TINY_CONFIG, **overrides})


def _random_weight(name: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):  # RMSNorm scales around 1
        return 1.0 + 0.2 * torch.randn(shape, generator=generator)
    if name.endswith("mlp.gate.weight"):  # router: large logits so top-k is decisive and loads uneven
        return 2.0 * torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / math.sqrt(shape[-1])


def tiny_state_dict(config, seed: int = 0, model_cls=None) -> dict[str, torch.Tensor]:
    """Random float32 weights for every parameter of model_cls(config) (default
    Qwen3MoeForCausalLM), experts per expert as on the Hub
    (`<prefix>.mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`)."""
    if model_cls is None:
        from transformers import Qwen3MoeForCausalLM as model_cls

    with torch.device("meta"):
        skeleton = model_cls(config)
    generator = torch.Generator().manual_seed(seed)
    num_experts, inter = config.num_experts, config.moe_intermediate_size
    state = {}
    for name, param in skeleton.state_dict().items():
        shape = tuple(param.shape)
        if name.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H) in the model: write gate and up per expert
            prefix = name[: -len("gate_up_proj")]
            for expert in range(num_experts):
                for proj in ("gate_proj", "up_proj"):
                    key = f"{prefix}{expert}.{proj}.weight"
                    state[key] = _random_weight(key, (inter, shape[2]), generator)
        elif name.endswith("mlp.experts.down_proj"):  # (E, H, I)
            prefix = name[: -len("down_proj")]
            for expert in range(num_experts):
                key = f"{prefix}{expert}.down_proj.weight"
                state[key] = _random_weight(key, (shape[1], inter), generator)
        else:
            state[name] = _random_weight(name, shape, generator)
    return state


def write_tiny_checkpoint(path, seed: int = 0, **config_overrides) -> dict[str, torch.Tensor]:
    """Write config.json and a per-expert model.safetensors to `path`; return the tensors written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**config_overrides)
    config.save_pretrained(path)
    state = tiny_state_dict(config, seed)
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return state


def expected_fused_experts(state: dict, layer: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused tensors Transformers should build from the per-expert checkpoint:
    gate_up_proj (E, 2I, H) with each expert's gate rows first, down_proj (E, H, I)."""

    def get(expert, proj):
        return state[EXPERT_KEY.format(layer=layer, expert=expert, proj=proj)]

    gate_up = torch.stack([torch.cat([get(e, "gate_proj"), get(e, "up_proj")]) for e in range(num_experts)])
    down = torch.stack([get(e, "down_proj") for e in range(num_experts)])
    return gate_up, down


# ---------------------------------------------------------------- loading the package


def published_cache() -> bool:
    """Whether HF_HUB_CACHE holds a published v1 of the package (make publish-local)."""
    cache = os.environ.get("HF_HUB_CACHE")
    folder = "kernels--" + REPO_ID.replace("/", "--")
    return bool(cache) and (Path(cache) / folder / "refs" / "v1").is_file()


def layer_repository(layer_name: str = LAYER_NAME):
    """The package's block as a kernels LayerRepository, named by version 1 as users name it.

    kernels 0.17.2 resolves a LayerRepository's version to a commit through the Hub or a
    Hub cache before it looks at LOCAL_KERNELS, so with LOCAL_KERNELS alone (no cache,
    offline or no Hub repository) version=1 cannot resolve; name the v1 branch instead.
    """
    from kernels import LayerRepository

    version = {"version": 1} if published_cache() or "LOCAL_KERNELS" not in os.environ else {"revision": "v1"}
    return LayerRepository(repo_id=REPO_ID, layer_name=layer_name, **version)


def load_tiny(path, dtype=torch.float32, device="cpu", **kwargs):
    """from_pretrained of the tiny checkpoint with Transformers' eager experts loop by default."""
    from transformers import Qwen3MoeForCausalLM

    kwargs.setdefault("experts_implementation", "eager")
    return Qwen3MoeForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)


def kernelize_moe(model, mode, device="cpu", block_classes=None):
    """Swap every MoE block's forward (Qwen3MoeSparseMoeBlock, or each of block_classes) for
    the package's layer of the same name, as users do."""
    from kernels import kernelize, replace_kernel_forward_from_hub, use_kernel_mapping
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    block_classes = block_classes or [Qwen3MoeSparseMoeBlock]
    device_type = torch.device(device).type
    for cls in block_classes:
        replace_kernel_forward_from_hub(cls, cls.__name__)  # undecorated in Transformers 5.x
    mapping = {cls.__name__: {device_type: layer_repository(cls.__name__)} for cls in block_classes}
    with use_kernel_mapping(mapping):
        return kernelize(model, mode=mode, device=device_type)


def moe_blocks(model, block_classes=None):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return [m for m in model.modules() if isinstance(m, tuple(block_classes or [Qwen3MoeSparseMoeBlock]))]


def runs_kernel_layer(block, kernel) -> bool:
    """Whether kernelize replaced this block's forward by the package's layer."""
    forward = getattr(block.forward, "__func__", None)
    return forward is getattr(kernel.layers, type(block).__name__).forward


# ---------------------------------------------------------------- checks on model runs


def sample_batch(vocab_size: int, batch: int = 2, seq_len: int = 11, seed: int = 1):
    """input_ids with a padded tail in the second row, attention_mask and labels (-100 on padding)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab_size, (batch, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch > 1:
        attention_mask[1, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


@contextlib.contextmanager
def kernel_activity(kernel, record_ops: bool = True):
    """Record what of `kernel` runs: its ops (the custom ops of its namespace that are
    dispatched, and their implementations called directly by the autograd.Function that
    stands in for them outside torch.compile), and its Triton kernels that are launched
    (compiled or interpreted).

    Yields a dict {"ops": {op name: calls}, "launches": {triton kernel name: launches}}.
    Custom ops are recorded by a TorchDispatchMode, which torch.compile refuses: pass
    record_ops=False around compiled code (launches are still counted).
    """
    import importlib

    import triton
    from torch.utils._python_dispatch import TorchDispatchMode

    namespace = kernel._ops.add_op_namespace_prefix("x").split("::")[0]
    activity = {"ops": {}, "launches": {}}

    def count(kind, name):
        activity[kind][name] = activity[kind].get(name, 0) + 1

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == namespace:
                count("ops", func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    # The eager path calls the ops' implementations (functional._<op name>) by name.
    functional = importlib.import_module(kernel.__name__ + ".functional")
    names = ("experts_fwd", "experts_bwd", "router_topk_fwd", "router_topk_bwd")
    impls = {name: getattr(functional, f"_{name}") for name in names}

    def counted_impl(name, impl):
        def call(*args, **kwargs):
            count("ops", name)
            return impl(*args, **kwargs)

        return call

    launchers = [triton.runtime.jit.JITFunction]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        launchers.append(InterpretedFunction)
    originals = {cls: cls.run for cls in launchers}

    def counting(original):
        def run(self, *args, **kwargs):
            fn = getattr(self, "fn", None)
            if getattr(fn, "__module__", "").startswith(kernel.__name__ + "."):
                count("launches", fn.__name__)
            return original(self, *args, **kwargs)

        return run

    for cls, original in originals.items():
        cls.run = counting(original)
    for name, impl in impls.items():
        setattr(functional, f"_{name}", counted_impl(name, impl))
    try:
        with RecordOps() if record_ops else contextlib.nullcontext():
            yield activity
    finally:
        for cls, original in originals.items():
            cls.run = original
        for name, impl in impls.items():
            setattr(functional, f"_{name}", impl)


def triton_expected(device) -> bool:
    """Whether the package runs its Triton kernels (not its PyTorch path) for tensors on `device`."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
