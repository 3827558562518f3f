"""The native backend (minipt._C): C++ kernels on CPU tensors, CUDA kernels on GPU tensors.

Each kernel is compared with the float64 reference on fresh random inputs and
awkward shapes, with every gradient, under ``poisoned_empty`` so that an output
element a kernel forgets to write shows up. The bindings are fed bad input
directly: each case must raise a Python exception that names the problem, never
crash. CUDA cases are skipped on a machine without a GPU.
"""

import math
import sys

import pytest
import torch

from minipt.ops._backend import BackendUnavailableError, native_module
from minipt.ops import (
    attention,
    attention_ref,
    cross_entropy,
    cross_entropy_ref,
    linear_cross_entropy,
    linear_cross_entropy_ref,
    mlm_mask,
)
from minipt.ops.attention import native_attention_forward
from minipt.ops.cross_entropy import _cross_entropy_native, native_cross_entropy_backward, native_cross_entropy_forward
from minipt.ops.linear_cross_entropy import _linear_cross_entropy_native
from minipt.ops.mlm_mask import _mlm_mask_native, native_mlm_mask_op
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


def ce_grads(fn, logits, target, weight):
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
    native_fn = lambda x, t: cross_entropy(x, t, backend="native", **kwargs)  # noqa: E731
    got, got_grad = ce_grads(native_fn, logits, target, weight)
    ref_fn = lambda x, t: cross_entropy_ref(x, t, **kwargs)  # noqa: E731
    want, want_grad = ce_grads(ref_fn, logits.double(), target, weight)
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
    native_fn = lambda x, t: cross_entropy(x, t, backend="native", **kwargs)  # noqa: E731
    torch_fn = lambda x, t: cross_entropy(x, t, backend="torch", **kwargs)  # noqa: E731
    got, got_grad = ce_grads(native_fn, logits, target, weight)
    ref, ref_grad = ce_grads(lambda x, t: cross_entropy_ref(x, t, **kwargs), logits.float(), target, weight)
    low, low_grad = ce_grads(torch_fn, logits, target, weight)
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
    want = cross_entropy_ref(logits.double(), target, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


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
    torch.library.opcheck(native_cross_entropy_forward, (logits.requires_grad_(), target, -100, 0.1))
    loss, lse = native_cross_entropy_forward(logits.detach(), target, -100, 0.1)
    torch.library.opcheck(native_cross_entropy_backward, (logits.detach(), target, lse, torch.rand(9), -100, 0.1))


def test_cross_entropy_under_torch_compile():
    logits, target = ce_inputs(17, 300, "cpu")

    def loss_fn(x, t):
        return _cross_entropy_native(x, t, ignore_index=-100, reduction="mean", label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    got, got_grad = ce_grads(compiled, logits, target, torch.tensor(1.0, dtype=torch.float64))
    want, want_grad = ce_grads(loss_fn, logits, target, torch.tensor(1.0, dtype=torch.float64))
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
            native_cross_entropy_forward(logits, target, -100, 0.0)
        with pytest.raises(ValueError, match=r"expected logits \(N, V\) and target \(N,\)"):
            native_cross_entropy_forward(logits.contiguous(), torch.zeros(5, dtype=torch.long), -100, 0.0)
        with pytest.raises(TypeError, match="target must be int32 or int64"):
            native_cross_entropy_forward(logits.contiguous(), target.float(), -100, 0.0)


# ----------------------------------------------------------------------------- linear cross-entropy
@pytest.fixture
def small_chunks(monkeypatch):
    """Force several logit chunks on small inputs, so the chunk loop and its accumulation are tested."""
    monkeypatch.setattr(sys.modules["minipt.ops.linear_cross_entropy"], "LOGITS_CHUNK_ELEMENTS", 16000)


def lce_inputs(N, D, V, device, dtype=torch.float32, bias=True):
    hidden = torch.randn(N, D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) / math.sqrt(D)).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    target = torch.randint(0, V, (N,), device=device)
    target[torch.rand(N, device=device) < 0.25] = -100
    return hidden, weight, b, target


def lce_grads(fn, hidden, weight, bias, target, weight_out):
    inputs = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias) if x is not None]
    loss = fn(inputs[0], inputs[1], inputs[2] if bias is not None else None, target)
    grads = torch.autograd.grad((loss.double() * weight_out).sum(), inputs)
    return loss.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,D,V", [(1, 8, 3), (37, 24, 501), (130, 16, 1000)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_fp32_matches_float64(
    device, N, D, V, reduction, label_smoothing, bias, small_chunks, poisoned_empty
):
    hidden, weight, b, target = lce_inputs(N, D, V, device, bias=bias)
    w = torch.randn(N if reduction == "none" else (), dtype=torch.float64, device=device)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    got, got_grads = lce_grads(
        lambda h, W, b, t: linear_cross_entropy(h, W, t, bias=b, backend="native", **kwargs),
        hidden, weight, b, target, w,
    )
    want, want_grads = lce_grads(
        lambda h, W, b, t: linear_cross_entropy_ref(h, W, t, bias=b, **kwargs),
        hidden.double(), weight.double(), None if b is None else b.double(), target, w,
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for name, g, ref in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_low_precision(device, dtype, reduction, small_chunks, poisoned_empty):
    hidden, weight, b, target = lce_inputs(45, 32, 700, device, dtype=dtype)
    w = torch.randn(45 if reduction == "none" else (), dtype=torch.float64, device=device)
    kwargs = dict(reduction=reduction, label_smoothing=0.1)

    def run(backend, *inputs):
        return lce_grads(
            lambda h, W, b, t: linear_cross_entropy(h, W, t, bias=b, backend=backend, **kwargs), *inputs, target, w
        )

    got, got_grads = run("native", hidden, weight, b)
    low, low_grads = run("torch", hidden, weight, b)
    ref, ref_grads = run("torch", hidden.float(), weight.float(), b.float())
    assert got.dtype == dtype
    assert_lowp_close(got, ref, low, what="loss")
    for name, g, r, lo in zip(("hidden", "weight", "bias"), got_grads, ref_grads, low_grads):
        assert g.dtype == dtype, name
        assert_lowp_close(g, r, lo, what=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_all_ignored_and_frozen_weight(device, small_chunks):
    hidden, weight, b, target = lce_inputs(20, 8, 600, device)
    hidden.requires_grad_()
    b.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, torch.full_like(target, -100), bias=b, backend="native")
    loss.backward()
    assert loss.item() == 0.0 and (hidden.grad == 0).all() and (b.grad == 0).all()
    assert weight.grad is None


def test_linear_cross_entropy_under_torch_compile(small_chunks):
    hidden, weight, b, target = lce_inputs(30, 16, 500, "cpu")

    def loss_fn(h, W, b, t):
        return _linear_cross_entropy_native(h, W, t, bias=b, ignore_index=-100, reduction="mean", label_smoothing=0.0)

    one = torch.tensor(1.0, dtype=torch.float64)
    got, got_grads = lce_grads(torch.compile(loss_fn), hidden, weight, b, target, one)
    want, want_grads = lce_grads(loss_fn, hidden, weight, b, target, one)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, ref in zip(got_grads, want_grads):
        torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-6)


@requires_cuda
def test_linear_cross_entropy_cuda_never_holds_the_full_logits():
    N, D, V = 4096, 256, 32768
    hidden, weight, b, target = lce_inputs(N, D, V, "cuda", dtype=torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, target, bias=b, backend="native").backward()
    torch.cuda.synchronize()
    full_logits = N * V * 2
    assert torch.cuda.max_memory_allocated() - base < full_logits, "peak memory reached the size of the full logits"


# ----------------------------------------------------------------------------- MLM masking
def mlm_inputs(shape, device, vocab=1000, id_dtype=torch.int64, special_dtype=torch.bool):
    ids = torch.randint(0, vocab, shape, device=device, dtype=id_dtype)
    special = (torch.rand(shape, device=device) < 0.2).to(special_dtype)
    return ids, special


def run_mlm(ids, special, vocab=1000, p=0.15, seed=0, mask_id=3):
    return mlm_mask(
        ids, mask_token_id=mask_id, vocab_size=vocab, special_tokens_mask=special, mlm_probability=p, seed=seed,
        backend="native",
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (64, 129)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("special_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, None])
def test_mlm_mask_contract(device, shape, id_dtype, special_dtype, poisoned_empty):
    ids, special = mlm_inputs(shape, device, id_dtype=id_dtype, special_dtype=special_dtype or torch.bool)
    special = special if special_dtype is not None else None
    before = ids.clone()
    masked, labels = run_mlm(ids, special, p=0.5, seed=11)
    assert torch.equal(ids, before), "input_ids was modified"
    assert masked.shape == ids.shape and labels.shape == ids.shape
    assert masked.dtype == id_dtype and labels.dtype == id_dtype
    selected = labels != -100
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    assert ((masked >= 0) & (masked < 1000)).all()
    if special is not None:
        assert not selected[special.bool()].any(), "a special token was selected"


@pytest.mark.parametrize("device", DEVICES)
def test_mlm_mask_statistics(device):
    # Deterministic for the seed; each bound is 5 standard deviations wide.
    n, vocab, p = 400_000, 10, 0.15
    ids = torch.full((n,), 7, device=device)  # 7 is neither the mask id nor rare among random ids
    special = torch.zeros(n, dtype=torch.bool, device=device)
    special[::10] = True
    masked, labels = run_mlm(ids, special, vocab=vocab, p=p, seed=123)
    selected = labels != -100
    candidates = n - int(special.sum())
    k = int(selected.sum())
    assert abs(k - p * candidates) < 5 * math.sqrt(candidates * p * (1 - p))
    # 80% become [MASK] (3), 10% a uniform random id (which is 3 one time in vocab), 10% stay 7.
    to_mask = 0.8 + 0.1 / vocab
    became_mask = int((masked[selected] == 3).sum())
    assert abs(became_mask - to_mask * k) < 5 * math.sqrt(k * to_mask * (1 - to_mask))
    counts = torch.bincount(masked[selected & (masked != 3)], minlength=vocab).double()
    for token in range(vocab):
        want = 0.0 if token == 3 else 0.1 * k / vocab + (0.1 * k if token == 7 else 0.0)
        assert abs(counts[token].item() - want) < 5 * math.sqrt(max(want, 1)), f"token {token}"


@pytest.mark.parametrize("device", DEVICES)
def test_mlm_mask_probability_edges(device):
    ids, special = mlm_inputs((50, 40), device)
    _, labels = run_mlm(ids, special, p=0.0)
    assert (labels == -100).all()
    _, labels = run_mlm(ids, special, p=1.0)
    assert torch.equal(labels != -100, ~special)


@pytest.mark.parametrize("device", DEVICES)
def test_mlm_mask_is_a_function_of_seed_and_index(device):
    ids, special = mlm_inputs((1000,), device)
    masked, labels = run_mlm(ids, special, seed=5)
    again = run_mlm(ids, special, seed=5)
    assert torch.equal(masked, again[0]) and torch.equal(labels, again[1])
    other = run_mlm(ids, special, seed=6)
    assert not torch.equal(labels, other[1])
    # Element i depends only on (seed, i): a prefix masks as the prefix of the whole.
    head = run_mlm(ids[:333], special[:333], seed=5)
    assert torch.equal(head[0], masked[:333]) and torch.equal(head[1], labels[:333])


def test_mlm_mask_cpu_is_identical_for_any_thread_count():
    ids, special = mlm_inputs((128, 512), "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_mlm(ids, special, seed=9)
        torch.set_num_threads(max(2, threads))
        many = run_mlm(ids, special, seed=9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@requires_cuda
def test_mlm_mask_cuda_gives_the_cpu_bits():
    ids, special = mlm_inputs((37, 515), "cpu", vocab=30522)
    cpu = run_mlm(ids, special, vocab=30522, seed=2**40 + 3)
    gpu = run_mlm(ids.cuda(), special.cuda(), vocab=30522, seed=2**40 + 3)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_mlm_mask_vocab_beyond_32_bits(device):
    vocab = 2**40
    ids = torch.zeros(20000, dtype=torch.int64, device=device)
    masked, labels = run_mlm(ids, None, vocab=vocab, p=1.0)
    random_ids = masked[(masked != 3) & (masked != 0)]
    assert random_ids.numel() > 1000
    assert random_ids.max().item() >= 2**32 and random_ids.max().item() < vocab


def test_philox_known_answers():
    # Random123's known-answer vectors for Philox4x32-10.
    assert _C.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = 0xFFFFFFFF
    assert _C.philox4x32_10((ones,) * 4, (ones, ones)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert _C.philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1,
    )


def test_mlm_mask_noncontiguous_input():
    ids, special = mlm_inputs((40, 60), "cpu")
    got = run_mlm(ids.t(), special.t(), seed=4)
    want = run_mlm(ids.t().contiguous(), special.t().contiguous(), seed=4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_mlm_mask_custom_op_passes_opcheck_and_compiles():
    ids, special = mlm_inputs((8, 33), "cpu")
    torch.library.opcheck(native_mlm_mask_op, (ids, special, 3, 1000, 0.15, 7))

    def mask_fn(ids, special):
        return _mlm_mask_native(
            ids, mask_token_id=3, vocab_size=1000, special_tokens_mask=special, mlm_probability=0.15, seed=7
        )

    got = torch.compile(mask_fn, fullgraph=True)(ids, special)
    want = mask_fn(ids, special)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class TestMlmMaskBindings:
    def call(self, **overrides):
        ids = torch.randint(0, 100, (10,))
        masked, labels = torch.empty_like(ids), torch.empty_like(ids)
        args = dict(
            input_ids=ids.data_ptr(), special=0, masked=masked.data_ptr(), labels=labels.data_ptr(), numel=10,
            id_size=8, special_size=0, mask_token_id=3, vocab_size=100, mlm_probability=0.15, seed=0, num_threads=1,
        )
        args.update(overrides)
        _C.mlm_mask_cpu(**args)
        return labels

    def test_valid_call_runs(self):
        assert ((self.call() == -100) | (self.call() >= 0)).all()

    @pytest.mark.parametrize(
        "overrides,message",
        [
            (dict(numel=-1), "numel must be >= 0"),
            (dict(id_size=2), "input_ids element size must be 4 or 8"),
            (dict(vocab_size=0), "vocab_size must be in"),
            (dict(id_size=4, vocab_size=2**31 + 1), "vocab_size must be in"),
            (dict(mask_token_id=100), "mask_token_id must be in"),
            (dict(mask_token_id=-1), "mask_token_id must be in"),
            (dict(mlm_probability=1.01), "mlm_probability must be in"),
            (dict(special=64, special_size=3), "special_tokens_mask element size must be 1, 4 or 8"),
            (dict(masked=0), "masked is a null pointer"),
            (dict(num_threads=0), "num_threads must be in"),
        ],
    )
    def test_bad_arguments_raise_value_error(self, overrides, message):
        with pytest.raises(ValueError, match=message):
            self.call(**overrides)

    def test_custom_op_refuses_bad_tensors(self):
        ids = torch.zeros(4, 6, dtype=torch.int64)
        with pytest.raises(ValueError, match="input_ids must be contiguous"):
            native_mlm_mask_op(ids.t(), None, 3, 10, 0.15, 0)
        with pytest.raises(TypeError, match="input_ids must be int32 or int64"):
            native_mlm_mask_op(ids.float(), None, 3, 10, 0.15, 0)
        with pytest.raises(ValueError, match="special_tokens_mask must have shape"):
            native_mlm_mask_op(ids, torch.zeros(4, dtype=torch.bool), 3, 10, 0.15, 0)


# ----------------------------------------------------------------------------- attention
def attention_inputs(B, H, T, D, device, dtype, lengths=None):
    q, k, v = (torch.randn(B, H, T, D, device=device).to(dtype) for _ in range(3))
    mask = None
    if lengths is not None:
        mask = torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return q, k, v, mask


def attention_grads(fn, q, k, v, grad_out):
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out.detach(), grads


# (B, H, T, lengths): awkward T around the 16-row blocks and 32-key tiles; lengths of
# 0 give rows with no visible key, a whole padded tile exercises the tile skip.
ATTENTION_CASES = [
    (1, 1, 1, None),
    (2, 3, 17, None),
    (2, 2, 100, [100, 37]),
    (3, 2, 129, [129, 64, 0]),
]


@requires_cuda
@pytest.mark.parametrize("B,H,T,lengths", ATTENTION_CASES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_cuda_fp32_matches_float64(B, H, T, lengths, D, is_causal, poisoned_empty):
    q, k, v, mask = attention_inputs(B, H, T, D, "cuda", torch.float32, lengths)
    grad_out = torch.randn(B, H, T, D, device="cuda", dtype=torch.float64)
    got, got_grads = attention_grads(
        lambda q, k, v: attention(q, k, v, is_causal=is_causal, attention_mask=mask, backend="native"),
        q, k, v, grad_out,
    )
    want, want_grads = attention_grads(
        lambda q, k, v: attention_ref(q, k, v, is_causal=is_causal, attention_mask=mask),
        q.double(), k.double(), v.double(), grad_out,
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for name, g, ref in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@requires_cuda
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("is_causal,lengths", [(False, [200, 77]), (True, None)])
def test_attention_cuda_low_precision(dtype, is_causal, lengths, poisoned_empty):
    q, k, v, mask = attention_inputs(2, 4, 200, 64, "cuda", dtype, lengths)
    grad_out = torch.randn_like(q, dtype=torch.float32)

    def run(backend, *inputs):
        return attention_grads(
            lambda q, k, v: attention(q, k, v, is_causal=is_causal, attention_mask=mask, backend=backend),
            *inputs, grad_out,
        )

    got, got_grads = run("native", q, k, v)
    low, low_grads = run("torch", q, k, v)
    ref, ref_grads = run("torch", q.float(), k.float(), v.float())
    assert got.dtype == dtype
    assert_lowp_close(got, ref, low, what="out")
    for name, g, r, lo in zip("qkv", got_grads, ref_grads, low_grads):
        assert_lowp_close(g, r, lo, what=f"grad {name}")


@requires_cuda
def test_attention_cuda_rows_without_keys_are_zero_with_zero_grads():
    q, k, v, mask = attention_inputs(2, 2, 40, 64, "cuda", torch.float32, [0, 40])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, attention_mask=mask, backend="native")
    out.sum().backward()
    assert (out[0] == 0).all() and torch.isfinite(out).all()
    for t in (q, k, v):
        assert (t.grad[0] == 0).all() and torch.isfinite(t.grad).all()


@requires_cuda
def test_attention_cuda_backward_is_deterministic():
    q, k, v, mask = attention_inputs(2, 3, 300, 128, "cuda", torch.bfloat16, [300, 123])
    grad_out = torch.randn_like(q)
    fn = lambda q, k, v: attention(q, k, v, is_causal=True, attention_mask=mask, backend="native")  # noqa: E731
    first = attention_grads(fn, q, k, v, grad_out)[1]
    second = attention_grads(fn, q, k, v, grad_out)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_cuda
def test_attention_cuda_custom_ops_pass_opcheck():
    q, k, v, mask = attention_inputs(1, 2, 33, 64, "cuda", torch.float32, [20])
    key_mask = mask.to(torch.uint8)
    torch.library.opcheck(native_attention_forward, (q.requires_grad_(), k, v, key_mask, True, 0.125))


def test_attention_cpu_tensors_are_refused():
    q, k, v, _ = attention_inputs(1, 1, 4, 64, "cpu", torch.float32)
    with pytest.raises(BackendUnavailableError, match="CUDA kernels only"):
        attention(q, k, v, backend="native")


@requires_cuda
@pytest.mark.parametrize("D", [32, 80])
def test_attention_other_head_dims_are_refused(D):
    q, k, v, _ = attention_inputs(1, 1, 4, D, "cuda", torch.float16)
    with pytest.raises(BackendUnavailableError, match=r"head dims \(64, 128\)"):
        attention(q, k, v, backend="native")


@requires_cuda
class TestCudaBindings:
    """CUDA bindings refuse host memory and bad shapes before any kernel can touch them."""

    def test_host_pointer_is_refused(self):
        logits, target = torch.randn(4, 10), torch.randint(0, 10, (4,))
        loss, lse = torch.empty(4, device="cuda"), torch.empty(4, device="cuda")
        with pytest.raises(ValueError, match="logits"):
            _C.cross_entropy_forward_cuda(
                logits=logits.data_ptr(), target=target.cuda().data_ptr(), loss=loss.data_ptr(), lse=lse.data_ptr(),
                n_rows=4, n_classes=10, dtype=0, target_size=8, ignore_index=-100, label_smoothing=0.0,
                stream=torch.cuda.current_stream().cuda_stream,
            )
        torch.cuda.synchronize()  # the context is still healthy

    def test_attention_head_dim_is_checked(self):
        q = torch.randn(1, 1, 4, 64, device="cuda")
        lse = torch.empty(1, 1, 4, device="cuda")
        with pytest.raises(ValueError, match="head_dim must be 64 or 128"):
            _C.attention_forward_cuda(
                q=q.data_ptr(), k=q.data_ptr(), v=q.data_ptr(), out=q.data_ptr(), lse=lse.data_ptr(), key_mask=0,
                batch=1, heads=1, seq_len=4, head_dim=96, dtype=0, is_causal=False, scale=0.1,
                stream=torch.cuda.current_stream().cuda_stream,
            )
