"""The local noarch build: kernel-builder's layout, byte-identical across runs."""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "torch-ext" / "qwen3_moe_fused"


def _build(out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build.py"), "--out", str(out)], check=True, cwd=ROOT)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.kernels_ci
def test_build_is_reproducible_and_complete(tmp_path):
    _build(tmp_path / "a")
    _build(tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    for backend in ("cuda", "cpu"):
        variant = tmp_path / "a" / f"torch-{backend}"
        assert variant.is_dir(), variant
        # A flat copy of every source file kernels ships (py, json), plus the generated files.
        for src in SOURCES.rglob("*"):
            rel = src.relative_to(SOURCES)
            if src.is_file() and src.suffix in (".py", ".json") and rel.name != "_ops.py" and "__pycache__" not in rel.parts:
                assert filecmp.cmp(src, variant / rel, shallow=False), rel
        ops = (variant / "_ops.py").read_text()
        metadata = json.loads((variant / "metadata.json").read_text())
        assert f"_qwen3_moe_fused_{backend}_" in ops and "def add_op_namespace_prefix" in ops
        assert metadata["version"] == 1 and metadata["license"] == "Apache-2.0"
        assert metadata["backend"]["type"] == backend
        assert not list(variant.rglob("__pycache__"))
