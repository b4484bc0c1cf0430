"""launch.Launcher: which calls take the direct path, with which arguments, and (GPU) that both
paths give the same bits through the experts' forward and backward."""

import importlib
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def launch(kernel):
    return importlib.import_module(kernel.__name__ + ".launch")


class FakeCompiled:
    """What JITFunction.run returns: a compiled kernel whose launcher records its calls."""

    def __init__(self, log):
        self.function, self.packed_metadata, self.log = "function", "metadata", log

    def run(self, *call):
        self.log.append(("direct", call))


class FakeJit:
    """A JITFunction with parameters (a_ptr, n, b_ptr, FLAG: constexpr): run records the call."""

    arg_names = ["a_ptr", "n", "b_ptr", "FLAG"]

    def __init__(self):
        self.log = []
        self.pre_run_hooks = []

    def run(self, *args, grid, warmup, **kwargs):
        self.log.append(("jit", grid, args, kwargs))
        return FakeCompiled(self.log)


def fake_knobs(enter=None, exit_=None, debug=False):
    runtime = SimpleNamespace(launch_enter_hook=enter, launch_exit_hook=exit_, debug=debug)
    return SimpleNamespace(runtime=runtime, compilation=SimpleNamespace(instrumentation_mode=""))


@pytest.fixture
def direct(launch, monkeypatch):
    """The direct path switched on as on CUDA, with fake knobs and driver, and device 0."""
    monkeypatch.setattr(launch, "_DIRECT_OK", True)
    monkeypatch.setattr(launch, "DIRECT", True)
    monkeypatch.setattr(launch, "knobs", fake_knobs(), raising=False)
    streams = SimpleNamespace(get_current_stream=lambda device: 1234)
    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=streams), raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return launch


def test_repeated_key_launches_the_compiled_kernel_directly(direct):
    fn = FakeJit()
    kernel = direct.Launcher(fn)
    a, b = torch.zeros(8), torch.zeros(8, dtype=torch.float16)
    for _ in range(2):
        kernel[(3, 2)](a, 8, b_ptr=b, FLAG=True, num_warps=4, num_stages=2)
    assert [entry[0] for entry in fn.log] == ["jit", "direct"]
    assert fn.log[0][1:] == ((3, 2), (a, 8), dict(b_ptr=b, FLAG=True, num_warps=4, num_stages=2))
    call = fn.log[1][1]
    # grid padded to 3, the stream, function, metadata, no launch metadata or hooks, then every
    # argument in signature order (constexprs included), as JITFunction.run passes them.
    assert call[:9] == (3, 2, 1, 1234, "function", "metadata", None, None, None)
    assert len(call) == 13 and call[9] is a and call[10] == 8 and call[11] is b and call[12] is True


@pytest.mark.parametrize(
    "change",
    ["dtype", "alignment", "int value", "bool for int", "None for tensor", "num_warps", "constexpr", "device",
     "debug knob"],
)
def test_anything_triton_specializes_on_makes_a_new_key(direct, monkeypatch, change):
    fn = FakeJit()
    kernel = direct.Launcher(fn)
    base = torch.zeros(16)
    args = dict(a_ptr=base, n=1, b_ptr=base, FLAG=True)
    options = dict(num_warps=4)
    kernel[(1,)](**args, **options)
    kernel[(1,)](**args, **options)
    if change == "dtype":
        args["a_ptr"] = base.half()
    elif change == "alignment":
        args["a_ptr"] = base[1:]  # 4 bytes further: no longer 16-byte aligned
    elif change == "int value":
        args["n"] = 17
    elif change == "bool for int":
        args["n"] = True
    elif change == "None for tensor":
        args["b_ptr"] = None
    elif change == "num_warps":
        options["num_warps"] = 8
    elif change == "constexpr":
        args["FLAG"] = False
    elif change == "debug knob":
        monkeypatch.setattr(direct, "knobs", fake_knobs(debug=True))
    else:
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    kernel[(1,)](**args, **options)
    assert [entry[0] for entry in fn.log] == ["jit", "direct", "jit"]


def test_equal_arguments_in_fresh_tensors_reuse_the_key(direct):
    fn = FakeJit()
    kernel = direct.Launcher(fn)
    for _ in range(3):
        kernel[(1,)](torch.empty(32), 16, torch.empty(32), True)
    assert [entry[0] for entry in fn.log] == ["jit", "direct", "direct"]


@pytest.mark.parametrize("reason", ["DIRECT off", "other option", "launch hook", "pre-run hook"])
def test_jit_path(direct, monkeypatch, reason):
    fn = FakeJit()
    kernel = direct.Launcher(fn)
    a = torch.zeros(4)
    options = {}
    if reason == "DIRECT off":
        monkeypatch.setattr(direct, "DIRECT", False)
    elif reason == "other option":
        options = dict(num_ctas=1)  # an option the key does not hold
    elif reason == "launch hook":
        monkeypatch.setattr(direct, "knobs", fake_knobs(enter=print))
    else:
        fn.pre_run_hooks.append(print)
    for _ in range(3):
        kernel[(1,)](a, 4, a, True, **options)
    assert [entry[0] for entry in fn.log] == ["jit"] * 3


def test_key_cache_is_bounded(direct, monkeypatch):
    monkeypatch.setattr(direct, "MAX_KEYS", 3)
    fn = FakeJit()
    kernel = direct.Launcher(fn)
    a = torch.zeros(4)
    for n in range(5):
        kernel[(1,)](a, n, a, True)
    assert len(kernel.compiled) <= 3
    assert [entry[0] for entry in fn.log] == ["jit"] * 5


class Chain:
    def __init__(self, calls):
        self.calls = calls


@pytest.mark.parametrize(
    "enter, exit_, expected",
    [(Chain([]), Chain([]), True), (None, None, True), (Chain([print]), Chain([]), False), (print, None, False)],
)
def test_no_hooks(launch, monkeypatch, enter, exit_, expected):
    monkeypatch.setattr(launch, "knobs", fake_knobs(enter, exit_), raising=False)
    assert launch._no_hooks() is expected


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [64, 2048])
def test_direct_and_jit_launches_give_the_same_bits(kernel, launch, monkeypatch, tokens):
    """The experts' forward and every gradient, bf16, Qwen3-30B-A3B shapes: identical with the
    direct path off and on, and the direct path taken on the second call."""
    assert launch._DIRECT_OK, "the direct path is off on this GPU's Triton"
    torch.manual_seed(0)
    device, dtype = "cuda", torch.bfloat16
    num_experts, hidden, inter, top_k = 128, 2048, 768, 8
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=dtype) * 0.02).requires_grad_()
    down = (torch.randn(num_experts, hidden, inter, device=device, dtype=dtype) * 0.02).requires_grad_()
    logits = torch.randn(tokens, num_experts, device=device)
    weights, ids = torch.topk(logits.softmax(-1), top_k)
    weights = weights.to(dtype).requires_grad_()
    grad_out = torch.randn(tokens, hidden, device=device, dtype=dtype)
    forward = importlib.import_module(kernel.__name__ + ".grouped_gemm.forward")

    def run():
        out = kernel.moe_experts_forward(x, gate_up, down, ids, weights, check_ids=False)
        return [out, *torch.autograd.grad(out, (x, gate_up, down, weights), grad_out)]

    monkeypatch.setattr(launch, "DIRECT", False)
    reference = run()
    monkeypatch.setattr(launch, "DIRECT", True)
    run()  # new keys: through JITFunction.run
    keys = len(forward._swiglu_gemm_kernel.compiled)
    for got, want in zip(run(), reference):
        assert torch.equal(got, want)
    assert keys > 0 and len(forward._swiglu_gemm_kernel.compiled) == keys  # no new key: direct
