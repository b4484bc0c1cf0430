#!/usr/bin/env python3
"""Convert a Qwen3 MoE LoRA adapter directory between PEFT's fused experts layout and the
per-expert layout, losslessly.

    python scripts/convert_lora.py --to per-expert ADAPTER_DIR OUT_DIR
    python scripts/convert_lora.py --to fused ADAPTER_DIR OUT_DIR

fused:      `LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])`
            on Transformers 5.x (experts as (E, 2I, H) / (E, H, I) tensors).
per-expert: `target_modules` LoRA on `mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj`, as
            Transformers 4.x adapters are, and as vLLM and GGUF converters read them.

Reads adapter_model.safetensors and adapter_config.json from ADAPTER_DIR and writes both to
OUT_DIR (other files of ADAPTER_DIR are copied). The tensors are converted by
`qwen3_moe_fused.lora_convert` (loaded from this checkout); this script updates the config:

- target_parameters / target_modules: the converted parameters leave one and their modules
  join the other, translated entry by entry so that PEFT targets the same experts (a fused
  entry `mlp.experts.gate_up_proj` becomes `mlp.experts.{e}.gate_proj` and `...up_proj` for
  every expert e, and back; `gate_proj` / `up_proj` / `down_proj` entries of 4.x adapters become
  `gate_up_proj` / `down_proj`). Other entries are kept.
- rank_pattern / alpha_pattern: every converted module gets the rank its tensors have and the
  alpha that keeps PEFT's scaling (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora)
  equal to the source's, so the delta weights are unchanged. Where a rank changes (gate and up
  with different A fuse at rank 2r, and back), or where the source's patterns would resolve
  differently for the new names, entries are added in front (PEFT uses the first matching
  key); entries that only matched converted modules are removed.

The experts per layer are taken from --num-experts, else from `num_experts` in the base
model's config.json when `base_model_name_or_path` is a local directory, else from the tensors
(per-expert indices, or the fused rows divided by the config's rank).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_PATH = ROOT / "torch-ext" / "qwen3_moe_fused" / "lora_convert.py"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PROJS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
FUSED_OF = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


class ConversionError(Exception):
    pass


def load_converter():
    """qwen3_moe_fused/lora_convert.py of this checkout (it needs only torch)."""
    spec = importlib.util.spec_from_file_location("qwen3_moe_fused_lora_convert", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------- PEFT's matching rules


def pattern_matches(key: str, name: str) -> bool:
    """Whether a rank_pattern / alpha_pattern key matches a target name (PEFT's get_pattern_key)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def resolve(config: dict, name: str, rank_pattern=None, alpha_pattern=None) -> tuple:
    """(rank, alpha) PEFT gives the module or parameter `name` under `config`."""
    result = []
    for attr, default, patterns in (
        ("rank_pattern", config["r"], rank_pattern),
        ("alpha_pattern", config["lora_alpha"], alpha_pattern),
    ):
        patterns = config.get(attr) or {} if patterns is None else patterns
        key = next((k for k in patterns if pattern_matches(k, name)), None)
        result.append(default if key is None else patterns[key])
    return tuple(result)


def list_entry_matches(entry: str, name: str) -> bool:
    """PEFT's rule for a target_modules list entry (also target_parameters)."""
    return name == entry or name.endswith("." + entry)


def scaled_alpha(alpha, rank_from: int, rank_to: int, rslora: bool):
    """The alpha giving rank `rank_to` the scaling that `alpha` gives rank `rank_from`."""
    if rank_from == rank_to:
        return alpha
    value = alpha * math.sqrt(rank_to / rank_from) if rslora else alpha * rank_to / rank_from
    if abs(value - round(value)) <= 1e-12 * max(1.0, abs(value)):  # sqrt rounding: 8 * sqrt(2) * sqrt(1/2)
        return round(value)
    return value


def other_names(state_dict: dict, converted_keys) -> set:
    """Target names (module paths) of the LoRA keys that are not converted experts keys."""
    names = set()
    for key in state_dict:
        if key in converted_keys or ".lora_" not in key:
            continue
        path = key.split(".lora_")[0].replace(".base_layer", "")
        names.add(path[len("base_model.model.") :] if path.startswith("base_model.model.") else path)
    return names


# ----------------------------------------------------------------- rank_pattern / alpha_pattern


def _override_keys(name: str, level: int) -> str:
    """A pattern key for `name`: 0 its kind in every layer, 1 its experts module, 2 itself."""
    per_expert = re.fullmatch(r"(?P<m>.+)\.\d+\.(?P<p>gate_proj|up_proj|down_proj)", name)
    if per_expert:
        module, leaf = per_expert["m"], rf"\d+\.{per_expert['p']}"
    else:
        module, _, param = name.rpartition(".")
        leaf = re.escape(param)
    if level == 0:
        return rf"experts\.{leaf}"
    if level == 1:
        return rf"{re.escape(module)}\.{leaf}"
    return re.escape(name)


def fix_patterns(config: dict, desired: dict, old_converted: set, others: set) -> dict:
    """rank_pattern and alpha_pattern giving each name of `desired` its (rank, alpha) while the
    names in `others` resolve as before."""
    new_names = set(desired) | others
    result = {}
    for index, attr in enumerate(("rank_pattern", "alpha_pattern")):
        patterns = dict(config.get(attr) or {})
        # Entries that only matched converted names would match nothing now (PEFT warns).
        patterns = {
            k: v
            for k, v in patterns.items()
            if any(pattern_matches(k, n) for n in new_names) or not any(pattern_matches(k, n) for n in old_converted)
        }
        default = config["r"] if index == 0 else config["lora_alpha"]

        def current(name, patterns=patterns, default=default):
            key = next((k for k in patterns if pattern_matches(k, name)), None)
            return default if key is None else patterns[key]

        need = {n: v[index] for n, v in desired.items() if current(n) != v[index]}
        overrides: dict = {}
        covered: set = set()
        for name in sorted(need):
            if name in covered:
                continue
            value = need[name]
            for level in (0, 1, 2):
                key = _override_keys(name, level)
                matched = {n for n in new_names if pattern_matches(key, n)}
                # Safe when it matches only converted names that want this value.
                if all(n in desired and desired[n][index] == value for n in matched):
                    overrides[key] = value
                    covered |= matched
                    break
        result[attr] = {**overrides, **{k: v for k, v in patterns.items() if k not in overrides}}
    for name, want in desired.items():
        got = resolve(config, name, result["rank_pattern"], result["alpha_pattern"])
        if got != tuple(want):
            raise ConversionError(f"internal: {name} resolves to (r, alpha) {got}, expected {want}")
    for name in others:
        if resolve(config, name, result["rank_pattern"], result["alpha_pattern"]) != resolve(config, name):
            raise ConversionError(f"internal: the rank / alpha of {name} would change")
    return result


# ----------------------------------------------------------------- the two directions


def _unique(items):
    return list(dict.fromkeys(items))


def _check_lora(config: dict):
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise ConversionError(f"{key}=true is not supported on experts")


def to_per_expert(lc, state_dict: dict, config: dict, num_experts: int, split) -> tuple[dict, dict]:
    _check_lora(config)
    target_parameters = list(config.get("target_parameters") or [])
    new_sd, ranks = lc.lora_to_per_expert(
        state_dict, num_experts, target_parameters=target_parameters or None, split_gate_up=split
    )
    if not ranks:
        raise ConversionError("no fused experts LoRA (mlp.experts.[base_layer.]lora_A/B) in this adapter")
    rslora = bool(config.get("use_rslora"))
    desired = {}
    for param_name, (rank_per_expert, rank_fused) in ranks.items():
        rank, alpha = resolve(config, param_name)
        if rank != rank_fused:
            raise ConversionError(
                f"{param_name}: {CONFIG} gives rank {rank}, the tensors rank {rank_fused} with "
                f"num_experts={num_experts} (wrong --num-experts?)"
            )
        module, _, param = param_name.rpartition(".")
        new_alpha = scaled_alpha(alpha, rank_fused, rank_per_expert, rslora)
        for e in range(num_experts):
            for proj in PROJS[param]:
                desired[f"{module}.{e}.{proj}"] = (rank_per_expert, new_alpha)

    new = dict(config)
    # target_parameters entries that matched converted parameters become target_modules entries.
    sources = [t for t in target_parameters if any(list_entry_matches(t, p) for p in ranks)]
    sources += [p for p in ranks if not any(list_entry_matches(t, p) for t in sources)]
    kept = [t for t in target_parameters if t not in sources]
    new["target_parameters"] = kept or None
    per_expert_entries, regexes = [], []
    for source in sources:
        stem, _, param = source.rpartition(".")
        for proj in PROJS[param]:
            per_expert_entries += [f"{stem}.{e}.{proj}" if stem else f"{e}.{proj}" for e in range(num_experts)]
        stem_re = rf"{re.escape(stem)}\." if stem else ""
        regexes.append(rf"(?:.*\.)?{stem_re}\d+\.(?:{'|'.join(PROJS[param])})")
    target_modules = config.get("target_modules")
    if config.get("layers_to_transform") is not None or config.get("layers_pattern"):
        raise ConversionError(
            "layers_to_transform / layers_pattern apply to target_modules but not to target_parameters: "
            "the per-expert adapter would target fewer experts; remove them from the config first"
        )
    if target_modules == "all-linear":
        raise ConversionError("target_modules='all-linear' is not supported: list the modules")
    if isinstance(target_modules, str):
        new["target_modules"] = "|".join([f"(?:{target_modules})", *regexes])
    else:
        new["target_modules"] = _unique([*(target_modules or []), *per_expert_entries])

    converted_keys = set(state_dict) - set(new_sd)
    others = other_names(state_dict, converted_keys)
    new.update(fix_patterns(config, desired, set(ranks), others))
    return new_sd, new


def to_fused(lc, state_dict: dict, config: dict, num_experts: int, split) -> tuple[dict, dict]:
    _check_lora(config)
    new_sd, ranks = lc.lora_from_per_expert(state_dict, num_experts, split_gate_up=split)
    if not ranks:
        raise ConversionError("no per-expert LoRA (mlp.experts.{e}.gate_proj/up_proj/down_proj) in this adapter")
    rslora = bool(config.get("use_rslora"))
    desired, old_converted = {}, set()
    for param_name, (rank_per_expert, rank_fused) in ranks.items():
        module, _, param = param_name.rpartition(".")
        names = [f"{module}.{e}.{proj}" for e in range(num_experts) for proj in PROJS[param]]
        old_converted.update(names)
        values = {resolve(config, n) for n in names}
        if len(values) != 1:
            raise ConversionError(
                f"{param_name}: its per-expert modules have different (rank, alpha) in {CONFIG}: {sorted(values)}"
            )
        ((rank, alpha),) = values
        if rank != rank_per_expert:
            raise ConversionError(f"{param_name}: {CONFIG} gives rank {rank}, the tensors rank {rank_per_expert}")
        desired[param_name] = (rank_fused, scaled_alpha(alpha, rank_per_expert, rank_fused, rslora))

    converted_keys = set(state_dict) - set(new_sd)
    others = other_names(state_dict, converted_keys)
    new = dict(config)
    target_modules = config.get("target_modules")
    exact = config.get("layers_to_transform") is not None or bool(config.get("layers_pattern"))
    translated = []
    if target_modules == "all-linear":
        raise ConversionError("target_modules='all-linear' is not supported: list the modules")
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, n) for n in others):
            new["target_modules"] = []
        exact = True
    else:
        kept = []
        for entry in target_modules or []:
            hits = [n for n in old_converted if list_entry_matches(entry, n)]
            if not hits or any(list_entry_matches(entry, n) for n in others):
                kept.append(entry)
            if not hits:
                continue
            per_expert = re.fullmatch(r"(?:(?P<stem>.+)\.)?\d+\.(?P<p>gate_proj|up_proj|down_proj)", entry)
            if per_expert:
                stem, param = per_expert["stem"], FUSED_OF[per_expert["p"]]
                translated.append(f"{stem}.{param}" if stem else param)
            elif entry in FUSED_OF:
                translated.append(FUSED_OF[entry])
            else:
                exact = True
        new["target_modules"] = kept
    if exact:  # entries that cannot be translated, or a layer restriction: name every parameter
        translated = list(ranks)
    translated += [p for p in ranks if not any(list_entry_matches(t, p) for t in translated)]
    new["target_parameters"] = _unique([*(config.get("target_parameters") or []), *translated])
    new.update(fix_patterns(config, desired, old_converted, others))
    return new_sd, new


# ----------------------------------------------------------------- files


def infer_num_experts(state_dict: dict, config: dict, direction: str) -> int:
    base = config.get("base_model_name_or_path")
    if base and (Path(base) / "config.json").is_file():
        value = json.loads((Path(base) / "config.json").read_text()).get("num_experts")
        if value:
            return int(value)
    if direction == "fused":
        indices = [int(m[1]) for k in state_dict if (m := re.search(r"(?:^|\.)experts\.(\d+)\.", k))]
        if indices:
            return max(indices) + 1
        raise ConversionError("no per-expert LoRA keys in this adapter")
    # Fused: E * r rows per lora_A, r as the config resolves it for gate_up_proj or down_proj.
    candidates = None
    for key, tensor in state_dict.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.*experts)(?:\.base_layer)*\.lora_A\.weight", key)
        if match is None:
            continue
        ranks = {resolve(config, f"{match[1]}.{param}")[0] for param in PROJS}
        here = {tensor.shape[0] // r for r in ranks if r > 0 and tensor.shape[0] % r == 0}
        candidates = here if candidates is None else candidates & here
    if not candidates or len(candidates) != 1:
        raise ConversionError("cannot infer the experts per layer from the tensors: pass --num-experts")
    return candidates.pop()


def convert_dir(src: Path, dst: Path, to: str, num_experts: int | None = None, split=None) -> dict:
    """Convert the adapter in `src` into `dst`; returns the new adapter config."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    if not (src / WEIGHTS).is_file() or not (src / CONFIG).is_file():
        raise ConversionError(f"{src} must hold {WEIGHTS} and {CONFIG}")
    if dst.resolve() == src.resolve():
        raise ConversionError("the output directory must differ from the input directory")
    config = json.loads((src / CONFIG).read_text())
    state_dict = load_file(src / WEIGHTS)
    if num_experts is None:
        num_experts = infer_num_experts(state_dict, config, to)
    lc = load_converter()
    convert = to_per_expert if to == "per-expert" else to_fused
    try:
        new_sd, new_config = convert(lc, state_dict, config, num_experts, split)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.name not in (WEIGHTS, CONFIG, "adapter_model.bin"):
            shutil.copy2(path, dst / path.name)
    save_file(new_sd, dst / WEIGHTS, metadata={"format": "pt"})
    # Not sorted: PEFT takes the first rank_pattern / alpha_pattern key that matches.
    (dst / CONFIG).write_text(json.dumps(new_config, indent=2) + "\n")
    return new_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", required=True, choices=["per-expert", "fused"], help="the layout to write")
    parser.add_argument("input", type=Path, help=f"adapter directory ({WEIGHTS}, {CONFIG})")
    parser.add_argument("output", type=Path, help="directory to write the converted adapter to")
    parser.add_argument("--num-experts", type=int, help="experts per layer (inferred when left out)")
    parser.add_argument(
        "--split-gate-up",
        choices=["auto", "always", "never"],
        default="auto",
        help="--to fused: gate_up at rank 2r in block form where gate and up A differ (auto), in every layer "
        "(always), or never (fails where needed). --to per-expert: undo that form where detected (auto), "
        "require it (always), or keep the fused rank (never).",
    )
    args = parser.parse_args(argv)
    split = {"auto": None, "always": True, "never": False}[args.split_gate_up]
    try:
        config = convert_dir(args.input, args.output, args.to, args.num_experts, split)
    except ConversionError as error:
        print(f"convert_lora.py: error: {error}", file=sys.stderr)
        return 1
    patterns = {k: config.get(k) for k in ("rank_pattern", "alpha_pattern") if config.get(k)}
    print(f"wrote {args.output} ({args.to})" + (f", {json.dumps(patterns)}" if patterns else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
