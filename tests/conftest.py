"""Markers and the `kernel` fixture: the package loaded the way users load it.

`make test` sets HF_HUB_OFFLINE=1 and HF_HUB_CACHE=build/hub-cache (written by
`make publish-local`), so `get_kernel("org/qwen3-moe-fused", version=1)` resolves the
local build as if it came from the Hub. Without that, LOCAL_KERNELS points kernels at
this checkout's build/ (built here when missing). Set TRITON_INTERPRET=1 to run the
Triton kernels on CPU tensors.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import REPO_ID, published_cache

ROOT = Path(__file__).resolve().parents[1]

# Before kernels / huggingface_hub are imported: they read the environment once.
if not published_cache() and "LOCAL_KERNELS" not in os.environ:
    if not (ROOT / "build").is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build.py")], check=True, cwd=ROOT)
    os.environ["LOCAL_KERNELS"] = f"{REPO_ID}={ROOT}"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "kernels_ci: fast subset run by the kernels CI")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kernel():
    from kernels import get_kernel

    return get_kernel(REPO_ID, version=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(path, tensors written): a tiny Qwen3 MoE checkpoint in the Hub's per-expert layout."""
    pytest.importorskip("transformers")
    from tiny_model import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    return path, write_tiny_checkpoint(path)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A Hub-layout cache holding v1 of the package: HF_HUB_CACHE when it has one (make test),
    else a fresh build of this checkout published into a temporary cache."""
    if published_cache():
        return Path(os.environ["HF_HUB_CACHE"])
    tmp = tmp_path_factory.mktemp("hub")
    scripts = ROOT / "scripts"
    subprocess.run([sys.executable, str(scripts / "build.py"), "--out", str(tmp / "build")], check=True, cwd=ROOT)
    publish = [sys.executable, str(scripts / "publish_local.py"), "--build-dir", str(tmp / "build")]
    subprocess.run([*publish, "--cache-dir", str(tmp / "cache")], check=True, cwd=ROOT)
    return tmp / "cache"
