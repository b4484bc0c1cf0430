"""The README a GPU user starts from: its pip line pins what the tests run with, the plot it
embeds exists, the three loading lines name the published layer, and the troubleshooting
section covers what new users hit."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_pip_line_matches_the_pinned_stack():
    pins = dict(re.findall(r"^([a-z_-]+)==(\S+)$", (ROOT / "requirements-dev.txt").read_text(), re.M))
    line = next(line for line in README.splitlines() if line.startswith("pip install"))
    quoted = dict(re.findall(r'"([a-z_-]+)==([^"]+)"', line))
    assert set(quoted) == {"transformers", "kernels", "peft", "accelerate", "bitsandbytes"}
    assert all(pins[name] == version for name, version in quoted.items())


def test_embedded_plot_and_table_exist():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert images and all((ROOT / image).is_file() for image in images)
    assert "BENCHMARK_TABLE" not in README
    assert re.search(r"^\| case \| qwen3-moe-fused \| .*sonicmoe", README, re.M)


def test_quick_start_and_troubleshooting():
    assert 'LayerRepository(repo_id="org/qwen3-moe-fused", layer_name="Qwen3MoeSparseMoeBlock", version=1)' in README
    for topic in ("TRITON_INTERPRET=1", "use_kernels=True", "kernels[benchmark]", "No kernel mapping found",
                  "Failed to load CPU gemm_4bit_forward", "__module__", "dequantize_experts_4bit(peft_model)",
                  "safetensors.torch.save_model"):  # fmt: skip
        assert topic in README, topic
