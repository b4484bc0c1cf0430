"""Find and import the qwen3-moe-fused package for the benchmark scripts.

Order tried by `load_kernel()`:

1. `QWEN3_MOE_FUSED_PATH=/some/dir` (a directory holding the package's `__init__.py`):
   imported from there and nothing else is tried.
2. `kernels.get_kernel("org/qwen3-moe-fused", version=1)`, when `LOCAL_KERNELS` names the repo
   (`LOCAL_KERNELS="org/qwen3-moe-fused=/path/to/repo"`), `HF_HUB_OFFLINE` is set (Hub-layout cache),
   or the kernels cache (`KERNELS_CACHE`) holds the repo. Without any of these it would go to the
   network, which the benchmark machines do not have.
3. This repository's `build/torch-<backend>/` (what `make build` writes), imported by path; the
   other backend's directory next (a noarch build is the same Python either way).
4. This repository's source tree `torch-ext/qwen3_moe_fused/`, with a note on stderr.

`kernel_source()` tells which one was used, for the results' metadata.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO_ID = "org/qwen3-moe-fused"
REPO_ROOT = Path(__file__).resolve().parent.parent

_loaded: tuple[ModuleType, str] | None = None


def _note(msg: str) -> None:
    print(f"[_load] {msg}", file=sys.stderr)


def _local_kernels_names_repo() -> bool:
    for entry in os.environ.get("LOCAL_KERNELS", "").split(":"):
        if entry.split("=", 1)[0] == REPO_ID:
            return True
    return False


def _hub_cache_has_repo() -> bool:
    cache = os.environ.get("KERNELS_CACHE")
    if not cache:
        return False
    return (Path(cache) / ("kernels--" + REPO_ID.replace("/", "--"))).is_dir()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _backend_dirs() -> list[str]:
    import torch

    if getattr(torch.version, "hip", None):
        first = "torch-rocm"
    elif torch.version.cuda:
        first = "torch-cuda"
    else:
        first = "torch-cpu"
    return [first] + [d for d in ("torch-cuda", "torch-cpu") if d != first]


def import_package_dir(path: Path, module_name: str = "_qwen3_moe_fused_bench") -> ModuleType:
    """Import the package whose `__init__.py` is in `path`, under `module_name`."""
    init = Path(path) / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"no __init__.py in {path}")
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=[str(path)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot build an import spec for {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec, so the package's relative imports resolve
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_kernel() -> ModuleType:
    """The qwen3-moe-fused package (see the module docstring for where it comes from)."""
    global _loaded
    if _loaded is not None:
        return _loaded[0]

    explicit = os.environ.get("QWEN3_MOE_FUSED_PATH")
    if explicit:
        module = import_package_dir(Path(explicit))
        _loaded = (module, f"QWEN3_MOE_FUSED_PATH={explicit}")
        _note(f"loaded from {explicit}")
        return module

    failures = []
    if _local_kernels_names_repo() or _offline() or _hub_cache_has_repo():
        try:
            from kernels import get_kernel

            module = get_kernel(REPO_ID, version=1, trust_remote_code=[REPO_ID])
            _loaded = (module, f"kernels.get_kernel({REPO_ID!r}, version=1) -> {Path(module.__file__).parent}")
            _note(_loaded[1])
            return module
        except Exception as e:  # fall back to the build directory below
            failures.append(f"kernels.get_kernel: {type(e).__name__}: {e}")
            _note(f"kernels.get_kernel failed ({type(e).__name__}: {e}); trying build/ by path")

    for name in _backend_dirs():
        path = REPO_ROOT / "build" / name
        if (path / "__init__.py").is_file():
            module = import_package_dir(path)
            _loaded = (module, str(path))
            _note(f"loaded by path from {path}")
            return module
        failures.append(f"{path}: not built")

    source = REPO_ROOT / "torch-ext" / "qwen3_moe_fused"
    if (source / "__init__.py").is_file():
        module = import_package_dir(source)
        _loaded = (module, str(source))
        _note(f"no build found; loaded the source tree {source}")
        return module
    failures.append(f"{source}: missing")

    raise ImportError("qwen3-moe-fused not found:\n  " + "\n  ".join(failures))


def kernel_source() -> str | None:
    """Where `load_kernel()` found the package, or None before it has run."""
    return None if _loaded is None else _loaded[1]
