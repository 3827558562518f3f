"""The native backend (minipt._C): C++ kernels on CPU tensors, CUDA kernels on GPU tensors.

Each kernel is compared with the float64 reference on fresh random inputs and
awkward shapes, with every gradient, under ``poisoned_empty`` so that an output
element a kernel forgets to write shows up. The bindings are fed bad input
directly: each case must raise a Python exception that names the problem, never
crash. CUDA cases are skipped on a machine without a GPU.
"""

import math

import pytest
import torch

from minipt._backend import BackendUnavailableError, native_module
from minipt.ops import cross_entropy, cross_entropy_ref, native
from conftest import HAS_CUDA, requires_cuda

_C = native_module()
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
LOWP = [torch.float16, torch.bfloat16]


def assert_lowp_close(kernel, ref32, torch_lowp, what):
    """STYLE.md's rule: |kernel - ref_fp32| <= 2·|torch_lowp - ref_fp32| + atol, elementwise.

    atol is one ulp of the output dtype at the largest reference value: a kernel
    that computes in float32 still rounds its output once, and where torch happens
    to round exactly that rounding alone would fail a smaller atol.
    """
    atol = torch.finfo(kernel.dtype).eps * ref32.abs().max().item()
    kernel, ref32, torch_lowp = kernel.double(), ref32.double(), torch_lowp.double()
    err = (kernel - ref32).abs()
    bound = 2 * (torch_lowp - ref32).abs() + atol
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: |kernel - ref| = {err.flatten()[worst].item():.3g} exceeds "
        f"2·|torch - ref| + atol = {bound.flatten()[worst].item():.3g}"
    )


def test_has_cuda_is_reported():
    assert isinstance(_C.has_cuda, bool)
    if HAS_CUDA:
        assert _C.has_cuda, "a CUDA machine needs the CUDA kernels built (nvcc at build time)"


# ----------------------------------------------------------------------------- cross-entropy
CE_SHAPES = [(1, 1), (5, 123), (37, 1001), (64, 4099), (3, 50257)]


def ce_inputs(N, V, device, dtype=torch.float32, ignore_share=0.25, target_dtype=torch.int64):
    logits = (torch.randn(N, V, device=device) * 4).to(dtype)
    target = torch.randint(0, V, (N,), device=device)
    target[torch.rand(N, device=device) < ignore_share] = -100
    return logits, target.to(target_dtype)


def ce_grads(fn, logits, target, reduction, weight):
    """Loss and gradient of Σ weight·loss (weight makes each row's gradient scale distinct)."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target)
    (grad,) = torch.autograd.grad((loss.double() * weight).sum(), x)
    return loss.detach(), grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,V", CE_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
def test_cross_entropy_fp32_matches_float64(device, N, V, reduction, label_smoothing, target_dtype, poisoned_empty):
    logits, target = ce_inputs(N, V, device, target_dtype=target_dtype)
    weight = torch.randn(N if reduction == "none" else (), dtype=torch.float64, device=device)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    got, got_grad = ce_grads(lambda x, t: cross_entropy(x, t, backend="native", **kwargs), logits, target, reduction, weight)
    want, want_grad = ce_grads(lambda x, t: cross_entropy_ref(x, t, **kwargs), logits.double(), target, reduction, weight)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("N,V", [(7, 321), (33, 2051)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_low_precision(device, dtype, N, V, reduction, poisoned_empty):
    if device == "cpu" and dtype == torch.float16 and not _cpu_has_fp16_cross_entropy():
        pytest.skip("this torch build has no float16 cross_entropy on the CPU to set the tolerance")
    logits, target = ce_inputs(N, V, device, dtype=dtype)
    weight = torch.randn(N if reduction == "none" else (), dtype=torch.float64, device=device)
    kwargs = dict(reduction=reduction, label_smoothing=0.05)
    got, got_grad = ce_grads(lambda x, t: cross_entropy(x, t, backend="native", **kwargs), logits, target, reduction, weight)
    ref, ref_grad = ce_grads(lambda x, t: cross_entropy_ref(x, t, **kwargs), logits.float(), target, reduction, weight)
    low, low_grad = ce_grads(lambda x, t: cross_entropy(x, t, backend="torch", **kwargs), logits, target, reduction, weight)
    assert got.dtype == dtype and got_grad.dtype == dtype
    assert_lowp_close(got, ref, low, what="loss")
    assert_lowp_close(got_grad, ref_grad, low_grad, what="grad")


def _cpu_has_fp16_cross_entropy() -> bool:
    try:
        torch.nn.functional.cross_entropy(torch.zeros(1, 2, dtype=torch.float16), torch.zeros(1, dtype=torch.long))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored_is_zero_with_zero_grads(device, reduction, poisoned_empty):
    logits = torch.randn(6, 50, device=device, requires_grad=True)
    target = torch.full((6,), 7, device=device)
    loss = cross_entropy(logits, target, ignore_index=7, reduction=reduction, backend="native")
    loss.sum().backward()
    assert (loss == 0).all()
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_extreme_logits(device):
    # Huge offsets (no overflow), whole -inf chunks before the max (no NaN from
    # -inf - -inf), and a NaN logit (NaN loss, as torch gives).
    N, V = 4, 3000
    logits = torch.randn(N, V, device=device, dtype=torch.float64)
    logits[0] += 1e4
    logits[1, :2500] = -math.inf
    logits[2, 100:] = -1e30
    logits[3, 17] = math.nan
    target = torch.tensor([5, 2700, 3, 9], device=device)
    got = cross_entropy(logits.float(), target, reduction="none", backend="native")
    want = cross_entropy_ref(logits, target, reduction="none")
    torch.testing.assert_close(got[:3].double(), want[:3], rtol=1e-5, atol=1e-4)
    assert torch.isnan(got[3])


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_noncontiguous_input(device):
    base = torch.randn(300, 40, device=device)
    logits = base.t()  # (40, 300), strides (1, 40)
    target = torch.randint(0, 300, (80,), device=device)[::2]
    got = cross_entropy(logits, target, reduction="none", backend="native")
    torch.testing.assert_close(got.double(), cross_entropy_ref(logits.double(), target, reduction="none"), rtol=1e-5, atol=1e-5)


def test_cross_entropy_cpu_is_identical_for_any_thread_count():
    logits, target = ce_inputs(513, 777, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cross_entropy(logits, target, reduction="none", backend="native")
        torch.set_num_threads(max(2, threads))
        many = cross_entropy(logits, target, reduction="none", backend="native")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_cross_entropy_float64_is_refused():
    logits, target = ce_inputs(3, 5, "cpu", dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float32, float16 and bfloat16 logits"):
        cross_entropy(logits, target, backend="native")


def test_cross_entropy_custom_ops_pass_opcheck():
    logits, target = ce_inputs(9, 130, "cpu")
    torch.library.opcheck(native.cross_entropy_forward, (logits.requires_grad_(), target, -100, 0.1))
    loss, lse = native.cross_entropy_forward(logits.detach(), target, -100, 0.1)
    torch.library.opcheck(native.cross_entropy_backward, (logits.detach(), target, lse, torch.rand(9), -100, 0.1))


def test_cross_entropy_under_torch_compile():
    logits, target = ce_inputs(17, 300, "cpu")

    def loss_fn(x, t):
        return native.cross_entropy(x, t, ignore_index=-100, reduction="mean", label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    got, got_grad = ce_grads(compiled, logits, target, "mean", torch.tensor(1.0, dtype=torch.float64))
    want, want_grad = ce_grads(loss_fn, logits, target, "mean", torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


class TestCrossEntropyBindings:
    """The raw bindings refuse bad arguments with a ValueError/TypeError before touching memory."""

    def call(self, **overrides):
        logits = torch.randn(4, 10)
        target = torch.randint(0, 10, (4,))
        loss, lse = torch.empty(4), torch.empty(4)
        args = dict(
            logits=logits.data_ptr(), target=target.data_ptr(), loss=loss.data_ptr(), lse=lse.data_ptr(), n_rows=4,
            n_classes=10, dtype=0, target_size=8, ignore_index=-100, label_smoothing=0.0, num_threads=1,
        )
        args.update(overrides)
        _C.cross_entropy_forward_cpu(**args)
        return loss

    def test_valid_call_runs(self):
        assert torch.isfinite(self.call()).all()

    @pytest.mark.parametrize(
        "overrides,message",
        [
            (dict(dtype=3), "dtype code must be 0"),
            (dict(target_size=2), "target element size must be 4 or 8"),
            (dict(n_rows=-1), "n_rows must be >= 0"),
            (dict(n_classes=0), "n_classes must be >= 1"),
            (dict(n_rows=2**40, n_classes=2**40), "overflows int64"),
            (dict(logits=0), "logits is a null pointer"),
            (dict(loss=0), "loss is a null pointer"),
            (dict(label_smoothing=1.5), "label_smoothing must be in"),
            (dict(label_smoothing=math.nan), "label_smoothing must be in"),
            (dict(num_threads=0), "num_threads must be in"),
        ],
    )
    def test_bad_arguments_raise_value_error(self, overrides, message):
        with pytest.raises(ValueError, match=message):
            self.call(**overrides)

    def test_misaligned_pointer(self):
        buf = torch.zeros(64)
        with pytest.raises(ValueError, match="not aligned"):
            self.call(logits=buf.data_ptr() + 2)

    def test_negative_pointer_is_a_type_error(self):
        with pytest.raises(TypeError):
            self.call(logits=-8)

    def test_out_of_range_target_is_reported_not_read(self):
        target = torch.tensor([1, 10, -5, 2])
        with pytest.raises(ValueError, match=r"2 target\(s\) outside \[0, 10\).*first at row 1"):
            self.call(target=target.data_ptr())

    def test_custom_op_refuses_noncontiguous_and_bad_shapes(self):
        logits = torch.randn(10, 4).t()
        target = torch.zeros(4, dtype=torch.long)
        with pytest.raises(ValueError, match="logits must be contiguous"):
            native.cross_entropy_forward(logits, target, -100, 0.0)
        with pytest.raises(ValueError, match=r"expected logits \(N, V\) and target \(N,\)"):
            native.cross_entropy_forward(logits.contiguous(), torch.zeros(5, dtype=torch.long), -100, 0.0)
        with pytest.raises(TypeError, match="target must be int32 or int64"):
            native.cross_entropy_forward(logits.contiguous(), target.float(), -100, 0.0)
