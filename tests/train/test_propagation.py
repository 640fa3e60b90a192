"""The GPU propagations against the unfold reference: values and gradients, on the CPU.

The fused Triton kernels run here under Triton's interpreter (``TRITON_INTERPRET=1``: the same kernel
code, executed with NumPy), so CI checks them without a GPU; float64 inputs make the kernels compute
in float64, so ``gradcheck`` applies.
"""

import os

import pytest
import torch

from gazemonai.errors import InvalidInputError
from gazemonai.train import propagation
from gazemonai.train.networks import MultiLevelNet, feature_propagation, feature_propagation_unfold
from gazemonai.train.propagation import (
    compiled_feature_propagation,
    fused_feature_propagation,
    propagation_by_shifts,
    resolve_propagation,
    triton_available,
)

needs_triton = pytest.mark.skipif(
    not triton_available(),
    reason="triton is not installed (the dev extra installs it: pip install -e '.[dev]')",
)


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's interpreter for this test (the kernels are built per mode, so this gets interpreted ones)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _grads(fn, f, v, g):
    f = f.detach().requires_grad_()
    inputs = (f,) if v is None else (f, v.detach().requires_grad_())
    out = fn(f, values=inputs[1] if v is not None else None)
    return out.detach(), torch.autograd.grad((out * g).sum(), inputs)


def _check_against_reference(fn, atol, dtype=torch.float64, kernel_size=5, dilation=2):
    torch.manual_seed(0)
    f = torch.randn(2, 5, 11, 9, dtype=dtype)
    g = torch.randn(2, 5, 11, 9, dtype=dtype)
    out, grads = _grads(lambda x, values: fn(x, kernel_size, dilation, values=values), f, None, g)
    ref, ref_grads = _grads(
        lambda x, values: feature_propagation_unfold(x, kernel_size, dilation), f, None, g
    )
    assert torch.allclose(out, ref, atol=atol)
    assert torch.allclose(grads[0], ref_grads[0], atol=atol * 10)
    # values of another width (the network's: the classifier's 1 channel), against the CPU implementation
    v = torch.randn(2, 1, 11, 9, dtype=dtype)
    out, grads = _grads(lambda x, values: fn(x, kernel_size, dilation, values=values), f, v, g[:, :1])
    ref, ref_grads = _grads(
        lambda x, values: feature_propagation(x, kernel_size, dilation, values=values, impl="shifted"),
        f,
        v,
        g[:, :1],
    )
    assert torch.allclose(out, ref, atol=atol)
    assert all(torch.allclose(a, b, atol=atol * 10) for a, b in zip(grads, ref_grads))


def test_the_setting_is_checked_and_auto_keeps_the_cpu_path():
    f = torch.randn(1, 2, 5, 5)
    assert resolve_propagation("auto", f) == "shifted"  # a CPU tensor never gets the GPU kernel
    assert resolve_propagation("auto", torch.randn(1, 2, 3, 3, 3)) == "shifted"
    with pytest.raises(InvalidInputError, match="propagation must be one of"):
        MultiLevelNet(2, features=(4, 4, 8, 8, 16, 4), propagation="triton")
    with pytest.raises(InvalidInputError, match="propagation must be one of"):
        feature_propagation(f, impl="fast")


@needs_triton
def test_fused_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InvalidInputError, match="runs on a CUDA device .*cpu"):
        feature_propagation(torch.randn(1, 2, 5, 5), impl="fused")
    with pytest.raises(InvalidInputError, match="2-D maps"):
        fused_feature_propagation(torch.randn(1, 2, 3, 3, 3))


def test_fused_without_triton_is_refused_when_the_network_is_built(monkeypatch):
    monkeypatch.setattr(propagation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InvalidInputError, match="needs Triton"):
        MultiLevelNet(2, features=(4, 4, 8, 8, 16, 4), propagation="fused")
    net = MultiLevelNet(2, features=(4, 4, 8, 8, 16, 4))  # auto still builds, and runs the CPU path
    assert net(torch.randn(1, 3, 16, 16), output="train")["prop_logits"][0].shape == (1, 1, 16, 16)


@needs_triton
def test_fused_kernels_match_the_reference_values_and_gradients(interpreter):
    _check_against_reference(fused_feature_propagation, atol=1e-12)
    _check_against_reference(fused_feature_propagation, atol=1e-12, kernel_size=3, dilation=1)
    # float32 inputs: float32 arithmetic, against the float64 reference
    torch.manual_seed(1)
    f = torch.randn(1, 6, 13, 17, dtype=torch.float64)  # 221 pixels: a full tile of 128 and a partial one
    assert torch.allclose(
        fused_feature_propagation(f.float()).double(), feature_propagation_unfold(f), atol=1e-5
    )


@needs_triton
def test_fused_kernels_gradcheck(interpreter):
    torch.manual_seed(0)
    f = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    # fast mode: the Jacobians along random directions (2 interpreted forward passes, not 2 per input)
    assert torch.autograd.gradcheck(lambda a: fused_feature_propagation(a, 3, 2), (f,), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda a, b: fused_feature_propagation(a, 5, 2, values=b), (f, v), fast_mode=True
    )


@needs_triton
def test_fused_kernels_take_channels_last_and_broadcast_gradients(interpreter):
    """Any dense layout: a channels-last map is read in place, and so is an expanded (stride 0) gradient."""
    torch.manual_seed(2)
    f = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    last = f.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = fused_feature_propagation(last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, feature_propagation_unfold(f), atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), last)  # the gradient of a sum is an expanded tensor
    fr = f.clone().requires_grad_()
    (ref,) = torch.autograd.grad(feature_propagation_unfold(fr).sum(), fr)
    assert torch.allclose(grad, ref, atol=1e-11)


@needs_triton
def test_a_network_with_the_fused_propagation_trains_as_with_the_cpu_one(interpreter):
    """MultiLevelNet(propagation='fused'): the propagated logits and every gradient equal the default's."""
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ramp = torch.linspace(-1, 1, 256, dtype=torch.float64).view(16, 16)
    results = []
    for impl in ("shifted", "fused"):
        torch.manual_seed(1)
        net = MultiLevelNet(2, features=(4, 4, 8, 8, 16, 4), propagation=impl).double()
        out = net(x, output="train")
        (out["prop_logits"][1] * ramp).sum().backward()
        results.append((out["prop_logits"][1].detach(), [p.grad.clone() for p in net.levels[1].parameters()]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-12)
    assert all(torch.allclose(u, w, atol=1e-10) for u, w in zip(ga, gb))


def test_the_formulation_for_torch_compile_matches_the_reference():
    """``propagation_by_shifts`` (what ``"compiled"`` compiles), run eagerly: values and gradients."""
    _check_against_reference(propagation_by_shifts, atol=1e-12)
    torch.manual_seed(0)
    f = torch.randn(1, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)  # 3-D
    v = torch.randn(1, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    expected = feature_propagation(f, 3, 2, values=v, impl="shifted")
    assert torch.allclose(propagation_by_shifts(f, 3, 2, values=v), expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: propagation_by_shifts(a, 3, 2, values=b), (f, v))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GAZEMONAI_TEST_COMPILE") != "1",
    reason="compiling the propagation takes ~2 min on a 2-core CPU; set GAZEMONAI_TEST_COMPILE=1 to run it",
)
def test_the_compiled_propagation_matches_the_reference():
    _check_against_reference(compiled_feature_propagation, atol=1e-12)


@pytest.mark.slow
@needs_triton
def test_the_benchmark_runs_and_compares_each_implementation_with_the_cpu_one():
    """benchmarks/propagation.py at tiny settings (the fused kernels interpreted): one JSON line, figures."""
    import json
    import subprocess
    import sys

    from helpers import ROOT

    cmd = [sys.executable, str(ROOT / "benchmarks" / "propagation.py"), "--impls", "shifted,fused"]
    cmd += ["--batch", "1", "--channels", "4", "--size", "12", "--steps", "1", "--warmup", "1"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["shape"] == [1, 4, 12, 12] and set(res["results"]) == {"shifted", "fused"}
    assert res["results"]["fused"]["max_abs_diff"] < 1e-5
    assert all(res["results"][k]["ms"] > 0 for k in ("shifted", "fused"))


def test_building_and_running_a_network_on_a_cpu_imports_neither_dynamo_nor_triton():
    """Where Triton is installed, torch._dynamo imports it (~100 MB resident): a CPU process needs neither."""
    import subprocess
    import sys

    from helpers import ROOT

    code = (
        "import sys, torch\n"
        "from gazemonai.train.networks import MultiLevelNet\n"
        "net = MultiLevelNet(2, features=(4, 4, 8, 8, 16, 4))\n"
        "net(torch.randn(1, 3, 16, 16), output='train')['prop_logits'][0].sum().backward()\n"
        "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
