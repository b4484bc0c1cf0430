"""Conversion of expert LoRA adapters between PEFT's fused layout and the per-expert layout.

Adapters come from PEFT itself: `LoraConfig(target_parameters=[...experts.gate_up_proj,
...experts.down_proj])` on a tiny Qwen3 MoE (Transformers 5.x experts), saved with
`save_pretrained`. Per-expert adapters are checked against a Transformers 4.x-style copy of
the same model (experts as a ModuleList of gate/up/down Linear layers) that PEFT adapts with
`target_modules`: the converted adapter must load there, with the written config, and give
the same outputs; converted back, it must load into the 5.x model with the same outputs.

LoRA factors are small dyadic rationals (k / 64), so the products and sums of the delta
weights are exact in float32 and comparisons of delta weights are bitwise.
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

# PEFT 0.21 checks rank_pattern / alpha_pattern keys against targeted modules only, so keys of
# target_parameters (which it does apply) are reported as unmatched.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

from reference import rel_err  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_model import TINY_CONFIG, load_tiny, sample_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
E = TINY_CONFIG["num_experts"]
H, I = TINY_CONFIG["hidden_size"], TINY_CONFIG["moe_intermediate_size"]
LAYERS = TINY_CONFIG["num_hidden_layers"]
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MODULE = "base_model.model.model.layers.{layer}.mlp.experts"
RTOL = 1e-5  # float32 model outputs


def _fill_lora(model, seed):
    """Every LoRA factor: random k / 64 with |k| <= 8 (exact products and sums in float32)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randint(-8, 9, param.shape, generator=generator).float() / 64)


def _fused_peft(path, seed=0, **config):
    from peft import LoraConfig, get_peft_model

    config = {"r": 4, "lora_alpha": 8, "target_parameters": TARGETS, "target_modules": ["q_proj"], **config}
    model = get_peft_model(load_tiny(path), LoraConfig(**config))
    _fill_lora(model, seed)
    return model.eval()


def _saved(model, directory):
    model.save_pretrained(directory)
    return load_file(Path(directory) / "adapter_model.safetensors")


def _logits(model):
    input_ids, attention_mask, _ = sample_batch(TINY_CONFIG["vocab_size"])
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def _equal_dicts(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


# ----------------------------------------------------------------- a Transformers 4.x-style model


class _LegacyMlp(torch.nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (self._linear(w) for w in (gate, up, down))

    @staticmethod
    def _linear(weight):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        return linear


class _LegacyExperts(torch.nn.ModuleList):
    """Experts as Transformers 4.x holds them (`experts.{e}.gate_proj`, ...), called like 5.x's."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, mlp in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            y = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


def _legacy_model(path):
    model = load_tiny(path)
    for layer in model.model.layers:
        gate_up, down = layer.mlp.experts.gate_up_proj.detach(), layer.mlp.experts.down_proj.detach()
        layer.mlp.experts = _LegacyExperts(_LegacyMlp(gate_up[e, :I], gate_up[e, I:], down[e]) for e in range(E))
    # Under model_type "qwen3_moe", PEFT (with Transformers 5) would convert per-expert adapters to
    # the fused layout while loading them; this model keeps them per expert, as Transformers 4.x did.
    model.config.model_type = "qwen3_moe_per_expert"
    return model.eval()


def _load_adapter(model, directory):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, directory).eval()


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("convert_lora", ROOT / "scripts" / "convert_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------- the functions against PEFT


def test_per_expert_factors_give_peft_delta_weights(kernel, tiny_checkpoint, tmp_path):
    # Different ranks per parameter (rank_pattern) and an attention LoRA that passes through.
    pattern = {"model.layers.1.mlp.experts.down_proj": 2}
    model = _fused_peft(tiny_checkpoint[0], rank_pattern=pattern)
    fused = _saved(model, tmp_path)
    per_expert, ranks = kernel.lora_to_per_expert(fused, E)

    expected_ranks = {}
    for layer in range(LAYERS):
        down_wrapper = model.base_model.model.model.layers[layer].mlp.experts
        gate_up_wrapper = down_wrapper.base_layer
        assert (down_wrapper.parameter_name, gate_up_wrapper.parameter_name) == ("down_proj", "gate_up_proj")
        delta_gate_up = gate_up_wrapper.get_delta_weight("default")  # (E, 2I, H)
        delta_down = down_wrapper.get_delta_weight("default")  # (E, H, I)
        module = MODULE.format(layer=layer)
        for e in range(E):
            for proj, wrapper, expected in (
                ("gate_proj", gate_up_wrapper, delta_gate_up[e, :I]),
                ("up_proj", gate_up_wrapper, delta_gate_up[e, I:]),
                ("down_proj", down_wrapper, delta_down[e]),
            ):
                a = per_expert[f"{module}.{e}.{proj}.lora_A.weight"]
                b = per_expert[f"{module}.{e}.{proj}.lora_B.weight"]
                assert a.shape == (wrapper.r["default"], expected.shape[1])
                assert b.shape == (expected.shape[0], wrapper.r["default"])
                assert torch.equal(wrapper.scaling["default"] * (b @ a), expected), (layer, e, proj)
        for param, wrapper in (("gate_up_proj", gate_up_wrapper), ("down_proj", down_wrapper)):
            expected_ranks[f"model.layers.{layer}.mlp.experts.{param}"] = (wrapper.r["default"],) * 2
    assert ranks == expected_ranks
    assert ranks["model.layers.1.mlp.experts.down_proj"] == (2, 2)

    expert_keys = {k for k in per_expert if ".experts." in k}
    assert len(expert_keys) == LAYERS * E * 3 * 2
    others = {k: v for k, v in fused.items() if ".experts." not in k}
    assert others and all(per_expert[k] is v for k, v in others.items())  # attention LoRA untouched
    # Fresh tensors (safetensors refuses shared storage): gate and up do not share A.
    pointers = [t.untyped_storage().data_ptr() for k, t in per_expert.items() if k in expert_keys]
    assert len(set(pointers)) == len(pointers)

    back, back_ranks = kernel.lora_from_per_expert(per_expert, E)
    assert _equal_dicts(back, fused) and back_ranks == ranks


def test_per_expert_round_trip_is_exact(kernel, tiny_checkpoint, tmp_path):
    per_expert, _ = kernel.lora_to_per_expert(_saved(_fused_peft(tiny_checkpoint[0]), tmp_path), E)
    generator = torch.Generator().manual_seed(5)
    # Layer 0, expert 3 only: up gets its own A, so layer 0 needs rank 2r and layer 1 keeps r.
    key = f"{MODULE.format(layer=0)}.3.up_proj.lora_A.weight"
    per_expert[key] = torch.randint(-8, 9, per_expert[key].shape, generator=generator).float() / 64

    fused, ranks = kernel.lora_from_per_expert(per_expert, E)
    assert ranks["model.layers.0.mlp.experts.gate_up_proj"] == (4, 8)
    assert ranks["model.layers.1.mlp.experts.gate_up_proj"] == (4, 4)
    assert fused[f"{MODULE.format(layer=0)}.base_layer.lora_A.weight"].shape == (E * 8, H)
    assert fused[f"{MODULE.format(layer=0)}.base_layer.lora_B.weight"].shape == (2 * I, E * 8)
    back, back_ranks = kernel.lora_to_per_expert(fused, E)
    assert _equal_dicts(back, per_expert) and back_ranks == ranks

    # Forced block form everywhere, undone again; never splitting is refused here.
    forced, forced_ranks = kernel.lora_from_per_expert(per_expert, E, split_gate_up=True)
    assert {r for name, r in forced_ranks.items() if name.endswith("gate_up_proj")} == {(4, 8)}
    assert _equal_dicts(kernel.lora_to_per_expert(forced, E)[0], per_expert)
    kept, kept_ranks = kernel.lora_to_per_expert(forced, E, split_gate_up=False)
    assert kept[f"{MODULE.format(layer=1)}.0.gate_proj.lora_A.weight"].shape == (8, H)
    assert kept_ranks["model.layers.1.mlp.experts.gate_up_proj"] == (8, 8)
    with pytest.raises(ValueError, match="split_gate_up=False"):
        kernel.lora_from_per_expert(per_expert, E, split_gate_up=False)


def test_fused_round_trip_keeps_delta_weights(kernel, tiny_checkpoint, tmp_path):
    fused = _saved(_fused_peft(tiny_checkpoint[0], use_rslora=True), tmp_path)
    per_expert, ranks = kernel.lora_to_per_expert(fused, E)
    back, back_ranks = kernel.lora_from_per_expert(per_expert, E)
    assert _equal_dicts(back, fused) and back_ranks == ranks  # gate and up share A: no rank growth

    # A fused adapter whose rank grew (forced block form) converts to the same delta weights.
    grown, _ = kernel.lora_from_per_expert(per_expert, E, split_gate_up=True)
    for layer in range(LAYERS):
        for nest in ("base_layer.", ""):
            a = fused[f"{MODULE.format(layer=layer)}.{nest}lora_A.weight"]
            b = fused[f"{MODULE.format(layer=layer)}.{nest}lora_B.weight"]
            a2 = grown[f"{MODULE.format(layer=layer)}.{nest}lora_A.weight"]
            b2 = grown[f"{MODULE.format(layer=layer)}.{nest}lora_B.weight"]
            delta = torch.einsum("ore,eri->eoi", b.view(b.shape[0], -1, E), a.view(E, -1, a.shape[1]))
            delta2 = torch.einsum("ore,eri->eoi", b2.view(b2.shape[0], -1, E), a2.view(E, -1, a2.shape[1]))
            # B' @ A' is B @ A; the scaling stays once alpha follows the rank (the CLI writes that).
            assert torch.equal(delta, delta2)
            assert a2.shape[0] == (2 if nest else 1) * a.shape[0]


def test_single_parameter_adapter(kernel, tiny_checkpoint, tmp_path):
    model = _fused_peft(tiny_checkpoint[0], target_parameters=["mlp.experts.down_proj"], target_modules=[])
    fused = _saved(model, tmp_path)
    assert f"{MODULE.format(layer=0)}.lora_A.weight" in fused
    assert not any("base_layer" in k for k in fused)
    with pytest.raises(ValueError, match="target_parameters"):
        kernel.lora_to_per_expert(fused, E)  # one level: gate_up or down cannot be told by shapes
    per_expert, ranks = kernel.lora_to_per_expert(fused, E, target_parameters=["mlp.experts.down_proj"])
    assert set(ranks) == {f"model.layers.{layer}.mlp.experts.down_proj" for layer in range(LAYERS)}
    delta = model.base_model.model.model.layers[0].mlp.experts.get_delta_weight("default")
    a = per_expert[f"{MODULE.format(layer=0)}.5.down_proj.lora_A.weight"]
    b = per_expert[f"{MODULE.format(layer=0)}.5.down_proj.lora_B.weight"]
    assert torch.equal(2 * (b @ a), delta[5])
    assert not any("gate_proj" in k or "up_proj" in k for k in per_expert)
    assert _equal_dicts(kernel.lora_from_per_expert(per_expert, E)[0], fused)


# ----------------------------------------------------------------- the script, loaded by PEFT


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_convert_script_adapters_load_in_peft(kernel, cli, tiny_checkpoint, tmp_path, rslora):
    path = tiny_checkpoint[0]
    fused_dir, per_expert_dir, split_dir, fused_back_dir, per_expert_back_dir = (
        tmp_path / name for name in ("fused", "per_expert", "split", "fused_back", "per_expert_back")
    )
    model = _fused_peft(path, use_rslora=rslora)
    model.save_pretrained(fused_dir)
    reference = _logits(model)
    base = _logits(load_tiny(path))
    assert rel_err(base, reference) > 1e-3  # the adapter matters

    # fused -> per-expert, loaded into the 4.x-style model by PEFT.
    args = ["--to", "per-expert", str(fused_dir), str(per_expert_dir)]
    if rslora:
        assert cli.main(args) == 0
    else:  # once as a program
        script = str(ROOT / "scripts" / "convert_lora.py")
        run = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    config = json.loads((per_expert_dir / "adapter_config.json").read_text())
    assert config["target_parameters"] is None
    assert config["target_modules"][0] == "q_proj" and "mlp.experts.7.down_proj" in config["target_modules"]
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (4, 8, {}, {})
    assert rel_err(_logits(_load_adapter(_legacy_model(path), per_expert_dir)), reference) <= RTOL
    if not rslora:
        # PEFT's own load-time conversion of Transformers 4.x expert adapters reads it the same way
        # (with use_rslora it scales the fused gate_up wrongly: alpha * 2 instead of alpha * sqrt(2)).
        assert rel_err(_logits(_load_adapter(load_tiny(path), per_expert_dir)), reference) <= RTOL

        # A config as Transformers 4.x adapters have it (bare projection names) converts to fused too.
        legacy_dir, legacy_fused_dir = tmp_path / "legacy", tmp_path / "legacy_fused"
        shutil.copytree(per_expert_dir, legacy_dir)
        legacy_config = {**config, "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"]}
        (legacy_dir / "adapter_config.json").write_text(json.dumps(legacy_config))
        assert cli.main(["--to", "fused", str(legacy_dir), str(legacy_fused_dir)]) == 0
        legacy_fused = json.loads((legacy_fused_dir / "adapter_config.json").read_text())
        assert legacy_fused["target_modules"] == ["q_proj"]
        assert legacy_fused["target_parameters"] == ["gate_up_proj", "down_proj"]
        written = load_file(legacy_fused_dir / "adapter_model.safetensors")
        assert _equal_dicts(written, load_file(fused_dir / "adapter_model.safetensors"))

    # Layer 0's experts get up A different from gate A: fusing needs rank 2r there.
    tensors = load_file(per_expert_dir / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(7)
    for key in tensors:
        if key.startswith(MODULE.format(layer=0)) and key.endswith("up_proj.lora_A.weight"):
            tensors[key] = torch.randint(-8, 9, tensors[key].shape, generator=generator).float() / 64
    split_dir.mkdir()
    save_file(tensors, split_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    (split_dir / "adapter_config.json").write_text(json.dumps(config))
    split_reference = _logits(_load_adapter(_legacy_model(path), split_dir))
    assert rel_err(split_reference, reference) > 1e-4

    assert cli.main(["--to", "fused", str(split_dir), str(fused_back_dir)]) == 0
    config_back = json.loads((fused_back_dir / "adapter_config.json").read_text())
    assert config_back["target_modules"] == ["q_proj"]
    assert sorted(config_back["target_parameters"]) == sorted(TARGETS)
    key = r"model\.layers\.0\.mlp\.experts\.gate_up_proj"
    assert config_back["rank_pattern"] == {key: 8}
    assert config_back["alpha_pattern"] == {key: pytest.approx(8 * 2**0.5) if rslora else 16}
    fused_back = load_file(fused_back_dir / "adapter_model.safetensors")
    assert fused_back[f"{MODULE.format(layer=0)}.base_layer.lora_A.weight"].shape == (E * 8, H)
    assert fused_back[f"{MODULE.format(layer=1)}.base_layer.lora_A.weight"].shape == (E * 4, H)
    loaded = _load_adapter(load_tiny(path), fused_back_dir)
    assert loaded.base_model.model.model.layers[0].mlp.experts.base_layer.r["default"] == 8
    assert rel_err(_logits(loaded), split_reference) <= RTOL

    # And back: the same per-expert tensors and targets, rank r again.
    assert cli.main(["--to", "per-expert", str(fused_back_dir), str(per_expert_back_dir)]) == 0
    assert _equal_dicts(load_file(per_expert_back_dir / "adapter_model.safetensors"), tensors)
    config_again = json.loads((per_expert_back_dir / "adapter_config.json").read_text())
    for name in ("target_modules", "target_parameters", "r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert config_again[name] == config[name], name


def test_convert_script_errors(cli, tiny_checkpoint, tmp_path, capsys):
    fused_dir = tmp_path / "fused"
    _fused_peft(tiny_checkpoint[0]).save_pretrained(fused_dir)
    # 4 experts divide the rows too, but then the rank would be 8, not the config's 4.
    assert cli.main(["--to", "per-expert", str(fused_dir), str(tmp_path / "a"), "--num-experts", "4"]) == 1
    assert "wrong --num-experts" in capsys.readouterr().err
    assert cli.main(["--to", "fused", str(fused_dir), str(tmp_path / "b")]) == 1
    assert "error" in capsys.readouterr().err
    assert cli.main(["--to", "fused", str(tmp_path / "missing"), str(tmp_path / "c")]) == 1
    assert cli.main(["--to", "per-expert", str(fused_dir), str(fused_dir)]) == 1


# ----------------------------------------------------------------- bad inputs


def _fused_dict(rank=2, inter=3, hidden=4, experts=2, gate_up=True, down=True):
    m = "base_model.model.model.layers.0.mlp.experts"
    out = {"base_model.model.lm_head.lora_A.weight": torch.ones(2, hidden)}
    both = gate_up and down
    if gate_up:
        out[f"{m}{'.base_layer' if both else ''}.lora_A.weight"] = torch.randn(experts * rank, hidden)
        out[f"{m}{'.base_layer' if both else ''}.lora_B.weight"] = torch.randn(2 * inter, experts * rank)
    if down:
        out[f"{m}.lora_A.weight"] = torch.randn(experts * rank, inter)
        out[f"{m}.lora_B.weight"] = torch.randn(hidden, experts * rank)
    return out


def _without(d, *parts):
    return {k: v for k, v in d.items() if not any(p in k for p in parts)}


def test_bad_inputs_raise(kernel):
    to, back = kernel.lora_to_per_expert, kernel.lora_from_per_expert
    fused = _fused_dict()
    per_expert, _ = to(fused, 2)
    m = "base_model.model.model.layers.0.mlp.experts"
    gate_up_only = _fused_dict(down=False)
    odd = {**gate_up_only, f"{m}.lora_B.weight": torch.randn(5, 4)}
    bigger_down = {k: torch.randn(5, 2) if k.endswith("down_proj.lora_B.weight") else v for k, v in per_expert.items()}
    rank3_down = {
        f"{m}.1.down_proj.lora_A.weight": torch.randn(3, 3),
        f"{m}.1.down_proj.lora_B.weight": torch.randn(4, 3),
    }
    cases = [  # (function, state_dict, num_experts, keyword arguments, message)
        (to, fused, 0, {}, "num_experts"),
        (to, fused, "2", {}, "num_experts"),
        (back, per_expert, True, {}, "num_experts"),
        (to, fused, 3, {}, "multiple of num_experts"),
        (back, per_expert, 3, {}, "missing [2]"),
        (back, per_expert, 1, {}, "unexpected [1]"),
        (to, per_expert, 2, {}, "per-expert"),
        (back, fused, 2, {}, "fused"),
        (to, _without(fused, f"{m}.lora_B.weight"), 2, {}, "must both be present"),
        (back, _without(per_expert, f"{m}.1.down_proj.lora_A.weight"), 2, {}, "must both be present"),
        (to, {**fused, f"{m}.lora_A.weight": torch.randn(2, 2, 3)}, 2, {}, "2-D"),
        (to, {**fused, f"{m}.lora_B.weight": torch.randn(4, 6)}, 2, {}, "columns"),
        (to, {k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in fused.items()}, 2, {}, "unsupported"),
        (back, {**per_expert, f"{m}.0.gate_proj.lora_B.bias": torch.zeros(3)}, 2, {}, "unsupported"),
        (to, {**fused, f"{m}.lora_A.weight": torch.randn(4, 5)}, 2, {}, "do not fit"),
        (to, fused, 2, {"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters lists"),
        (to, gate_up_only, 2, {}, "target_parameters"),
        (to, odd, 2, {"target_parameters": ["gate_up_proj"]}, "odd"),
        (back, _without(per_expert, ".up_proj."), 2, {}, "together"),
        (back, {**per_expert, **rank3_down}, 2, {}, "one rank"),
        (back, bigger_down, 2, {}, "does not fit"),
        (to, fused, 2, {"split_gate_up": "yes"}, "split_gate_up"),
        (to, fused, 2, {"split_gate_up": True}, "block diagonal"),
    ]
    for function, state_dict, num_experts, kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            function(state_dict, num_experts, **kwargs)
    # The control cases convert.
    _, ranks = to(gate_up_only, 2, target_parameters=["gate_up_proj"])
    assert ranks == {"model.layers.0.mlp.experts.gate_up_proj": (2, 2)}
    assert _equal_dicts(back(per_expert, 2)[0], fused)
