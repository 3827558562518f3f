"""linear_cross_entropy against a float64 reference: loss and the gradients of hidden, weight and bias."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, TRITON_DEVICE, assert_lowp_close, assert_rounding_would_fail, requires_cuda
from minipt.ops import BackendUnavailableError, cross_entropy_ref, linear_cross_entropy, linear_cross_entropy_ref

# The package re-exports the function under the module's name, so fetch the module itself.
lce_module = importlib.import_module("minipt.ops.linear_cross_entropy")

BACKENDS = ["triton", "native"]
ALL_BACKENDS = ["torch", *BACKENDS]  # for behaviour every backend shares: errors, -inf logits
DEVICE = TRITON_DEVICE


# Both kernel backends run the one chunk loop and its one chunk policy, so patching
# the policy chunks every backend alike (test_small_chunks_reach_every_backend).
@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 rows at V = 4099 in float32, so every shape here spans several chunks and a ragged last one."""
    _set_chunk_budget(monkeypatch, 5 * 4099 * 4)


def _set_chunk_budget(monkeypatch, nbytes):
    """Every device's budget at once, so a test chunks alike wherever it runs."""
    monkeypatch.setattr(lce_module, "CHUNK_LOGITS_BYTES", dict.fromkeys(lce_module.CHUNK_LOGITS_BYTES, nbytes))
    monkeypatch.setattr(lce_module, "CHUNK_ROW_MULTIPLE", 1)


def make_inputs(N, D, V, with_bias, ignored, dtype=torch.float32):
    hidden = torch.randn(N, D, device=DEVICE).to(dtype)
    weight = (torch.randn(V, D, device=DEVICE) / D**0.5 * 3).to(dtype)
    bias = torch.randn(V, device=DEVICE).to(dtype) if with_bias else None
    target = torch.randint(0, V, (N,), device=DEVICE)
    if ignored == "some":
        target[::3] = -100
    elif ignored == "all":
        target[:] = -100
    return hidden, weight, bias, target


def loss_and_grads(fn, hidden, weight, bias, target, reduction, **kw):
    """The loss and the gradients of 3·loss (or Σ w_i·loss_i for 'none') for hidden, weight and bias."""
    inputs = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    b = inputs[2] if bias is not None else None
    loss = fn(inputs[0], inputs[1], target, bias=b, reduction=reduction, **kw)
    if reduction == "none":
        weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
        grads = torch.autograd.grad(loss, inputs, weights)
    else:
        grads = torch.autograd.grad(loss * 3, inputs)
    return loss.detach(), grads


def reference(hidden, weight, bias, target, reduction, **kw):
    b = bias.double() if bias is not None else None
    return loss_and_grads(linear_cross_entropy_ref, hidden.double(), weight.double(), b, target, reduction, **kw)


def assert_close_all(got, want, rtol=1e-5, atol=1e-5):
    loss, grads = got
    want_loss, want_grads = want
    torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=atol)
    for name, g, w in zip(("hidden", "weight", "bias"), grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


def assert_three_way(got, hidden, weight, bias, target, reduction, **kw):
    """conftest's rule for fp16/bf16, for the loss and every gradient."""
    up = [t.float() for t in (hidden, weight, bias)]
    ref_loss, ref_grads = loss_and_grads(linear_cross_entropy_ref, *up, target, reduction, **kw)
    low = loss_and_grads(linear_cross_entropy_ref, hidden, weight, bias, target, reduction, upcast=False, **kw)
    # The loss is float32, but of logits rounded to the inputs' dtype, which the float32 reference leaves
    # unrounded: the rule's atol is that dtype's (test_loss_of_16_bit_inputs_is_float32 checks the loss).
    got = (got[0].to(hidden.dtype), *got[1])
    named = zip(("loss", "hidden", "weight", "bias"), got, (ref_loss, *ref_grads), (low[0], *low[1]))
    for name, g, ref, lo in named:
        assert_lowp_close(g, ref, lo, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, D, V", [(1, 8, 41), (7, 16, 1000), (33, 24, 4099)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("ignored, label_smoothing", [("none", 0.0), ("some", 0.1), ("all", 0.1)])
def test_matches_float64_reference(backend, N, D, V, reduction, with_bias, ignored, label_smoothing, small_chunks, poisoned_empty):
    hidden, weight, bias, target = make_inputs(N, D, V, with_bias, ignored)
    kw = dict(label_smoothing=label_smoothing)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, reduction, backend=backend, **kw)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    assert_close_all(got, reference(hidden, weight, bias, target, reduction, **kw))
    if ignored == "all":
        assert (got[0] == 0).all() and all((g == 0).all() for g in got[1])


# Soft-capped at 2 (logits of standard deviation about 3: tanh bends and saturates), with a z term and
# label smoothing.
CAPPED = dict(softcap=2.0, z_loss=1e-2, label_smoothing=0.1)


def loss_z_and_grads(fn, hidden, weight, bias, target, reduction, **kw):
    """loss_and_grads with ``return_z_loss``: the loss, the z term and the gradients."""
    z_terms = []

    def with_z(*args, **kwargs):
        loss, z = fn(*args, return_z_loss=True, **kwargs)
        assert not z.requires_grad and z.shape == loss.shape and z.dtype == loss.dtype
        z_terms.append(z)
        return loss

    loss, grads = loss_and_grads(with_z, hidden, weight, bias, target, reduction, **kw)
    return loss, z_terms[0], grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, D, V", [(1, 8, 41), (33, 24, 4099)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("with_bias, ignored", [(True, "some"), (False, "some"), (True, "all")])
def test_softcap_and_z_loss_match_float64_reference(backend, N, D, V, reduction, with_bias, ignored, small_chunks,
                                                    poisoned_empty):
    """Loss, z term and the gradients of hidden, weight and bias over several chunks, against float64."""
    hidden, weight, bias, target = make_inputs(N, D, V, with_bias, ignored)
    loss, z, grads = loss_z_and_grads(linear_cross_entropy, hidden, weight, bias, target, reduction, backend=backend,
                                      **CAPPED)
    b = bias.double() if bias is not None else None
    want_loss, want_z, want_grads = loss_z_and_grads(
        linear_cross_entropy_ref, hidden.double(), weight.double(), b, target, reduction, **CAPPED)
    assert loss.dtype == z.dtype == torch.float32
    assert_close_all((loss, grads), (want_loss, want_grads))
    torch.testing.assert_close(z.double(), want_z, rtol=1e-5, atol=1e-7)
    if (target == -100).all():
        assert loss.abs().sum() == 0 and z.abs().sum() == 0 and all((g == 0).all() for g in grads)
    else:
        assert z.abs().sum() > 1e-3 * loss.abs().sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softcap_and_z_loss_low_precision_three_way(backend, dtype, small_chunks, poisoned_empty):
    """16-bit inputs, capped and with a z term: the float32 loss is the float64 one of the same 16-bit logits
    to 1e-5, and every gradient is within the three-way rule."""
    hidden, weight, bias, target = make_inputs(33, 64, 4099, True, "some", dtype)
    loss, z, grads = loss_z_and_grads(linear_cross_entropy, hidden, weight, bias, target, "none", backend=backend,
                                      **CAPPED)
    assert loss.dtype == z.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    logits = F.linear(hidden, weight, bias)  # (N, V) in dtype, as every backend computes them
    want, want_z = cross_entropy_ref(logits.double(), target, reduction="none", return_z_loss=True, **CAPPED)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), want_z, rtol=1e-5, atol=1e-7)
    assert_three_way((loss, grads), hidden, weight, bias, target, "none", **CAPPED)


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_term_under_autocast_is_that_of_the_cast_inputs(backend, small_chunks):
    """Autocast casts the inputs and calls the op again: the options, return_z_loss included, go along."""
    hidden, weight, bias, target = make_inputs(17, 32, 1000, True, "some")
    with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16):
        loss, z = linear_cross_entropy(hidden, weight, target, bias=bias, backend=backend, return_z_loss=True,
                                       **CAPPED)
    cast = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    want, want_z = linear_cross_entropy(*cast[:2], target, bias=cast[2], backend=backend, return_z_loss=True,
                                        **CAPPED)
    assert torch.equal(loss, want) and torch.equal(z, want_z) and z.item() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_low_precision_three_way(backend, dtype, reduction, small_chunks, poisoned_empty):
    """|kernel - ref_fp32| <= 2·|torch in dtype - ref_fp32| + atol, for the loss and every gradient."""
    hidden, weight, bias, target = make_inputs(33, 64, 4099, True, "some", dtype)
    kw = dict(label_smoothing=0.1)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, reduction, backend=backend, **kw)
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1])
    assert_three_way(got, hidden, weight, bias, target, reduction, **kw)


# The chunk GEMMs run on torch and the cross-entropy kernels use no tl.dot (whose
# bf16 form the interpreter gets wrong), so bf16 runs in the interpreter as well as on CUDA.
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_loss_of_16_bit_inputs_is_float32(backend, dtype, reduction, small_chunks, poisoned_empty):
    """The loss of fp16/bf16 hidden and weight is float32, equal to the float64 cross-entropy of the same
    16-bit logits to 1e-5, which a loss rounded to 16 bits misses, over several chunks (10 rows each). The
    gradients keep their inputs' dtype, within the three-way rule."""
    hidden, weight, bias, target = make_inputs(33, 24, 4099, True, "some", dtype)
    kw = dict(label_smoothing=0.1)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, reduction, backend=backend, **kw)
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1])
    logits = F.linear(hidden, weight, bias)  # (N, V) in dtype, as every backend computes them
    want = cross_entropy_ref(logits.double(), target, reduction=reduction, **kw)
    assert_rounding_would_fail(want, dtype, rtol=1e-5)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=0)
    assert_three_way(got, hidden, weight, bias, target, reduction, **kw)


def torch_under_autocast(hidden, weight, target, *, bias, reduction, label_smoothing):
    """What a model without minipt's op computes: an LM head's logits, then ``F.cross_entropy``."""
    return F.cross_entropy(F.linear(hidden, weight, bias), target, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_autocast_loss_is_float32_as_torch_gives_it(backend, reduction, small_chunks, poisoned_empty):
    """A Linear's float32 parameters under bf16 autocast, as training runs the LM head: the loss is what
    ``F.cross_entropy`` of the Linear's logits gives under the same autocast, float32 to 1e-5; the float32
    gradients are within the three-way rule of torch's own under autocast."""
    N, D, V = 33, 48, 4099
    layer = torch.nn.Linear(D, V, device=DEVICE)
    inputs = (torch.randn(N, D, device=DEVICE) * 3, layer.weight.detach(), layer.bias.detach())
    target = torch.randint(0, V, (N,), device=DEVICE)
    target[::3] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        loss, grads = loss_and_grads(linear_cross_entropy, *inputs, target, backend=backend, **kw)
        want_loss, want_grads = loss_and_grads(torch_under_autocast, *inputs, target, **kw)
    assert loss.dtype == want_loss.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in (*grads, *want_grads))
    assert_rounding_would_fail(want_loss, torch.bfloat16, rtol=1e-5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    _, ref_grads = reference(*[t.to(torch.bfloat16) for t in inputs], target, **kw)
    for name, g, ref, low in zip(("hidden", "weight", "bias"), grads, ref_grads, want_grads):
        # bf16 gradients cast to their float32 inputs' dtype: the rule's atol is bf16's
        assert_lowp_close(g.to(torch.bfloat16), ref, low, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_chunks_reach_every_backend(backend, small_chunks, monkeypatch):
    """The fixtures patch the one chunk policy: each backend's per-chunk kernel runs once per chunk."""
    calls = []
    kernel = lce_module.CHUNK_CROSS_ENTROPY[backend]
    monkeypatch.setitem(lce_module.CHUNK_CROSS_ENTROPY, backend, lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    hidden, weight, bias, target = make_inputs(33, 8, 4099, True, "some")
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, "none", backend=backend)
    assert calls == [5] * 6 + [3] * 1 + [5] * 6 + [3], "forward, then the backward's recomputation, 5 rows a chunk"
    assert_close_all(got, reference(hidden, weight, bias, target, "none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_cpu_chunks_share_one_buffer_for_logits_and_gradient(dtype, small_chunks, poisoned_empty, monkeypatch):
    """On the CPU every chunk's logits and their gradient live in one buffer: the gradient is written over
    the logits, and the ragged last chunk reuses the buffer's first rows. The results stay the reference's."""
    buffers = []
    kernel = lce_module.CHUNK_CROSS_ENTROPY["native"]

    def recording(logits, *args):
        loss, lse, grad = kernel(logits, *args)
        buffers.append((logits.data_ptr(), grad.data_ptr()))
        return loss, lse, grad

    monkeypatch.setitem(lce_module.CHUNK_CROSS_ENTROPY, "native", recording)
    hidden, weight, bias, target = (t.cpu() for t in make_inputs(33, 16, 4099, True, "some", dtype))
    kw = dict(label_smoothing=0.1)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, "mean", backend="native", **kw)
    rows = 5 * 4 // dtype.itemsize  # small_chunks: 5 rows of float32, 10 of bfloat16
    assert len(buffers) == -(-33 // rows) and len(set(buffers)) == 1 and buffers[0][0] == buffers[0][1]
    if dtype == torch.float32:
        assert_close_all(got, reference(hidden, weight, bias, target, "mean", **kw))
    else:
        assert_three_way(got, hidden, weight, bias, target, "mean", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("softcap, z_loss", [(0.0, 0.0), (5.0, 1e-2)])
def test_native_cpu_gradient_in_place_is_the_gradient_out_of_place(dtype, softcap, z_loss):
    """The C++ backward may write over its logits: bit for bit what it writes into a separate buffer, with
    label smoothing, ignored rows and -inf columns, on enough rows to run in parallel, capped or not (the
    capped kernel reads the target's logit for its 1 - tanh² before the row is overwritten)."""
    from minipt.ops.cross_entropy import native_cross_entropy_backward, native_forward_of_checked_targets

    N, V = 64, 4099
    logits = (torch.randn(N, V) * 3).to(dtype)
    logits[:, :50] = float("-inf")
    target = torch.randint(50, V, (N,))
    target[::5] = -100
    grad_scale = torch.tensor(0.25)
    options = (-100, 0.1, softcap, z_loss)
    _, lse = native_forward_of_checked_targets(logits, target, *options)
    want = native_cross_entropy_backward(logits, target, lse, grad_scale.expand(N).contiguous(), *options)
    buffer = logits.clone()
    _, _, got = lce_module._chunk_cross_entropy_native(buffer, target, options, grad_scale)
    assert got.data_ptr() == buffer.data_ptr()
    assert torch.equal(got, want)
    if softcap:  # and the gradient is the capped one
        x = logits.double().requires_grad_()
        rows = cross_entropy_ref(x, target, reduction="none", label_smoothing=0.1, softcap=softcap, z_loss=z_loss)
        (ref,) = torch.autograd.grad(rows, x, torch.full((N,), 0.25, dtype=torch.float64))
        torch.testing.assert_close(got.double(), ref, rtol=torch.finfo(dtype).eps * 2, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_are_checked_once_a_call_not_once_a_chunk(backend, small_chunks, monkeypatch):
    ce_module = importlib.import_module("minipt.ops.cross_entropy")
    checks = []
    for module in (lce_module, ce_module):
        check = module.check_targets
        monkeypatch.setattr(module, "check_targets", lambda *a, check=check: checks.append(a[0]) or check(*a))
    hidden, weight, bias, target = make_inputs(33, 8, 4099, True, "some")
    loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, "mean", backend=backend)
    assert checks == ["linear_cross_entropy"]  # 7 chunks, forward and backward


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_sums_over_chunks_stay_float32(backend, monkeypatch):
    """bf16, 256 one-row chunks summed into grad_weight and grad_bias: as close to float64 as one chunk,
    and within the three-way rule.

    A bf16 running sum failed the rule by 3-9x; products rounded to bf16 before
    reaching the float32 sum raised the one-row chunks' mean error by 5-22%.
    """
    dtype = torch.bfloat16
    hidden, weight, bias, target = make_inputs(256, 16, 41, True, "none", dtype)
    grads = {}
    for rows in (256, 1):
        _set_chunk_budget(monkeypatch, rows * 41 * 2)
        _, grads[rows] = loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, "sum", backend=backend)
    _, want = reference(hidden, weight, bias, target, "sum")
    for name, one, many, w in zip(("hidden", "weight", "bias"), grads[256], grads[1], want):
        err_one, err_many = (one.double() - w).abs(), (many.double() - w).abs()
        assert err_many.mean() <= 1.02 * err_one.mean(), f"{name}: mean error {err_many.mean():.3g} vs {err_one.mean():.3g}"
        assert err_many.max() <= 1.02 * err_one.max(), f"{name}: max error {err_many.max():.3g} vs {err_one.max():.3g}"
    _, ref = loss_and_grads(linear_cross_entropy_ref, hidden.float(), weight.float(), bias.float(), target, "sum")
    _, low = loss_and_grads(linear_cross_entropy_ref, hidden, weight, bias, target, "sum", upcast=False)
    for name, got, r, lo in zip(("hidden", "weight", "bias"), grads[1], ref, low):
        assert_lowp_close(got, r, lo, name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_bias_masks_vocabulary_rows(backend, dtype, small_chunks, poisoned_empty):
    """A -inf bias masks a vocabulary row (padded vocabularies): finite losses as torch's, and no gradient
    reaches the masked rows of weight and bias."""
    hidden, weight, bias, target = make_inputs(13, 16, 300, True, "some", dtype)
    masked = torch.zeros(300, dtype=torch.bool, device=DEVICE)
    masked[-20:] = True
    masked[:64] = True  # a leading run of masked columns as well as a trailing one
    bias[masked] = float("-inf")
    target[target >= 0] = torch.randint(64, 280, (int((target >= 0).sum()),), device=DEVICE)
    loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, "mean", backend=backend)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][masked] == 0).all() and (grads[2][masked] == 0).all()
    if dtype == torch.float32:
        assert_close_all((loss, grads), reference(hidden, weight, bias, target, "mean"))
    else:
        assert_three_way((loss, grads), hidden, weight, bias, target, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    hidden = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(41, 8, device=DEVICE, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert linear_cross_entropy(hidden, weight, target, reduction="none", backend=backend).shape == (0,)
    loss = linear_cross_entropy(hidden, weight, target, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8) and (weight.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_inputs_require_grad_and_no_grad_mode(backend, small_chunks):
    hidden, weight, bias, target = make_inputs(11, 8, 300, True, "some")
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, target, bias=bias, backend=backend)
    (grad,) = torch.autograd.grad(loss, h)
    h64 = hidden.double().requires_grad_()
    want_loss = linear_cross_entropy_ref(h64, weight.double(), target, bias=bias.double())
    (want,) = torch.autograd.grad(want_loss, h64)
    torch.testing.assert_close(loss.double(), want_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        plain = linear_cross_entropy(h, weight.requires_grad_(), target, bias=bias, backend=backend)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, loss.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_backward_through_one_call_is_refused(backend, small_chunks):
    """The first backward scales the forward's gradients in place (they are held once, not twice), so a
    second one through the same call is a named error rather than gradients scaled twice; "none" recomputes."""
    hidden, weight, bias, target = make_inputs(11, 8, 300, True, "some")
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, target, bias=bias, backend=backend) * 3
    (first,) = torch.autograd.grad(loss, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="linear_cross_entropy: backward ran twice through one call"):
        torch.autograd.grad(loss, h)
    (want,) = torch.autograd.grad(linear_cross_entropy_ref(h, weight, target, bias=bias) * 3, h)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)
    rows = linear_cross_entropy(h, weight, target, bias=bias, reduction="none", backend=backend).sum()
    twice = [torch.autograd.grad(rows, h, retain_graph=True)[0] for _ in range(2)]
    torch.testing.assert_close(twice[0], twice[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_linear_layer_in_the_autocast_dtype(backend, small_chunks):
    """float32 parameters under bf16 autocast, as training runs the LM head: the same as casting by hand."""
    hidden, weight, bias, target = make_inputs(17, 32, 1000, True, "some")
    with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16):
        loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, "mean", backend=backend)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    cast = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    want_loss, want_grads = loss_and_grads(linear_cross_entropy, *cast, target, "mean", backend=backend)
    torch.testing.assert_close(loss, want_loss.float(), rtol=0, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)
    ref = linear_cross_entropy_ref(*[t.double() for t in cast[:2]], target, bias=cast[2].double())
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_hidden_and_weight(backend, small_chunks, poisoned_empty):
    N, D, V = 13, 16, 1000
    hidden = torch.randn(D, N, device=DEVICE).t()
    weight = (torch.randn(V, 2 * D, device=DEVICE) / 2)[:, ::2]
    target = torch.randint(0, V, (2 * N,), device=DEVICE)[::2]
    assert not (hidden.is_contiguous() or weight.is_contiguous() or target.is_contiguous())
    got = loss_and_grads(linear_cross_entropy, hidden, weight, None, target, "sum", backend=backend)
    assert_close_all(got, reference(hidden, weight, None, target, "sum"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_chunking_bounds_the_chunk_logits(device):
    device = torch.device(device)  # the policy only: nothing is allocated on the device
    budget = lce_module.CHUNK_LOGITS_BYTES[device.type]
    if device.type == "cuda":
        assert lce_module._chunk_rows(16384, 50304, torch.bfloat16, device) == 2624
    assert lce_module._chunk_rows(100, 50304, torch.bfloat16, device) == 100
    assert lce_module._chunk_rows(10**6, 10**7, torch.float32, device) == lce_module.CHUNK_ROW_MULTIPLE
    for N, V, dtype in ((16384, 50304, torch.bfloat16), (8192, 128256, torch.float32)):
        rows = lce_module._chunk_rows(N, V, dtype, device)
        assert rows * V * torch.finfo(dtype).bits // 8 <= budget
        assert rows % lce_module.CHUNK_ROW_MULTIPLE == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, dict(softcap=3.0, z_loss=1e-2)], ids=["plain", "capped"])
def test_torch_compile_fullgraph_matches_eager(backend, kw, small_chunks):
    def fn(h, w, t):
        return linear_cross_entropy(torch.tanh(h), w, t, label_smoothing=0.1, backend=backend, **kw) * 2

    hidden, weight, _, target = make_inputs(9, 8, 300, False, "some")
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    compiled = torch.compile(fn, fullgraph=True)
    loss = compiled(h, w, target)
    grads = torch.autograd.grad(loss, (h, w))
    want = fn(h, w, target)
    want_grads = torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(loss, want)
    for g, wg in zip(grads, want_grads):
        torch.testing.assert_close(g, wg)
    if DEVICE == "cuda":
        return  # a device-side assert would end the CUDA context; the CPU run checks it
    bad = target.clone()
    bad[1] = 300  # the device-side range assert stays in the compiled graph
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy: target values must be in \[0, 300\)"):
        compiled(h, w, bad)


@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_peak_memory_is_a_quarter_of_unfused(backend):
    """The LM-head size of the benchmark: N = 16384, D = 768, V = 50304, bf16."""
    N, D, V = 16384, 768, 50304
    hidden = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, D, device="cuda") / D**0.5).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, V, (N,), device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn(hidden, weight, target)
        torch.autograd.grad(loss, (hidden, weight))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = peak(lambda h, w, t: linear_cross_entropy(h, w, t, backend=backend))
    unfused = peak(lambda h, w, t: linear_cross_entropy_ref(h, w, t, upcast=False))
    assert fused <= 0.25 * unfused, f"fused peak {fused / 2**20:.0f} MiB vs unfused {unfused / 2**20:.0f} MiB"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda: (torch.randn(3, 4), torch.randn(7, 5), torch.tensor([0, 1, 2]), None), ValueError, "weight must have shape"),
        (lambda: (torch.randn(3, 4), torch.randn(7, 4).double(), torch.tensor([0, 1, 2]), None), TypeError, "weight has dtype"),
        (lambda: (torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2]), torch.randn(6)), ValueError, "bias must have shape"),
        (lambda: (torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2]), torch.randn(7).double()), TypeError, "bias has dtype"),
        (lambda: (torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1]), None), ValueError, "target must have shape"),
        (lambda: (torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0.0, 1.0, 2.0]), None), TypeError, "target must have dtype"),
        (lambda: (torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2], dtype=torch.int16), None), TypeError, "target must have dtype"),
        (lambda: (torch.randn(3, 4, 1), torch.randn(7, 4), torch.tensor([0, 1, 2]), None), ValueError, "hidden must have 2"),
        (lambda: (torch.randn(3, 4), torch.randn(7), torch.tensor([0, 1, 2]), None), ValueError, "weight must have 2"),
        (lambda: (torch.randn(3, 4), torch.randn(0, 4), torch.tensor([-100, -100, -100]), None), ValueError, "at least one row"),
        (lambda: (torch.randint(0, 3, (3, 4)), torch.randn(7, 4), torch.tensor([0, 1, 2]), None), TypeError, "dtype"),
    ],
)
def test_bad_input_is_named(backend, make, exc, pattern):
    hidden, weight, target, bias = (t.to(DEVICE) if t is not None else None for t in make())
    with pytest.raises(exc, match=pattern):
        linear_cross_entropy(hidden, weight, target, bias=bias, backend=backend)


# On CUDA an out-of-range target is a device-side assert, which ends the process's
# CUDA context, so these cases run on the CPU: Triton there needs the interpreter.
CPU_BACKENDS = [
    "torch", "native", pytest.param("triton", marks=pytest.mark.skipif(HAS_CUDA, reason="the interpreter is off"))
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target", [[0, 7, 2], [-1, 0, 2], [-100, 2**30, 1]])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_out_of_range_targets_fail_the_device_assert(backend, target, dtype):
    """The range check is an assert on the device, never a host sync; on the CPU it raises at once."""
    pattern = r"linear_cross_entropy: target values must be in \[0, 7\) or equal ignore_index=-100"
    with pytest.raises(RuntimeError, match=pattern):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4), torch.tensor(target, dtype=dtype), backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(reduction="avg"), ValueError, "reduction must be"),
        (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
        (dict(ignore_index="x"), TypeError, "ignore_index must be an int"),
        (dict(softcap=0.0), ValueError, "softcap must be a positive finite float"),
        (dict(softcap=float("nan")), ValueError, "softcap must be a positive finite float"),
        (dict(softcap=-30), ValueError, "softcap must be a positive finite float"),
        (dict(z_loss=-1e-4), ValueError, "z_loss must be a finite float >= 0"),
        (dict(z_loss=float("inf")), ValueError, "z_loss must be a finite float >= 0"),
        (dict(return_z_loss=1), TypeError, "return_z_loss must be a bool"),
    ],
)
def test_bad_options_are_named(backend, kwargs, exc, pattern):
    hidden, weight, _, target = make_inputs(3, 4, 7, False, "none")
    with pytest.raises(exc, match=pattern):
        linear_cross_entropy(hidden, weight, target, backend=backend, **kwargs)


def test_triton_outside_interpreter_on_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend='triton'"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2]), backend="triton")
