"""cross_entropy kernels against a float64 reference: losses, gradients, dtypes, layouts, compile, errors."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, TRITON_DEVICE, assert_lowp_close, assert_rounding_would_fail, requires_cuda
from minipt.ops import BackendUnavailableError, cross_entropy, cross_entropy_ref
from minipt.ops.cross_entropy import MAX_BLOCK_V

BACKENDS = ["triton", "native"]
ALL_BACKENDS = ["torch", *BACKENDS]  # for behaviour every backend shares: errors, -inf logits
DEVICE = TRITON_DEVICE


def make_target(N, V, ignored, ignore_index=-100, dtype=torch.int64):
    target = torch.randint(0, V, (N,), device=DEVICE, dtype=dtype)
    if ignored == "some":
        target[::3] = ignore_index
    elif ignored == "all":
        target[:] = ignore_index
    return target


def loss_and_grad(fn, logits, target, reduction, **kw):
    """The loss, and the gradient of a non-trivial function of it: 3·loss, or Σ w_i·loss_i for 'none'."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target, reduction=reduction, **kw)
    if reduction == "none":
        weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
        (grad,) = torch.autograd.grad(loss, x, weights)
    else:
        (grad,) = torch.autograd.grad(loss * 3, x)
    return loss.detach(), grad


def reference(logits, target, reduction, **kw):
    return loss_and_grad(cross_entropy_ref, logits.double(), target, reduction, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, V", [(1, 41), (7, 1000), (33, 4099)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ignored, label_smoothing", [("none", 0.0), ("some", 0.0), ("some", 0.1), ("all", 0.1)])
def test_matches_float64_reference(backend, N, V, reduction, ignored, label_smoothing, poisoned_empty):
    logits = torch.randn(N, V, device=DEVICE) * 4
    target = make_target(N, V, ignored)
    kw = dict(label_smoothing=label_smoothing)
    loss, grad = loss_and_grad(cross_entropy, logits, target, reduction, backend=backend, **kw)
    want_loss, want_grad = reference(logits, target, reduction, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    if ignored == "all":
        assert (loss == 0).all() and (grad == 0).all()
    elif ignored == "some":
        assert (grad[target == -100] == 0).all()


# Soft-capping at 5 with logits of standard deviation 8 puts most logits where tanh bends and many where it
# saturates (1 - tanh² below 1e-2); a z_loss of 0.01 makes the z term a visible part of the loss.
CAPPED_CASES = {
    "softcap": dict(softcap=5.0),
    "z_loss": dict(z_loss=1e-2),
    "both+smoothing": dict(softcap=5.0, z_loss=1e-2, label_smoothing=0.1),
}


def z_term_and_grad(fn, logits, target, reduction, **kw):
    """The loss and gradient as loss_and_grad gives them, and the z term that ``return_z_loss`` returns."""
    x = logits.detach().clone().requires_grad_()
    loss, z = fn(x, target, reduction=reduction, return_z_loss=True, **kw)
    assert not z.requires_grad and z.shape == loss.shape and z.dtype == loss.dtype
    weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
    (grad,) = torch.autograd.grad(loss, x, weights)
    return loss.detach(), z, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, V", [(1, 41), (7, 1000), (33, 4099)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("case, ignored", [*((c, "some") for c in CAPPED_CASES), ("both+smoothing", "all")])
def test_softcap_and_z_loss_match_float64_reference(backend, N, V, reduction, case, ignored, poisoned_empty):
    """Loss, z term and gradient against the float64 reference; ignored rows get nothing, and the mean
    divides by the counted rows, z term included."""
    logits = torch.randn(N, V, device=DEVICE) * 8
    target = make_target(N, V, ignored)
    kw = CAPPED_CASES[case]
    loss, z, grad = z_term_and_grad(cross_entropy, logits, target, reduction, backend=backend, **kw)
    want_loss, want_z, want_grad = z_term_and_grad(cross_entropy_ref, logits.double(), target, reduction, **kw)
    assert loss.dtype == z.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), want_z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    ignored_rows = target == -100
    assert (grad[ignored_rows] == 0).all()
    if reduction == "none":
        assert (loss[ignored_rows] == 0).all() and (z[ignored_rows] == 0).all()
    if ignored_rows.all():  # "all", or the one row of N = 1
        assert loss.abs().sum() == 0 and z.abs().sum() == 0
    elif kw.get("z_loss"):
        assert z.abs().sum() > 1e-3 * loss.abs().sum()  # a z term that the tolerances above could not hide


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_z_term_is_zero_and_the_loss_unchanged_without_z_loss(backend):
    """``return_z_loss`` alone changes nothing in the loss: the same bits, and a zero z term."""
    logits = torch.randn(9, 300, device=DEVICE) * 4
    target = make_target(9, 300, "some")
    plain = cross_entropy(logits, target, backend=backend, softcap=5.0)
    loss, z = cross_entropy(logits, target, backend=backend, softcap=5.0, return_z_loss=True)
    assert torch.equal(loss, plain) and z.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softcap_and_z_loss_low_precision_three_way(backend, dtype, poisoned_empty):
    """16-bit logits, capped and with a z term: a float32 loss equal to the float64 one of the same logits
    to 1e-5, and a gradient within the three-way rule."""
    N, V = 33, 4099
    logits = (torch.randn(N, V, device=DEVICE) * 8).to(dtype)
    target = make_target(N, V, "some")
    kw = CAPPED_CASES["both+smoothing"]
    loss, z, grad = z_term_and_grad(cross_entropy, logits, target, "none", backend=backend, **kw)
    assert loss.dtype == z.dtype == torch.float32 and grad.dtype == dtype
    want_loss, want_z, _ = z_term_and_grad(cross_entropy_ref, logits.double(), target, "none", **kw)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), want_z, rtol=1e-5, atol=1e-7)
    _, _, ref_grad = z_term_and_grad(cross_entropy_ref, logits.float(), target, "none", **kw)
    _, _, low_grad = z_term_and_grad(cross_entropy_ref, logits, target, "none", upcast=False, **kw)
    assert_lowp_close(grad, ref_grad, low_grad, "grad")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_softcap_of_minus_inf_logits(backend, poisoned_empty):
    """A masked (-inf) column is capped to -softcap, as the reference caps it: a finite loss, and a zero
    gradient there (1 - tanh² is 0), in a whole leading block and scattered."""
    N, V = 5, MAX_BLOCK_V + 37
    logits = torch.randn(N, V, device=DEVICE) * 8
    target = make_target(N, V, "some")
    masked = torch.rand(N, V, device=DEVICE) < 0.3
    masked[:, :MAX_BLOCK_V] = True
    target[target >= 0] = torch.randint(MAX_BLOCK_V, V, (int((target >= 0).sum()),), device=DEVICE)
    masked[torch.arange(N, device=DEVICE), target.clamp(min=0)] = False
    logits[masked] = float("-inf")
    kw = dict(softcap=5.0, z_loss=1e-2)
    loss, grad = loss_and_grad(cross_entropy, logits, target, "none", backend=backend, **kw)
    want_loss, want_grad = reference(logits, target, "none", **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[masked] == 0).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_online_lse_when_the_max_arrives_late(backend, poisoned_empty):
    """Logits rising along V put each row's max in a later block, so the running sum must be rescaled."""
    N, V = 3, 3 * 4096 + 5
    logits = torch.randn(N, V, device=DEVICE) + torch.linspace(0, 30, V, device=DEVICE)
    logits[1, -1] += 20  # a spike in the ragged last block
    target = make_target(N, V, "none")
    loss, grad = loss_and_grad(cross_entropy, logits, target, "none", backend=backend, label_smoothing=0.1)
    want_loss, want_grad = reference(logits, target, "none", label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_low_precision_three_way(backend, dtype, reduction, poisoned_empty):
    """|kernel - ref_fp32| <= 2·|torch in dtype - ref_fp32| + atol, for the loss and the gradient."""
    N, V = 33, 4099
    logits = (torch.randn(N, V, device=DEVICE) * 4).to(dtype)
    target = make_target(N, V, "some")
    kw = dict(label_smoothing=0.1)
    loss, grad = loss_and_grad(cross_entropy, logits, target, reduction, backend=backend, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad = loss_and_grad(cross_entropy_ref, logits.float(), target, reduction, **kw)
    low_loss, low_grad = loss_and_grad(cross_entropy_ref, logits, target, reduction, upcast=False, **kw)
    assert_lowp_close(loss, ref_loss, low_loss, "loss")
    assert_lowp_close(grad, ref_grad, low_grad, "grad")


def assert_rounded_once(grad, want):
    """``grad`` is ``want`` computed in float32 and rounded once to grad's 16-bit dtype: within one unit in
    the last place, plus float32's error relative to the largest element (softmax(x) - ε/V cancels where
    the two are close) and one subnormal step (fp16)."""
    info = torch.finfo(grad.dtype)
    atol = max(info.smallest_normal * info.eps, torch.finfo(torch.float32).eps * want.abs().max().item())
    torch.testing.assert_close(grad.double(), want.double(), rtol=info.eps, atol=atol)


# The kernels load 16-bit logits and upcast them before any arithmetic, with no
# tl.dot (whose bf16 form the interpreter gets wrong), so bf16 runs in the
# interpreter as well as on CUDA.
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_loss_of_16_bit_logits_is_float32(backend, dtype, reduction, poisoned_empty):
    """The loss of fp16/bf16 logits is float32 and equals the float64 loss of the same logits to 1e-5,
    which a loss rounded to 16 bits misses (bf16 steps by 0.03 between 4 and 8). The gradient keeps the
    logits' dtype and is the float64 one rounded once."""
    N, V = 37, 1003
    logits = (torch.randn(N, V, device=DEVICE) * 4).to(dtype)
    target = make_target(N, V, "some")
    loss, grad = loss_and_grad(cross_entropy, logits, target, reduction, backend=backend, label_smoothing=0.1)
    want_loss, want_grad = reference(logits, target, reduction, label_smoothing=0.1)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_rounding_would_fail(want_loss, dtype, rtol=1e-5)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)
    assert_rounded_once(grad, want_grad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_autocast_loss_is_float32_as_torch_gives_it(backend, reduction, poisoned_empty):
    """Logits from a Linear under bf16 autocast, as an LM head in training: the loss is what
    ``F.cross_entropy`` gives under the same autocast, float32 to 1e-5, and the logits' gradient is bf16."""
    N, D, V = 37, 48, 1003
    layer = torch.nn.Linear(D, V, device=DEVICE)  # float32 parameters
    hidden = torch.randn(N, D, device=DEVICE) * 3
    target = make_target(N, V, "some")
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        logits = layer(hidden)
        loss = cross_entropy(logits, target, reduction=reduction, backend=backend, label_smoothing=0.1)
        want = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
    assert logits.dtype == torch.bfloat16 and loss.dtype == want.dtype == torch.float32
    assert_rounding_would_fail(want, torch.bfloat16, rtol=1e-5)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    upstream = torch.randn(loss.shape, device=DEVICE)
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    (want_grad,) = torch.autograd.grad(want, logits, upstream)
    assert grad.dtype == torch.bfloat16
    assert_rounded_once(grad, want_grad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("where", ["last_column", "leading_block", "scattered"])
def test_minus_inf_logits_match_torch(backend, dtype, where, poisoned_empty):
    """Masked vocabulary columns (-inf) give torch's finite losses and a zero gradient there, never NaN.

    V passes one Triton block, so "leading_block" makes a whole first block -inf;
    the native C++ kernel's 1024-column chunks are then all -inf as well.
    """
    N, V = 5, MAX_BLOCK_V + 37
    logits = torch.randn(N, V, device=DEVICE) * 4
    target = make_target(N, V, "some")
    counted = target != -100
    if where == "last_column":
        logits[:, -1] = float("-inf")
    elif where == "leading_block":
        logits[:, :MAX_BLOCK_V] = float("-inf")
        target[counted] = torch.randint(MAX_BLOCK_V, V, (int(counted.sum()),), device=DEVICE)
    else:
        masked = torch.rand(N, V, device=DEVICE) < 0.3
        masked[counted.nonzero()[:, 0], target[counted]] = False
        logits[masked] = float("-inf")
    logits = logits.to(dtype)
    loss, grad = loss_and_grad(cross_entropy, logits, target, "none", backend=backend)
    ref_loss, ref_grad = loss_and_grad(cross_entropy_ref, logits.double(), target, "none")
    assert torch.isfinite(ref_loss).all() and torch.isfinite(ref_grad).all()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[logits == float("-inf")] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    else:
        low_loss, low_grad = loss_and_grad(cross_entropy_ref, logits, target, "none", upcast=False)
        assert_lowp_close(loss, ref_loss, low_loss, "loss")
        assert_lowp_close(grad, ref_grad, low_grad, "grad")


# softcap and z_loss reach the kernel as float32 scalars: these two are exact there.
@pytest.mark.parametrize("kw", [{}, dict(softcap=2.5, z_loss=2**-7)], ids=["plain", "capped"])
def test_float64_logits_stay_float64(kw):
    """Triton keeps float64 in float64 (native supports the three training dtypes only)."""
    backend = "triton"
    logits = torch.randn(9, 300, device=DEVICE, dtype=torch.float64) * 4
    target = make_target(9, 300, "some")
    loss, grad = loss_and_grad(cross_entropy, logits, target, "none", backend=backend, **kw)
    want_loss, want_grad = reference(logits, target, "none", **kw)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_non_contiguous_logits_and_target(backend, layout, poisoned_empty):
    N, V = 13, 1000
    if layout == "row_slice":
        logits = (torch.randn(N, V + 37, device=DEVICE) * 4)[:, 5 : V + 5]
    else:
        logits = (torch.randn(V, N, device=DEVICE) * 4).t()
    target = make_target(2 * N, V, "some")[::2]
    assert not logits.is_contiguous() and not target.is_contiguous()
    before = logits.clone()
    loss, grad = loss_and_grad(cross_entropy, logits, target, "sum", backend=backend, label_smoothing=0.1)
    want_loss, want_grad = reference(logits, target, "sum", label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(logits, before), "the public op must not write over its input"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_column_offsets_past_2_31(backend, tmp_path):
    """A (N, V) view with stride 2**30 along V, as a transposed view of large logits has: its last
    column starts 2**31 elements in, past what int32 column offsets reach.

    On the CPU the storage is a sparse file mapped into memory, so only the few
    pages read take space; on a GPU it is 8 GiB of device memory.
    """
    N, V, stride = 4, 3, 2**30
    size = (V - 1) * stride + N
    if DEVICE == "cpu":
        path = tmp_path / "logits.bin"
        with open(path, "wb") as f:
            f.truncate(size * 4)
        storage = torch.from_file(str(path), shared=True, size=size, dtype=torch.float32)
    else:
        storage = torch.empty(size, device=DEVICE)
    logits = storage.as_strided((N, V), (1, stride))
    logits.copy_(torch.randn(N, V, device=DEVICE) * 4)
    target = torch.tensor([0, 2, 1, 2], device=DEVICE)
    # Straight in, not through loss_and_grad: its clone would make the logits contiguous.
    loss = cross_entropy(logits.requires_grad_(), target, reduction="sum", backend=backend, label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss * 3, logits)
    want_loss, want_grad = reference(logits.detach().contiguous(), target, "sum", label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_and_custom_ignore_index(backend):
    N, V = 17, 257
    logits = torch.randn(N, V, device=DEVICE) * 4
    target = make_target(N, V, "none", dtype=torch.int32)
    target[[1, 4, 9]] = 7
    loss, grad = loss_and_grad(cross_entropy, logits, target, "mean", backend=backend, ignore_index=7)
    want_loss, want_grad = reference(logits, target.long(), "mean", ignore_index=7)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    assert (grad[target == 7] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logits = torch.randn(0, 11, device=DEVICE, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert cross_entropy(logits, target, reduction="none", backend=backend).shape == (0,)
    loss = cross_entropy(logits, target, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 11)


@pytest.mark.parametrize("softcap, z_loss", [(0.0, 0.0), (5.0, 1e-2)])
def test_in_place_gradient_option_writes_the_scaled_gradient_over_the_logits(softcap, z_loss, poisoned_empty):
    from minipt.ops._loss import softcap_logits
    from minipt.ops.cross_entropy import _cross_entropy_forward

    N, V = 9, 4099
    logits = torch.randn(N, V, device=DEVICE) * 4
    target = make_target(N, V, "some")
    scale = torch.rand(N, device=DEVICE)
    kw = dict(label_smoothing=0.1, softcap=softcap or None, z_loss=z_loss)
    want_loss, want_grad = reference(logits, target, "none", **kw)
    weights = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(scale)
    buffer = logits.clone()
    loss, lse = _cross_entropy_forward(buffer, target, -100, 0.1, softcap, z_loss, grad=buffer, grad_scale=scale)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    want_lse = torch.logsumexp(softcap_logits(logits.double(), softcap or None), 1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
    # The reference gradient carries the test's random row weights; undo them, apply scale.
    expected = want_grad / weights.double()[:, None] * scale.double()[:, None]
    expected[target == -100] = 0
    torch.testing.assert_close(buffer.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{}, dict(softcap=3.0, z_loss=1e-2)], ids=["plain", "capped"])
def test_torch_compile_fullgraph_matches_eager(kw):
    def fn(x, t):
        return cross_entropy(torch.tanh(x) * 5, t, label_smoothing=0.1, backend="triton", **kw) * 2

    N, V = 7, 300
    x = torch.randn(N, V, device=DEVICE, requires_grad=True)
    t = make_target(N, V, "some")
    compiled = torch.compile(fn, fullgraph=True)
    loss = compiled(x, t)
    (grad,) = torch.autograd.grad(loss, x)
    want = fn(x, t)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)
    if DEVICE == "cuda":
        return  # a device-side assert would end the CUDA context; the CPU run checks it
    bad = t.clone()
    bad[1] = V  # the device-side range assert stays in the compiled graph
    with pytest.raises(RuntimeError, match=r"cross_entropy: target values must be in \[0, 300\)"):
        compiled(x, bad)


# Compiled in a fresh process, where TRITON_INTERPRET is off, down to sm_90 machine code.
COMPILE_FOR_SM90 = textwrap.dedent("""
    import importlib
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ce = importlib.import_module("minipt.ops.cross_entropy")
    for dt, acc, acc_ptr in (("bf16", tl.float32, "*fp32"), ("fp16", tl.float32, "*fp32"), ("fp64", tl.float64, "*fp64")):
        common = {"X_ptr": f"*{dt}", "stride_xn": "i64", "stride_xv": "i32", "T_ptr": "*i64", "stride_t": "i32"}
        tail = {"G_ptr": f"*{dt}", "stride_gn": "i32", "Scale_ptr": "*fp32", "stride_scale": "i32",
                "V": "i32", "ignore_index": "i32", "label_smoothing": "fp32", "softcap": "fp32", "z_loss": "fp32"}
        flags = {"SOFTCAP": "constexpr", "Z_LOSS": "constexpr", "BLOCK_V": "constexpr", "ACC": "constexpr"}
        fwd = {**common, "Loss_ptr": acc_ptr, "Lse_ptr": acc_ptr, **tail, "WRITE_GRAD": "constexpr", **flags}
        bwd = {**common, "Lse_ptr": acc_ptr, **tail, **flags}
        for cap, z in ((False, False), (True, False), (False, True), (True, True)):
            options = {"SOFTCAP": cap, "Z_LOSS": z, "ACC": acc}
            for fn, sig, const in (
                (ce._cross_entropy_fwd_kernel, fwd, {"WRITE_GRAD": False, "BLOCK_V": 4096, **options}),
                (ce._cross_entropy_fwd_kernel, fwd, {"WRITE_GRAD": True, "BLOCK_V": 64, **options}),
                (ce._cross_entropy_bwd_kernel, bwd, {"BLOCK_V": 4096, **options}),
            ):
                src = ASTSource(fn=fn, signature=sig, constexprs=const)
                assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter does not type-check as the compiler does; compile every variant for an H100 (no GPU needed)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_2_31_elements(backend):
    """Row offsets past 2**31 (a bug there would read the wrong rows). GPU only: 4.4 GB of bf16 logits."""
    N, V = 17_000, 128_256
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    assert logits.numel() > 2**31
    target = torch.randint(0, V, (N,), device="cuda")
    loss = cross_entropy(logits, target, reduction="none", backend=backend)
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device="cuda")
    want = cross_entropy_ref(logits[rows].float(), target[rows], reduction="none")
    torch.testing.assert_close(loss[rows].float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda: (torch.randn(3, 5), torch.tensor([0, 1])), ValueError, "target must have shape"),
        (lambda: (torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0])), TypeError, "target must have dtype"),
        (lambda: (torch.randn(3, 5), torch.tensor([0, 1, 2], dtype=torch.int16)), TypeError, "target must have dtype"),
        (lambda: (torch.randn(3, 5), torch.tensor([True, False, True])), TypeError, "target must have dtype"),
        (lambda: (torch.randn(3, 5), torch.tensor([[0, 1, 2]])), ValueError, "target must have 1 dimensions"),
        (lambda: (torch.randn(3, 5, 2), torch.tensor([0, 1, 2])), ValueError, "logits must have 2"),
        (lambda: (torch.randint(0, 5, (3, 5)), torch.tensor([0, 1, 2])), TypeError, "logits must have dtype"),
        (lambda: (torch.randn(3, 0), torch.tensor([0, 1, 2])), ValueError, "at least one class"),
    ],
)
def test_bad_input_is_named(backend, make, exc, pattern):
    logits, target = make()
    with pytest.raises(exc, match=pattern):
        cross_entropy(logits.to(DEVICE), target.to(DEVICE), backend=backend)


# On CUDA an out-of-range target is a device-side assert, which ends the process's
# CUDA context, so these cases run on the CPU: Triton there needs the interpreter.
CPU_BACKENDS = [
    "torch", "native", pytest.param("triton", marks=pytest.mark.skipif(HAS_CUDA, reason="the interpreter is off"))
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target", [[0, 5, 1], [0, -1, 1], [-100, 1, 2**30]])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_out_of_range_targets_fail_the_device_assert(backend, target, dtype):
    """The range check is an assert on the device, never a host sync; on the CPU it raises at once."""
    pattern = r"cross_entropy: target values must be in \[0, 5\) or equal ignore_index=-100"
    with pytest.raises(RuntimeError, match=pattern):
        cross_entropy(torch.randn(3, 5), torch.tensor(target, dtype=dtype), backend=backend)


BAD_SOFTCAPS = [0.0, -1.0, float("inf"), float("nan"), 1e-40, True, "30"]
BAD_Z_LOSSES = [-1e-4, float("inf"), float("nan"), 1e39, True, None]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(reduction="avg"), ValueError, "reduction must be"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
        *((dict(softcap=v), ValueError, "softcap must be a positive finite float") for v in BAD_SOFTCAPS),
        *((dict(z_loss=v), ValueError, "z_loss must be a finite float >= 0") for v in BAD_Z_LOSSES),
        (dict(return_z_loss="yes"), TypeError, "return_z_loss must be a bool"),
    ],
)
def test_bad_options_are_named(backend, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cross_entropy(torch.randn(3, 5, device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE), backend=backend, **kwargs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device to put the target on another device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_target_on_another_device_is_named(backend):
    with pytest.raises(ValueError, match="target is on"):
        cross_entropy(torch.randn(3, 5, device="cuda"), torch.tensor([0, 1, 2]), backend=backend)


def test_triton_outside_interpreter_on_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend='triton'"):
        cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), backend="triton")
