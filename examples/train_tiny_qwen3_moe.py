"""Train a tiny Qwen3 MoE model with the qwen3-moe-fused kernels, loaded the way users load them.

    make example

builds the package, lays the build out as a Hub cache (build/hub-cache) and runs this file
offline against it, so `version=1` below resolves exactly as it would from the Hub. The
script writes a tiny checkpoint in the Hub's per-expert layout, loads it with
`from_pretrained`, swaps the MoE blocks' forward for the package's Triton kernels with
`kernels.kernelize`, trains it a few AdamW steps, comparing each step with Transformers'
own eager experts loop on the same weights, and generates with both. On CPU the kernels
run in Triton's interpreter (float32), on a GPU in bfloat16.
"""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Running this file directly: use the cache `make publish-local` writes, offline. Set before
# kernels / huggingface_hub are imported (they read the environment once).
os.environ.setdefault("HF_HUB_CACHE", str(ROOT / "build" / "hub-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (before triton is imported)

from kernels import (  # noqa: E402
    LayerRepository,
    Mode,
    get_kernel,
    kernelize,
    replace_kernel_forward_from_hub,
    use_kernel_mapping,
)
from transformers import Qwen3MoeForCausalLM  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from tiny_model import kernel_activity, published_cache, sample_batch, write_tiny_checkpoint  # noqa: E402


def main():
    # kernelize warns about every hub-kernel layer of the model left without a mapping (RMSNorm, ...);
    # this script prints which forward the MoE blocks run instead.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    parser.add_argument("--checkpoint", help="where to write the tiny checkpoint (default: a temporary folder)")
    args = parser.parse_args()
    if not published_cache():
        sys.exit(f"no published build in HF_HUB_CACHE={os.environ['HF_HUB_CACHE']}: run `make publish-local`")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    # The interpreter's bf16 matmul is unreliable (Triton 3.9): float32 there.
    dtype = torch.bfloat16 if device == "cuda" and not interpreted else torch.float32
    print(f"device {device}, dtype {dtype}, Triton {'interpreter' if interpreted else 'compiled'}")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint or tmp)
        written = write_tiny_checkpoint(checkpoint)
        print(f"wrote {checkpoint}: {len(written)} tensors, experts one per expert (gate_proj, up_proj, down_proj)")

        # Transformers fuses the per-expert weights into gate_up_proj (E, 2I, H) and down_proj (E, H, I).
        load = dict(dtype=dtype, experts_implementation="eager")
        eager = Qwen3MoeForCausalLM.from_pretrained(checkpoint, **load).to(device)
        model = Qwen3MoeForCausalLM.from_pretrained(checkpoint, **load).to(device)

    # Transformers 5.x leaves the block undecorated: make it kernelizable, then swap its forward.
    replace_kernel_forward_from_hub(Qwen3MoeSparseMoeBlock, "Qwen3MoeSparseMoeBlock")
    repo = LayerRepository(repo_id="org/qwen3-moe-fused", layer_name="Qwen3MoeSparseMoeBlock", version=1)
    with use_kernel_mapping({"Qwen3MoeSparseMoeBlock": {device: repo}}):
        kernelize(model, mode=Mode.TRAINING, device=device)
    kernel = get_kernel("org/qwen3-moe-fused", version=1)  # the module kernelize loaded
    assert model.model.layers[0].mlp.forward.__func__ is kernel.layers.Qwen3MoeSparseMoeBlock.forward
    print(f"MoE blocks run qwen3-moe-fused from {Path(kernel.__file__).parent}")

    input_ids, attention_mask, labels = (t.to(device) for t in sample_batch(model.config.vocab_size, 4, 16))
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train(), eager.train()

    # Each step, the eager model gets the kernelized model's current weights, so the differences
    # printed are those of the experts' implementation alone (not of two diverging trainings).
    print(f"{'step':>4} {'loss':>9} {'eager loss':>10} {'aux_loss':>9} {'|d loss|':>9} {'|d logits|':>10} {'d grads':>8}")
    worst = dict(logits=0.0, loss=0.0, grads=0.0)
    for step in range(1, args.steps + 1):
        eager.load_state_dict(model.state_dict())
        with kernel_activity(kernel) as activity:
            out = model(**batch)
            out.loss.backward()
        ref = eager(**batch)
        ref.loss.backward()
        diff = dict(
            loss=(out.loss - ref.loss).abs().item(),
            logits=(out.logits - ref.logits).abs().max().item(),
            grads=max(relative_error(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters())),
        )
        worst = {k: max(worst[k], diff[k]) for k in worst}
        print(f"{step:>4} {out.loss.item():>9.5f} {ref.loss.item():>10.5f} {out.aux_loss.item():>9.5f} "
              f"{diff['loss']:>9.2e} {diff['logits']:>10.2e} {diff['grads']:>8.1e}")  # fmt: skip
        if step == 1:
            ops = ", ".join(f"{name} x{n}" for name, n in activity["ops"].items())
            print(f"     (package ops in a step: {ops}; Triton launches: {sum(activity['launches'].values())})")
        optimizer.step()
        optimizer.zero_grad()
        eager.zero_grad()

    eager.load_state_dict(model.state_dict())
    model.eval(), eager.eval()
    prompt = input_ids[:1, :6]
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=10, do_sample=False)
        ref_tokens = eager.generate(prompt, max_new_tokens=10, do_sample=False)
    same_tokens = torch.equal(tokens, ref_tokens)
    print(f"generated (kernel): {tokens[0, prompt.shape[1]:].tolist()}")
    print(f"generated (eager):  {ref_tokens[0, prompt.shape[1]:].tolist()}")

    print(
        f"agreement with eager over {args.steps} AdamW steps: max |d logits| {worst['logits']:.2e}, "
        f"max |d loss| {worst['loss']:.2e}, max relative gradient error {worst['grads']:.1e}; "
        f"generated tokens match: {same_tokens}"
    )
    if dtype == torch.float32 and not (
        worst["logits"] < 1e-3 and worst["loss"] < 1e-4 and worst["grads"] < 1e-4 and same_tokens
    ):
        sys.exit("the kernelized model disagrees with eager")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


if __name__ == "__main__":
    main()
