"""Lossless conversion of Qwen3 MoE expert LoRA adapters between two layouts.

Fused layout: what PEFT saves for `LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])` on a Transformers 5.x model, whose experts hold
`gate_up_proj` (E, 2I, H) (each expert's gate rows first) and `down_proj` (E, H, I).
PEFT wraps the experts module once per targeted parameter; with both targeted the
`down_proj` wrapper is the outer one (PEFT nests in the order the module registers its
parameters), so the adapter file holds, per layer:

    <m>.base_layer.lora_A.weight  (E*r, H)    gate_up_proj
    <m>.base_layer.lora_B.weight  (2I, E*r)   gate_up_proj
    <m>.lora_A.weight             (E*r, I)    down_proj
    <m>.lora_B.weight             (H, E*r)    down_proj

with `<m>` = `base_model.model.model.layers.{l}.mlp.experts`; with one targeted parameter
there is no `base_layer` level. For a (E, out, in) parameter, `lora_A.weight` is (E*r, in)
with the expert index slowest and `lora_B.weight` is (out, E*r) with the expert index
fastest:

    A_e = lora_A.view(E, r, in)[e]          (r, in)
    B_e = lora_B.view(out, r, E)[:, :, e]   (out, r)
    delta_e = scaling * B_e @ A_e           (out, in)

Per-expert layout: what PEFT saves for `target_modules` on a Transformers 4.x model whose
experts are a ModuleList of MLPs (and what vLLM and GGUF converters read):

    <m>.{e}.gate_proj.lora_A.weight  (r, H)    <m>.{e}.gate_proj.lora_B.weight  (I, r)
    <m>.{e}.up_proj.lora_A.weight    (r, H)    <m>.{e}.up_proj.lora_B.weight    (I, r)
    <m>.{e}.down_proj.lora_A.weight  (r, I)    <m>.{e}.down_proj.lora_B.weight  (H, r)

The fused gate_up adapter shares one A_e between gate and up. Per-expert adapters whose gate
and up have different A are fused at rank 2r in block form:

    A'_e = [A_gate; A_up]                   (2r, H)
    B'_e = [[B_gate, 0], [0, B_up]]         (2I, 2r)

All experts of a layer share one rank, so a layer is fused at 2r when any of its experts needs
it. PEFT's scaling depends on the rank (lora_alpha / r, or lora_alpha / sqrt(r) with
use_rslora): a module whose rank changes needs its alpha changed by the caller so that the
scaling, hence the delta weights, stay the same (both functions report the ranks).

Keys that are not LoRA factors of an experts module are copied unchanged. Only tensors
are moved: values are never recomputed, so conversions are exact in any dtype.
"""

import re
from collections.abc import Iterable, Mapping

import torch

__all__ = ["lora_to_per_expert", "lora_from_per_expert"]

GATE_UP = "gate_up_proj"
DOWN = "down_proj"
PER_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
# Prefix PEFT puts before the model's own module names in adapter files.
PEFT_PREFIX = "base_model.model."

_FUSED_KEY = re.compile(r"^(?P<module>(?:.*\.)?experts)(?P<nest>(?:\.base_layer)*)\.lora_(?P<factor>[AB])\.weight$")
_PER_EXPERT_KEY = re.compile(
    r"^(?P<module>(?:.*\.)?experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
    r"\.lora_(?P<factor>[AB])\.weight$"
)
# Any LoRA tensor on a fused experts module, or on a module inside an expert.
_ANY_FUSED = re.compile(r"(?:^|\.)experts(?:\.base_layer)*\.lora_")
_ANY_PER_EXPERT = re.compile(r"(?:^|\.)experts\.\d+\.(?:.*\.)?lora_")


def _model_name(module: str) -> str:
    """A module's name in the model (PEFT's matching key): the key's path without PEFT's prefix."""
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def _check_num_experts(num_experts) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    return num_experts


def _check_split(split_gate_up):
    if split_gate_up not in (None, True, False):
        raise ValueError(f"split_gate_up must be None, True or False, got {split_gate_up!r}")


def _targeted(name: str, target_parameters: Iterable[str]) -> bool:
    """PEFT's `target_parameters` rule: the full name or a dotted suffix of it is listed."""
    return any(name == t or name.endswith("." + t) for t in target_parameters)


def _matrix(key: str, tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{key}: expected a 2-D LoRA factor, got {shape}")
    return tensor


# ------------------------------------------------------------------------- fused -> per expert


def _split_fused(factors: dict, num_experts: int) -> dict:
    """{"in", "out", "rank", "A": (E, r, in) view, "B": (E, out, r) view} of one fused level."""
    key_a, key_b = factors.get("A"), factors.get("B")
    if key_a is None or key_b is None:
        have = key_a or key_b
        raise ValueError(f"{have}: lora_A and lora_B must both be present")
    a, b = factors["tensors"]["A"], factors["tensors"]["B"]
    rows, in_features = a.shape
    out_features, cols = b.shape
    if rows % num_experts:
        raise ValueError(
            f"{key_a}: {rows} rows are not a multiple of num_experts={num_experts} (wrong num_experts?)"
        )
    if cols != rows:
        raise ValueError(f"{key_b}: {cols} columns, expected {rows} (the rows of {key_a})")
    rank = rows // num_experts
    return {
        "in": in_features,
        "out": out_features,
        "rank": rank,
        "A": a.reshape(num_experts, rank, in_features),
        "B": b.reshape(out_features, rank, num_experts).permute(2, 0, 1),
        "keys": (key_a, key_b),
    }


def _identify_levels(module: str, levels: dict, target_parameters) -> dict:
    """{"gate_up_proj": level, "down_proj": level} for the nesting levels of one experts module."""
    name = _model_name(module)
    if sorted(levels) not in ([0], [0, 1]):
        raise ValueError(
            f"{module}: unexpected LoRA nesting (base_layer depths {sorted(levels)}); expected one level per "
            f"targeted parameter ({GATE_UP}, {DOWN})"
        )
    if target_parameters is not None:
        listed = [p for p in (GATE_UP, DOWN) if _targeted(f"{name}.{p}", target_parameters)]
    else:
        listed = [GATE_UP, DOWN]
    if len(levels) == 2:
        if len(listed) != 2:
            raise ValueError(
                f"{module}: the adapter has two LoRA levels but target_parameters lists {listed or 'none'} of "
                f"{GATE_UP}, {DOWN} for it"
            )
        x, y = levels[0], levels[1]

        def fits(gate_up, down):  # gate_up (2I, H) and down (H, I) of the same experts
            return gate_up["in"] == down["out"] and gate_up["out"] == 2 * down["in"]

        if fits(y, x):
            found = {GATE_UP: y, DOWN: x}
        elif fits(x, y):
            found = {GATE_UP: x, DOWN: y}
        else:
            raise ValueError(
                f"{module}: LoRA shapes do not fit gate_up_proj (E, 2I, H) and down_proj (E, H, I): "
                f"levels (out, in) = {(x['out'], x['in'])} and {(y['out'], y['in'])}"
            )
    else:
        if len(listed) != 1:
            raise ValueError(
                f"{module}: one LoRA level, so one of {GATE_UP} / {DOWN} is adapted; pass the adapter's "
                f"target_parameters to tell which (it lists {listed or 'none'} for this module)"
            )
        found = {listed[0]: levels[0]}
    gate_up = found.get(GATE_UP)
    if gate_up is not None and gate_up["out"] % 2:
        raise ValueError(f"{gate_up['keys'][1]}: gate_up_proj has an odd number of rows ({gate_up['out']})")
    return found


def _gate_up_block_form(level: dict) -> bool:
    """Whether every expert's gate_up B is [[B_gate, 0], [0, B_up]] over rank halves (zeros exactly)."""
    rank, inter = level["rank"], level["out"] // 2
    if rank % 2:
        return False
    b, half = level["B"], rank // 2  # (E, 2I, r)
    return not b[:, :inter, half:].any() and not b[:, inter:, :half].any()


def lora_to_per_expert(
    state_dict: Mapping[str, torch.Tensor],
    num_experts: int,
    *,
    target_parameters: Iterable[str] | None = None,
    split_gate_up: bool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Convert a PEFT `target_parameters` adapter of Qwen3 MoE experts to the per-expert layout.

    Args:
        state_dict: the adapter's tensors as PEFT saves them (adapter_model.safetensors, or
            `get_peft_model_state_dict`): keys `<m>[.base_layer].lora_A.weight` (E*r, in) and
            `<m>[.base_layer].lora_B.weight` (out, E*r) for every experts module `<m>`, next to any
            other keys (attention LoRA, modules_to_save, ...), which are copied unchanged.
        num_experts: E, the experts per layer. Shapes cannot tell it (E*r rows divide many ways):
            a wrong value that divides the rows goes unnoticed here; check the returned fused
            ranks against the adapter config's rank (scripts/convert_lora.py does).
        target_parameters: the adapter config's `target_parameters`. Needed only for experts
            modules with a single LoRA level, where shapes cannot tell gate_up_proj from
            down_proj; with None both are assumed adapted (two levels everywhere), and the two
            levels are then told apart by their shapes.
        split_gate_up: whether gate_up factors are in the block form that `lora_from_per_expert`
            writes for gate and up with different A (rank 2r, B block diagonal). None: detect it
            per layer (off-diagonal blocks exactly zero and B not all zero) and undo it, giving
            rank r per expert; True: undo it, ValueError where B is not in that form; False:
            never, each expert gets the fused rank.

    Returns:
        (per_expert_state_dict, ranks). `per_expert_state_dict` has, per experts module `<m>` and
        expert e, `<m>.{e}.gate_proj` / `up_proj` (from gate_up_proj) and `<m>.{e}.down_proj`
        (from down_proj) `.lora_A.weight` (r, in) and `.lora_B.weight` (out, r): gate_proj's B is
        rows [0, I) of the expert's gate_up B, up_proj's rows [I, 2I), and gate and up share A
        (fresh copies: no two output tensors share memory). `ranks` maps each converted fused
        parameter, by its name in the model (the name PEFT matches `rank_pattern` against, e.g.
        "model.layers.0.mlp.experts.gate_up_proj"), to (per-expert rank, fused rank); they differ
        only where the block form was undone (r, 2r).

    What the caller must set in the adapter config: the per-expert modules as target_modules
    (and the converted parameters out of target_parameters); each per-expert module needs the
    scaling its fused parameter had, i.e. the same lora_alpha / use_rslora where the rank is
    unchanged, and where it was halved alpha / 2 (alpha / sqrt(2) with use_rslora) through
    rank_pattern / alpha_pattern.

    Raises:
        ValueError: num_experts not a positive int or not dividing the rows; factors that are not
            2-D, lack their partner, or have shapes that do not fit gate_up_proj / down_proj;
            ambiguous single levels; per-expert keys already present; other LoRA keys on experts
            modules (adapter names, biases, DoRA vectors).
    """
    num_experts = _check_num_experts(num_experts)
    _check_split(split_gate_up)
    if target_parameters is not None:
        target_parameters = [target_parameters] if isinstance(target_parameters, str) else list(target_parameters)

    modules: dict[str, dict[int, dict]] = {}
    for key, tensor in state_dict.items():
        match = _FUSED_KEY.match(key)
        if match is None:
            if _ANY_PER_EXPERT.search(key):
                raise ValueError(f"{key}: already a per-expert LoRA key (this adapter is not in the fused layout)")
            if _ANY_FUSED.search(key):
                raise ValueError(f"{key}: unsupported LoRA key on an experts module")
            continue
        depth = match["nest"].count(".base_layer")
        level = modules.setdefault(match["module"], {}).setdefault(depth, {"tensors": {}})
        level[match["factor"]] = key
        level["tensors"][match["factor"]] = _matrix(key, tensor)

    converted: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, tuple[int, int]] = {}
    for module, raw_levels in modules.items():
        levels = {depth: _split_fused(factors, num_experts) for depth, factors in raw_levels.items()}
        found = _identify_levels(module, levels, target_parameters)
        name = _model_name(module)
        out: dict[str, torch.Tensor] = {}
        gate_up, down = found.get(GATE_UP), found.get(DOWN)
        if gate_up is not None:
            inter, rank = gate_up["out"] // 2, gate_up["rank"]
            block_form = _gate_up_block_form(gate_up)
            if split_gate_up is None:  # an all-zero B (an untrained adapter) keeps its rank
                split = block_form and bool(gate_up["B"].any())
            elif split_gate_up and not block_form:
                raise ValueError(
                    f"{gate_up['keys'][1]}: split_gate_up=True but B is not block diagonal over rank halves"
                )
            else:
                split = split_gate_up
            per_rank = rank // 2 if split else rank
            ranks[f"{name}.{GATE_UP}"] = (per_rank, rank)
        for e in range(num_experts):
            if gate_up is not None:
                a, b = gate_up["A"][e], gate_up["B"][e]  # (r, H), (2I, r)
                if split:
                    gate = (a[:per_rank], b[:inter, :per_rank])
                    up = (a[per_rank:], b[inter:, per_rank:])
                else:
                    gate, up = (a, b[:inter]), (a, b[inter:])
                for proj, (fa, fb) in (("gate_proj", gate), ("up_proj", up)):
                    out[f"{module}.{e}.{proj}.lora_A.weight"] = fa.clone(memory_format=torch.contiguous_format)
                    out[f"{module}.{e}.{proj}.lora_B.weight"] = fb.clone(memory_format=torch.contiguous_format)
            if down is not None:
                a, b = down["A"][e], down["B"][e]  # (r, I), (H, r)
                out[f"{module}.{e}.down_proj.lora_A.weight"] = a.clone(memory_format=torch.contiguous_format)
                out[f"{module}.{e}.down_proj.lora_B.weight"] = b.clone(memory_format=torch.contiguous_format)
        if down is not None:
            ranks[f"{name}.{DOWN}"] = (down["rank"], down["rank"])
        converted[module] = out

    result: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _FUSED_KEY.match(key)
        if match is None:
            result[key] = tensor
        elif match["module"] in converted:
            result.update(converted.pop(match["module"]))  # at the module's first key, keeping the order
    return result, ranks


# ------------------------------------------------------------------------- per expert -> fused


def _gather_experts(module: str, proj: str, experts: dict, num_experts: int) -> tuple[list, list]:
    """([A_e], [B_e]) of one projection of one experts module, for e in [0, E), checked."""
    found = sorted(experts)
    if found != list(range(num_experts)):
        missing = sorted(set(range(num_experts)) - set(found))
        extra = sorted(set(found) - set(range(num_experts)))
        raise ValueError(
            f"{module}.*.{proj}: expected experts 0..{num_experts - 1} (num_experts={num_experts}); "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
            f"{'...' if len(extra) > 8 else ''}"
        )
    a_list, b_list = [], []
    shape = None
    for e in range(num_experts):
        factors = experts[e]
        if "A" not in factors or "B" not in factors:
            raise ValueError(f"{module}.{e}.{proj}: lora_A and lora_B must both be present")
        (key_a, a), (key_b, b) = factors["A"], factors["B"]
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"{key_b}: {b.shape[1]} columns, expected {a.shape[0]} (the rows of {key_a})")
        this = (a.shape[0], a.shape[1], b.shape[0])
        if shape is None:
            shape = this
        elif this != shape:
            raise ValueError(
                f"{module}.{e}.{proj}: (rank, in, out) = {this}, but expert 0 has {shape}; the experts of a "
                "layer must share one rank and shape"
            )
        a_list.append(a)
        b_list.append(b)
    return a_list, b_list


def _fuse_b(b_list: list) -> torch.Tensor:
    """[(out, r)] * E -> (out, E*r) with the expert index fastest."""
    stacked = torch.stack(b_list, dim=-1)  # (out, r, E)
    return stacked.reshape(stacked.shape[0], -1)


def lora_from_per_expert(
    state_dict: Mapping[str, torch.Tensor],
    num_experts: int,
    *,
    split_gate_up: bool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Convert a per-expert LoRA adapter of Qwen3 MoE experts to PEFT's `target_parameters` layout.

    Args:
        state_dict: adapter tensors with keys `<m>.{e}.{gate_proj,up_proj,down_proj}.lora_A.weight`
            (r, in) and `.lora_B.weight` (out, r) for experts e = 0..E-1 of every experts module
            `<m>` (as PEFT saves `target_modules` LoRA of a Transformers 4.x Qwen3 MoE), next to
            any other keys, which are copied unchanged. gate_proj and up_proj must be adapted
            together (or not at all); every adapted projection of a layer needs all E experts with
            one rank, and gate and up the same rank.
        num_experts: E, the experts per layer.
        split_gate_up: None: per layer, fuse gate and up at the per-expert rank r when every
            expert's gate and up have equal A (the A is shared), else at 2r in block form
            A' = [A_gate; A_up], B' = [[B_gate, 0], [0, B_up]]; True: always the block form;
            False: never, ValueError where gate and up A differ.

    Returns:
        (fused_state_dict, ranks). `fused_state_dict` holds, per experts module `<m>`, the
        gate_up_proj factors lora_A (E*r', H), lora_B (2I, E*r') and the down_proj factors
        lora_A (E*r, I), lora_B (H, E*r), keyed as PEFT nests them: with both present, down_proj
        at `<m>.lora_*.weight` and gate_up_proj at `<m>.base_layer.lora_*.weight`; with one,
        at `<m>.lora_*.weight`. `ranks` maps each fused parameter, by its name in the model (the
        name PEFT matches `target_parameters` and `rank_pattern` against, e.g.
        "model.layers.0.mlp.experts.gate_up_proj"), to (per-expert rank, fused rank); the fused
        rank is twice the per-expert rank for gate_up_proj in block form.

    What the caller must set in the adapter config: these parameters as target_parameters (and
    the per-expert modules out of target_modules), and for a parameter whose rank r' = 2r, a
    rank_pattern entry r' with an alpha_pattern entry 2 * alpha (alpha * sqrt(2) with
    use_rslora), alpha being the per-expert modules' lora_alpha, so that the scaling and the
    delta weights stay the same.

    Raises:
        ValueError: num_experts not a positive int; experts missing or beyond num_experts;
            factors that are not 2-D, lack their partner, or whose ranks or shapes differ between
            experts or do not fit gate/up/down of one layer; gate without up or up without gate;
            fused keys already present; other LoRA keys inside experts (adapter names, biases,
            DoRA vectors); split_gate_up=False where gate and up A differ.
    """
    num_experts = _check_num_experts(num_experts)
    _check_split(split_gate_up)

    modules: dict[str, dict[str, dict[int, dict]]] = {}
    for key, tensor in state_dict.items():
        match = _PER_EXPERT_KEY.match(key)
        if match is None:
            if _FUSED_KEY.match(key) or _ANY_FUSED.search(key):
                raise ValueError(f"{key}: a fused experts LoRA key (this adapter is not in the per-expert layout)")
            if _ANY_PER_EXPERT.search(key):
                raise ValueError(f"{key}: unsupported LoRA key inside an expert")
            continue
        expert = modules.setdefault(match["module"], {}).setdefault(match["proj"], {})
        expert.setdefault(int(match["expert"]), {})[match["factor"]] = (key, _matrix(key, tensor))

    converted: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, tuple[int, int]] = {}
    for module, projs in modules.items():
        name = _model_name(module)
        if ("gate_proj" in projs) != ("up_proj" in projs):
            have = "gate_proj" if "gate_proj" in projs else "up_proj"
            raise ValueError(f"{module}.*.{have}: gate_proj and up_proj must be adapted together")
        fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hidden = inter = None
        if "gate_proj" in projs:
            a_gate, b_gate = _gather_experts(module, "gate_proj", projs["gate_proj"], num_experts)
            a_up, b_up = _gather_experts(module, "up_proj", projs["up_proj"], num_experts)
            if a_gate[0].shape != a_up[0].shape or b_gate[0].shape != b_up[0].shape:
                raise ValueError(
                    f"{module}: gate_proj A {tuple(a_gate[0].shape)} / B {tuple(b_gate[0].shape)} and up_proj "
                    f"A {tuple(a_up[0].shape)} / B {tuple(b_up[0].shape)} must have the same shapes"
                )
            rank, hidden = a_gate[0].shape
            inter = b_gate[0].shape[0]
            shared = all(torch.equal(g, u) for g, u in zip(a_gate, a_up))
            split = (not shared) if split_gate_up is None else split_gate_up
            if not split and not shared:
                raise ValueError(f"{module}: gate_proj and up_proj have different A and split_gate_up=False")
            if split:
                a_fused = torch.cat([torch.cat([g, u]) for g, u in zip(a_gate, a_up)])  # (E*2r, H)
                b_blocks = []
                for g, u in zip(b_gate, b_up):
                    block = g.new_zeros(2 * inter, 2 * rank)
                    block[:inter, :rank] = g
                    block[inter:, rank:] = u
                    b_blocks.append(block)
                b_fused = _fuse_b(b_blocks)  # (2I, E*2r)
            else:
                a_fused = torch.cat(a_gate)  # (E*r, H)
                b_fused = _fuse_b([torch.cat([g, u]) for g, u in zip(b_gate, b_up)])  # (2I, E*r)
            fused[GATE_UP] = (a_fused, b_fused)
            ranks[f"{name}.{GATE_UP}"] = (rank, 2 * rank if split else rank)
        if "down_proj" in projs:
            a_down, b_down = _gather_experts(module, "down_proj", projs["down_proj"], num_experts)
            rank_down, down_in = a_down[0].shape
            down_out = b_down[0].shape[0]
            if hidden is not None and (down_in, down_out) != (inter, hidden):
                raise ValueError(
                    f"{module}: down_proj (out, in) = {(down_out, down_in)} does not fit gate_proj / up_proj "
                    f"(out, in) = {(inter, hidden)}; expected {(hidden, inter)}"
                )
            fused[DOWN] = (torch.cat(a_down), _fuse_b(b_down))
            ranks[f"{name}.{DOWN}"] = (rank_down, rank_down)
        out: dict[str, torch.Tensor] = {}
        # PEFT nests in the order Qwen3MoeExperts registers its parameters: gate_up_proj innermost.
        nest = {GATE_UP: ".base_layer", DOWN: ""} if len(fused) == 2 else dict.fromkeys(fused, "")
        for param in (GATE_UP, DOWN):  # the order PEFT saves them in
            if param in fused:
                a, b = fused[param]
                out[f"{module}{nest[param]}.lora_A.weight"] = a
                out[f"{module}{nest[param]}.lora_B.weight"] = b
        converted[module] = out

    result: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _PER_EXPERT_KEY.match(key)
        if match is None:
            result[key] = tensor
        elif match["module"] in converted:
            result.update(converted.pop(match["module"]))
    return result, ranks
