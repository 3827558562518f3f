"""What is particular to ``backend="native"``: the extension minipt._C and the custom ops around it.

The ops' results on every backend, native included, are tested in test_attention.py,
test_cross_entropy.py, test_linear_cross_entropy.py and test_mlm_mask.py. This file
holds what only the native backend has:

- the extension's raw entry points, fed good input (outputs poisoned first, results
  checked against float64) and bad input, which must raise a Python exception that
  names the argument, never crash;
- the custom ops' own checks, ``torch.library.opcheck`` and ``torch.compile``;
- what the backend refuses (float64, head dims other than 64 and 128 on CUDA);
- the CPU kernels' independence of the thread count, and CUDA cases the op files
  leave out (fp32 attention, the CUDA bindings' own checks).

CUDA cases are skipped on a machine without a GPU.
"""

import math

import pytest
import torch

from conftest import HAS_CUDA, assert_lowp_close, requires_cuda
from minipt.ops import attention, attention_ref, cross_entropy, cross_entropy_ref, linear_cross_entropy, mlm_mask
from minipt.ops._backend import BackendUnavailableError, native_module
from minipt.ops._loss import softcap_logits
from minipt.ops.attention import visible_keys
from minipt.ops.attention._common import document_spans

_C = native_module()
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
ops = torch.ops.minipt


def poisoned(*shape, dtype=torch.float32, device="cpu"):
    """An output buffer that shows every element a kernel leaves unwritten: NaN, or the dtype's max."""
    if dtype.is_floating_point:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def test_has_cuda_is_reported():
    assert isinstance(_C.has_cuda, bool)
    if HAS_CUDA:
        assert _C.has_cuda, "a CUDA machine needs the CUDA kernels built (nvcc at build time)"


# ----------------------------------------------------------------------------- cross-entropy
def ce_inputs(N, V, device, dtype=torch.float32, ignore_share=0.25):
    logits = (torch.randn(N, V, device=device) * 4).to(dtype)
    target = torch.randint(0, V, (N,), device=device)
    target[torch.rand(N, device=device) < ignore_share] = -100
    return logits, target


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_extreme_logits(device):
    # A huge offset (no overflow), a row far below its max (no underflow to NaN), and
    # a NaN logit, which gives a NaN loss as torch does. -inf logits: test_cross_entropy.py.
    N, V = 3, 3000
    logits = torch.randn(N, V, device=device, dtype=torch.float64)
    logits[0] += 1e4
    logits[1, 100:] = -1e30
    logits[2, 17] = math.nan
    target = torch.tensor([5, 3, 9], device=device)
    got = cross_entropy(logits.float(), target, reduction="none", backend="native")
    want = cross_entropy_ref(logits, target, reduction="none")
    torch.testing.assert_close(got[:2].double(), want[:2], rtol=1e-5, atol=1e-4)
    assert torch.isnan(got[2])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_cpu_softmax_is_exactly_zero_where_it_underflows(label_smoothing):
    """The C++ kernels take softmax as exactly 0 at -inf logits and wherever it is below float32's smallest
    normal (2^-126), in a row's vector body and its scalar tail alike: the gradient there is exactly
    -ε/V (0 without smoothing), and losses and gradients are float64's. A row whose target is -inf has
    torch's infinite loss and a finite gradient; with smoothing Σ x is -inf and every loss is +inf, as in torch."""
    N, V = 4, 1024 + 16 + 7  # past one 1024-column chunk, a 16-lane body and a 7-column tail
    logits = torch.randn(N, V, dtype=torch.float64) * 4
    far = torch.zeros(N, V, dtype=torch.bool)
    far[:, 3::5] = True  # a fifth of every row, tail columns included
    n_far = int(far.sum())
    logits[far] = torch.tensor([-math.inf, -1e30, -120.0, -90.0], dtype=torch.float64).repeat(n_far // 4 + 1)[:n_far]
    logits[3, 3] = -math.inf
    target = torch.tensor([0, 1, 1032, 3])  # row 3's target is that -inf column
    assert far[3, 3] and not far[torch.arange(3), target[:3]].any()
    x = logits.float().requires_grad_()
    loss = cross_entropy(x, target, reduction="none", label_smoothing=label_smoothing, backend="native")
    (grad,) = torch.autograd.grad(loss, x, torch.ones(N))
    x64 = logits.clone().requires_grad_()
    want = cross_entropy_ref(x64, target, reduction="none", label_smoothing=label_smoothing)
    (want_grad,) = torch.autograd.grad(want, x64, torch.ones(N, dtype=torch.float64))
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(loss)) and (loss[~finite] == math.inf).all()
    torch.testing.assert_close(loss[finite].double(), want[finite].detach(), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    off_target = far.clone()
    off_target[3, 3] = False
    # ε/V in float32, as the kernel forms it
    assert (grad[off_target] == -(torch.tensor(label_smoothing, dtype=torch.float32) / V)).all()


@pytest.mark.parametrize("kw", [{}, dict(softcap=5.0, z_loss=1e-2)], ids=["plain", "capped"])
def test_cross_entropy_cpu_is_identical_for_any_thread_count(kw):
    logits, target = ce_inputs(513, 777, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cross_entropy(logits, target, reduction="none", backend="native", **kw)
        torch.set_num_threads(max(2, threads))
        many = cross_entropy(logits, target, reduction="none", backend="native", **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_softcap_where_tanh_saturates(device):
    """Logits from 0 to ±2000 at softcap 30: the cap's tanh from its Taylor series (|x| < 7.5) through the
    exp form to exactly ±1, in a row's vector body and its scalar tail. Loss and gradient are float64's,
    the gradient exactly 0 where 1 - tanh² underflows; a NaN logit still gives a NaN loss."""
    N, V = 4, 1024 + 16 + 7
    logits = torch.linspace(-2000, 2000, N * V, dtype=torch.float64).reshape(N, V)
    logits = logits[:, torch.randperm(V)].contiguous()
    logits[0, :200] = torch.linspace(-8, 8, 200, dtype=torch.float64)  # around the series' edge, 1/4 of 30
    logits[3, 5] = math.nan
    target = torch.tensor([3, 100, V - 1, 0])
    x = logits.float().to(device).requires_grad_()
    kw = dict(reduction="none", label_smoothing=0.1, softcap=30.0, z_loss=1e-4)
    loss = cross_entropy(x, target.to(device), backend="native", **kw)
    (grad,) = torch.autograd.grad(loss[:3].sum(), x)
    x64 = logits.float().double().requires_grad_()
    want = cross_entropy_ref(x64, target, **kw)
    (want_grad,) = torch.autograd.grad(want[:3].sum(), x64)
    torch.testing.assert_close(loss[:3].double().cpu(), want[:3].detach(), rtol=1e-5, atol=1e-5)
    assert torch.isnan(loss[3])
    torch.testing.assert_close(grad[:3].double().cpu(), want_grad[:3], rtol=1e-4, atol=1e-7)
    assert (grad[:3][logits[:3].abs() > 1000] == 0).all()


@pytest.mark.parametrize("op", [cross_entropy, linear_cross_entropy])
def test_cross_entropy_float64_is_refused(op):
    logits, target = ce_inputs(3, 5, "cpu", dtype=torch.float64)
    args = (logits, target) if op is cross_entropy else (logits, torch.randn(7, 5, dtype=torch.float64), target)
    with pytest.raises(BackendUnavailableError, match=r"backend='native' supports float32, float16 and bfloat16"):
        op(*args, backend="native")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [(-100, 0.1, 0.0, 0.0), (-100, 0.1, 5.0, 1e-2)], ids=["plain", "capped"])
def test_cross_entropy_custom_ops_pass_opcheck(device, options):
    logits, target = ce_inputs(9, 130, device)
    torch.library.opcheck(ops.native_cross_entropy_fwd, (logits.requires_grad_(), target, *options))
    _, lse = ops.native_cross_entropy_fwd(logits.detach(), target, *options)
    grad_rows = torch.rand(9, device=device)
    torch.library.opcheck(ops.native_cross_entropy_bwd, (logits.detach(), target, lse, grad_rows, *options))


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_cross_entropy_under_torch_compile(op):
    """The native kernels stay opaque custom ops in the compiled graph, with the eager results and gradients."""
    hidden, target = ce_inputs(17, 32, "cpu")
    weight = torch.randn(300, 32) / 6
    target = target % 300

    def loss_fn(h, W):
        if op == "cross_entropy":
            return cross_entropy(h @ W.T, target, label_smoothing=0.1, backend="native")
        return linear_cross_entropy(h, W, target, label_smoothing=0.1, backend="native")

    def loss_and_grads(fn):
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, W)
        return loss.detach(), torch.autograd.grad(loss, (h, W))

    got, got_grads = loss_and_grads(torch.compile(loss_fn, fullgraph=True))
    want, want_grads = loss_and_grads(loss_fn)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


class TestCrossEntropyBindings:
    """The raw bindings compute into the buffers they are given and refuse bad arguments before touching memory."""

    N, V = 5, 10

    def setup_method(self):
        self.logits, self.target = ce_inputs(self.N, self.V, "cpu", ignore_share=0.3)
        self.target[0] = -100
        self.loss, self.lse = poisoned(self.N), poisoned(self.N)
        self.grad_rows = torch.randn(self.N)
        self.grad_logits = poisoned(self.N, self.V)

    def forward(self, **overrides):
        args = dict(
            logits=self.logits.data_ptr(), target=self.target.data_ptr(), loss=self.loss.data_ptr(),
            lse=self.lse.data_ptr(), n_rows=self.N, n_classes=self.V, dtype=0, target_size=8, ignore_index=-100,
            label_smoothing=0.1, softcap=0.0, z_loss=0.0, num_threads=1,
        )
        _C.cross_entropy_forward_cpu(**{**args, **overrides})

    def backward(self, **overrides):
        args = dict(
            logits=self.logits.data_ptr(), target=self.target.data_ptr(), lse=self.lse.data_ptr(),
            grad_rows=self.grad_rows.data_ptr(), grad_logits=self.grad_logits.data_ptr(), n_rows=self.N,
            n_classes=self.V, dtype=0, target_size=8, ignore_index=-100, label_smoothing=0.1, softcap=0.0,
            z_loss=0.0, num_threads=1,
        )
        _C.cross_entropy_backward_cpu(**{**args, **overrides})

    @pytest.mark.parametrize("options", [{}, dict(softcap=2.0, z_loss=0.05)], ids=["plain", "capped"])
    def test_valid_calls_write_loss_lse_and_gradient(self, options):
        self.forward(**options)
        self.backward(**options)
        x = self.logits.double().requires_grad_()
        want = cross_entropy_ref(x, self.target, reduction="none", label_smoothing=0.1, **options)
        (want_grad,) = torch.autograd.grad(want, x, self.grad_rows.double())
        torch.testing.assert_close(self.loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
        counted = self.target != -100  # an ignored row's lse is written but not computed
        assert torch.isfinite(self.lse).all()
        want_lse = torch.logsumexp(softcap_logits(x.detach(), options.get("softcap")), 1)
        torch.testing.assert_close(self.lse[counted].double(), want_lse[counted], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(self.grad_logits.double(), want_grad, rtol=1e-5, atol=1e-6)

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
            (dict(lse=0), "lse is a null pointer"),
            (dict(label_smoothing=1.5), "label_smoothing must be in"),
            (dict(label_smoothing=math.nan), "label_smoothing must be in"),
            (dict(softcap=-1.0), "softcap must be 0"),
            (dict(softcap=math.inf), "softcap must be 0"),
            (dict(softcap=math.nan), "softcap must be 0"),
            (dict(softcap=1e-45), "softcap must be 0"),
            (dict(z_loss=-1e-4), "z_loss must be a finite float32"),
            (dict(z_loss=math.inf), "z_loss must be a finite float32"),
            (dict(z_loss=1e39), "z_loss must be a finite float32"),
            (dict(num_threads=0), "num_threads must be in"),
            (dict(num_threads=5000), "num_threads must be in"),
        ],
    )
    def test_bad_forward_arguments_raise_value_error(self, overrides, message):
        with pytest.raises(ValueError, match=message):
            self.forward(**overrides)
        assert self.loss.isnan().all(), "a refused call wrote its output"

    @pytest.mark.parametrize(
        "overrides,message",
        [
            (dict(grad_rows=0), "grad_rows is a null pointer"),
            (dict(grad_logits=0), "grad_logits is a null pointer"),
            (dict(dtype=-1), "dtype code must be 0"),
            (dict(num_threads=0), "num_threads must be in"),
            (dict(softcap=math.nan), "softcap must be 0"),
            (dict(z_loss=-1.0), "z_loss must be a finite float32"),
        ],
    )
    def test_bad_backward_arguments_raise_value_error(self, overrides, message):
        with pytest.raises(ValueError, match=message):
            self.backward(**overrides)
        assert self.grad_logits.isnan().all(), "a refused call wrote its output"

    def test_misaligned_pointer(self):
        with pytest.raises(ValueError, match="logits address is not aligned to its 4-byte elements"):
            self.forward(logits=self.logits.data_ptr() + 2)

    def test_negative_pointer_is_a_type_error(self):
        with pytest.raises(TypeError):
            self.forward(logits=-8)

    def test_out_of_range_target_is_reported_not_read(self):
        target = torch.tensor([1, 10, -5, 2, 3])
        with pytest.raises(ValueError, match=r"2 target\(s\) outside \[0, 10\).*first at row 1"):
            self.forward(target=target.data_ptr())

    def test_custom_op_refuses_noncontiguous_and_bad_shapes(self):
        logits = torch.randn(10, 4).t()
        target = torch.zeros(4, dtype=torch.long)
        with pytest.raises(ValueError, match="logits must be contiguous"):
            ops.native_cross_entropy_fwd(logits, target, -100, 0.0)
        with pytest.raises(ValueError, match=r"expected logits \(N, V\) and target \(N,\)"):
            ops.native_cross_entropy_fwd(logits.contiguous(), torch.zeros(5, dtype=torch.long), -100, 0.0)
        with pytest.raises(TypeError, match="target must be int32 or int64"):
            ops.native_cross_entropy_fwd(logits.contiguous(), target.float(), -100, 0.0)
        lse = torch.zeros(4)
        with pytest.raises(ValueError, match="grad_rows must be float32 of shape"):
            ops.native_cross_entropy_bwd(logits.contiguous(), target, lse, torch.zeros(4).double(), -100, 0.0)


# ----------------------------------------------------------------------------- MLM masking
def mlm_inputs(shape, device, vocab=1000):
    ids = torch.randint(0, vocab, shape, device=device)
    special = torch.rand(shape, device=device) < 0.2
    return ids, special


def run_mlm(ids, special, vocab=1000, p=0.15, seed=0, mask_id=3):
    return mlm_mask(
        ids, mask_token_id=mask_id, vocab_size=vocab, special_tokens_mask=special, mlm_probability=p, seed=seed,
        backend="native",
    )


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


def test_philox_known_answers():
    # Random123's known-answer vectors for Philox4x32-10.
    assert _C.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = 0xFFFFFFFF
    assert _C.philox4x32_10((ones,) * 4, (ones, ones)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert _C.philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_mlm_mask_custom_op_passes_opcheck(device):
    ids, special = mlm_inputs((8, 33), device)
    torch.library.opcheck(ops.native_mlm_mask, (ids, special, 3, 1000, 0.15, 7))


class TestMlmMaskBindings:
    N, VOCAB = 64, 100

    def setup_method(self):
        self.ids = torch.randint(0, self.VOCAB, (self.N,))
        self.masked, self.labels = poisoned(self.N, dtype=torch.int64), poisoned(self.N, dtype=torch.int64)

    def call(self, **overrides):
        args = dict(
            input_ids=self.ids.data_ptr(), special=0, masked=self.masked.data_ptr(), labels=self.labels.data_ptr(),
            numel=self.N, id_size=8, special_size=0, mask_token_id=3, vocab_size=self.VOCAB, mlm_probability=0.5,
            seed=0, num_threads=1,
        )
        _C.mlm_mask_cpu(**{**args, **overrides})

    def test_valid_call_writes_every_element(self):
        self.call()
        selected = self.labels != -100
        assert selected.any() and not selected.all()
        assert torch.equal(self.labels[selected], self.ids[selected])
        assert torch.equal(self.masked[~selected], self.ids[~selected])
        assert ((self.masked >= 0) & (self.masked < self.VOCAB)).all()

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
            (dict(mlm_probability=math.nan), "mlm_probability must be in"),
            (dict(special=64, special_size=3), "special_tokens_mask element size must be 1, 4 or 8"),
            (dict(masked=0), "masked is a null pointer"),
            (dict(labels=0), "labels is a null pointer"),
            (dict(num_threads=0), "num_threads must be in"),
        ],
    )
    def test_bad_arguments_raise_value_error(self, overrides, message):
        with pytest.raises(ValueError, match=message):
            self.call(**overrides)
        assert (self.labels == torch.iinfo(torch.int64).max).all(), "a refused call wrote its output"

    def test_custom_op_refuses_bad_tensors(self):
        ids = torch.zeros(4, 6, dtype=torch.int64)
        with pytest.raises(ValueError, match="input_ids must be contiguous"):
            ops.native_mlm_mask(ids.t(), None, 3, 10, 0.15, 0)
        with pytest.raises(TypeError, match="input_ids must be int32 or int64"):
            ops.native_mlm_mask(ids.float(), None, 3, 10, 0.15, 0)
        with pytest.raises(ValueError, match="special_tokens_mask must have shape"):
            ops.native_mlm_mask(ids, torch.zeros(4, dtype=torch.bool), 3, 10, 0.15, 0)


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
@pytest.mark.parametrize("window_size", [None, (40, 9), (0, 0)])
def test_attention_cuda_fp32_matches_float64(B, H, T, lengths, D, is_causal, window_size, poisoned_empty):
    q, k, v, mask = attention_inputs(B, H, T, D, "cuda", torch.float32, lengths)
    grad_out = torch.randn(B, H, T, D, device="cuda", dtype=torch.float64)
    kw = dict(is_causal=is_causal, attention_mask=mask, window_size=window_size)
    got, got_grads = attention_grads(lambda q, k, v: attention(q, k, v, backend="native", **kw), q, k, v, grad_out)
    want, want_grads = attention_grads(
        lambda q, k, v: attention_ref(q, k, v, **kw), q.double(), k.double(), v.double(), grad_out,
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for name, g, ref in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [(-1, -1), (7, 3)])
def test_attention_custom_ops_pass_opcheck(device, window):
    q, k, v, mask = attention_inputs(1, 2, 33, 64, device, torch.float32, [20])
    key_mask = mask.to(torch.uint8)
    doc_span = document_spans(torch.tensor([[0] * 10 + [1] * 23], device=device))
    torch.library.opcheck(ops.native_attention_fwd,
                          (q.requires_grad_(), k, v, key_mask, doc_span, True, 0.125, *window))
    out, lse = ops.native_attention_fwd(q.detach(), k, v, key_mask, doc_span, True, 0.125, *window)
    grad_out = torch.randn(1, 33, 2, 64, device=device).transpose(1, 2)  # as the out view's gradient arrives
    torch.library.opcheck(ops.native_attention_bwd,
                          (grad_out, q.detach(), k, v, out, lse, key_mask, doc_span, True, 0.125, *window))


def test_attention_cpu_under_torch_compile():
    """The C++ kernels stay opaque custom ops in the compiled graph, with the eager results and gradients."""
    q, k, v, mask = attention_inputs(2, 2, 70, 24, "cpu", torch.float32, [70, 31])
    ids = torch.tensor([[0] * 30 + [1] * 40, [0] * 70])
    fn = lambda q, k, v: attention(  # noqa: E731
        q, k, v, is_causal=True, attention_mask=mask, document_ids=ids, window_size=(20, 0), backend="native")
    grad_out = torch.randn_like(q)
    got, got_grads = attention_grads(torch.compile(fn, fullgraph=True), q, k, v, grad_out)
    want, want_grads = attention_grads(fn, q, k, v, grad_out)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)


class TestAttentionCpuBindings:
    """The raw CPU bindings write every element of their outputs and refuse bad arguments before touching memory."""

    B, H, T, D = 3, 3, 200, 24  # enough work for the kernels to use their threads

    def setup_method(self):
        lengths = [self.T, 0, 77]
        self.q, self.k, self.v, mask = attention_inputs(self.B, self.H, self.T, self.D, "cpu", torch.float32, lengths)
        self.key_mask = mask.to(torch.uint8)
        self.out = poisoned(self.B, self.T, self.H, self.D)  # (B, T, H, D) memory
        self.lse = poisoned(self.B, self.H, self.T)
        self.grad_out = torch.randn(self.B, self.T, self.H, self.D)
        self.delta = poisoned(self.B, self.H, self.T)
        self.grads = [poisoned(self.B, self.T, self.H, self.D) for _ in range(3)]  # (B, T, H, D) memory, as out

    def call(self, kernel, **overrides):
        args = dict(
            q=self.q.data_ptr(), k=self.k.data_ptr(), v=self.v.data_ptr(), out=self.out.data_ptr(),
            lse=self.lse.data_ptr(), key_mask=self.key_mask.data_ptr(), doc_span=0, batch=self.B, heads=self.H,
            seq_len=self.T, head_dim=self.D, dtype=0, is_causal=True, scale=0.2, window_left=-1, window_right=-1,
            stride_b=self.H * self.T * self.D, stride_h=self.T * self.D, stride_t=self.D, num_threads=2,
        )
        if kernel == "backward":
            args.update(grad_out=self.grad_out.data_ptr(), delta=self.delta.data_ptr(),
                        grad_q=self.grads[0].data_ptr(), grad_k=self.grads[1].data_ptr(),
                        grad_v=self.grads[2].data_ptr())
        getattr(_C, f"attention_{kernel}_cpu")(**{**args, **overrides})

    # No window, and one of 30 keys back and 5 ahead (which causal masking overrides).
    WINDOWS = [(-1, -1), (30, 5)]

    @pytest.mark.parametrize("window", WINDOWS)
    def test_results_are_the_same_bits_for_any_thread_count(self, window):
        """The forward splits work by query block, the backward by head: no sum depends on the thread count."""
        results = []
        for num_threads in (1, 3):
            self.call("forward", num_threads=num_threads, window_left=window[0], window_right=window[1])
            self.call("backward", num_threads=num_threads, window_left=window[0], window_right=window[1])
            results.append([x.clone() for x in (self.out, self.lse, *self.grads)])
        for one, many in zip(*results):
            assert torch.equal(one, many)

    @pytest.mark.parametrize("window", WINDOWS)
    def test_valid_calls_write_out_lse_and_gradients(self, window):
        """Sequence 1 is all padding: its outputs and gradients are 0, its lse +inf."""
        self.call("forward", window_left=window[0], window_right=window[1])
        self.call("backward", window_left=window[0], window_right=window[1])
        mask = self.key_mask.bool()
        want, want_grads = attention_grads(
            lambda q, k, v: attention_ref(q, k, v, is_causal=True, attention_mask=mask, window_size=window, scale=0.2),
            self.q.double(), self.k.double(), self.v.double(), self.grad_out.double().transpose(1, 2),
        )
        torch.testing.assert_close(self.out.transpose(1, 2).double(), want, rtol=1e-5, atol=1e-5)
        scores = (self.q.double() @ self.k.double().transpose(-1, -2)) * 0.2
        visible = visible_keys(self.T, mask, True, "cpu", window_size=window)
        want_lse = scores.masked_fill(~visible, -math.inf).logsumexp(-1) / math.log(2)  # base 2
        want_lse[want_lse == -math.inf] = math.inf  # a row that sees no key (all of sequence 1)
        torch.testing.assert_close(self.lse.double(), want_lse, rtol=1e-5, atol=1e-5)
        assert (self.lse[1] == math.inf).all()
        for got, ref in zip(self.grads, want_grads):
            torch.testing.assert_close(got.transpose(1, 2).double(), ref, rtol=1e-5, atol=1e-5)
        assert not self.delta.isnan().any()

    @pytest.mark.parametrize("kernel", ["forward", "backward"])
    @pytest.mark.parametrize(
        "overrides,message",
        [
            (dict(dtype=3), "dtype code must be 0"),
            (dict(batch=-1), "batch, heads and seq_len must be >= 0"),
            (dict(head_dim=0), "head_dim must be >= 1"),
            (dict(seq_len=2**40, head_dim=2**30), "overflows int64"),
            (dict(seq_len=2**31), "seq_len must fit int32"),
            (dict(scale=math.inf), "scale must be finite"),
            (dict(window_left=-2), "window_left and window_right must be >= 0, or -1"),
            (dict(stride_t=-1), "the strides of q, k and v must be >= 0"),
            (dict(stride_b=2**62), "the strides of q, k and v overflows int64"),
            (dict(q=0), "q is a null pointer"),
            (dict(out=0), "out is a null pointer"),
            (dict(lse=0), "lse is a null pointer"),
            (dict(lse=2), "lse address is not aligned"),
            (dict(doc_span=2), "doc_span address is not aligned"),
            (dict(num_threads=0), "num_threads must be in"),
        ],
    )
    def test_bad_arguments_raise_value_error(self, kernel, overrides, message):
        with pytest.raises(ValueError, match=message):
            self.call(kernel, **overrides)
        assert self.out.isnan().all() and self.lse.isnan().all(), "a refused call wrote its output"
        assert all(g.isnan().all() for g in self.grads), "a refused call wrote its output"

    @pytest.mark.parametrize(
        "overrides,message",
        [
            (dict(grad_out=0), "grad_out is a null pointer"),
            (dict(grad_k=0), "grad_k is a null pointer"),
            (dict(delta=0), "delta is a null pointer"),
            (dict(dtype=1, grad_q=1), "grad_q address is not aligned to its 2-byte elements"),
        ],
    )
    def test_bad_backward_arguments_raise_value_error(self, overrides, message):
        with pytest.raises(ValueError, match=message):
            self.call("backward", **overrides)
        assert all(g.isnan().all() for g in self.grads), "a refused call wrote its output"

    def test_custom_op_refuses_bad_tensors(self):
        q, k, v = self.q, self.k, self.v
        with pytest.raises(ValueError, match="q, k and v must share strides with a contiguous last dimension"):
            ops.native_attention_fwd(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, None, False, 0.2,
                                     -1, -1)
        with pytest.raises(ValueError, match="q, k and v must share strides with a contiguous last dimension"):
            d_strided = [x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v)]
            ops.native_attention_fwd(*d_strided, None, None, False, 0.2, -1, -1)
        with pytest.raises(ValueError, match="key_mask must be uint8 of shape"):
            ops.native_attention_fwd(q, k, v, self.key_mask.bool(), None, False, 0.2, -1, -1)
        with pytest.raises(ValueError, match="doc_span must be int32 of shape"):
            ops.native_attention_fwd(q, k, v, None, torch.zeros(self.B, self.T, dtype=torch.int32), False, 0.2, -1,
                                     -1)


@requires_cuda
@pytest.mark.parametrize("D", [32, 80])
def test_attention_other_head_dims_are_refused(D):
    q, k, v, _ = attention_inputs(1, 1, 4, D, "cuda", torch.float16)
    with pytest.raises(BackendUnavailableError, match=r"head dims \(64, 128\)"):
        attention(q, k, v, backend="native")


@pytest.mark.parametrize("device", DEVICES)
def test_attention_float64_is_refused(device):
    q, k, v, _ = attention_inputs(1, 1, 4, 64, device, torch.float64)
    with pytest.raises(BackendUnavailableError, match="float32, float16 and bfloat16"):
        attention(q, k, v, backend="native")


@requires_cuda
class TestCudaBindings:
    """CUDA bindings refuse host memory and bad shapes before any kernel can touch them."""

    def test_host_pointer_is_refused(self):
        logits, target = torch.randn(4, 10), torch.randint(0, 10, (4,))
        loss, lse = poisoned(4, device="cuda"), poisoned(4, device="cuda")
        with pytest.raises(ValueError, match="logits"):
            _C.cross_entropy_forward_cuda(
                logits=logits.data_ptr(), target=target.cuda().data_ptr(), loss=loss.data_ptr(), lse=lse.data_ptr(),
                n_rows=4, n_classes=10, dtype=0, target_size=8, ignore_index=-100, label_smoothing=0.0,
                softcap=0.0, z_loss=0.0, stream=torch.cuda.current_stream().cuda_stream,
            )
        torch.cuda.synchronize()  # the context is still healthy
        assert loss.isnan().all()

    def test_softcap_and_z_loss_are_checked_like_the_cpu_ones(self):
        logits, target = ce_inputs(4, 10, "cuda")
        loss, lse = poisoned(4, device="cuda"), poisoned(4, device="cuda")
        args = dict(logits=logits.data_ptr(), target=target.data_ptr(), loss=loss.data_ptr(), lse=lse.data_ptr(),
                    n_rows=4, n_classes=10, dtype=0, target_size=8, ignore_index=-100, label_smoothing=0.0,
                    softcap=0.0, z_loss=0.0, stream=torch.cuda.current_stream().cuda_stream)
        for bad, message in ((dict(softcap=-1.0), "softcap must be 0"), (dict(z_loss=math.nan), "z_loss must be")):
            with pytest.raises(ValueError, match=message):
                _C.cross_entropy_forward_cuda(**{**args, **bad})
        torch.cuda.synchronize()
        assert loss.isnan().all()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_softcap_on_rows_that_start_off_16_bytes(self, dtype, poisoned_empty):
        """GPT-2's 50257 columns: each row starts at another offset in 16 bytes, so the capped forward and
        backward walk a scalar head, a vector body and a scalar tail; float64 (fp32) or the three-way rule."""
        N, V = 6, 50257
        logits = (torch.randn(N, V, device="cuda") * 8).to(dtype)
        target = torch.randint(0, V, (N,), device="cuda")
        target[1] = -100
        kw = dict(reduction="none", label_smoothing=0.1, softcap=30.0, z_loss=1e-4)

        def run(fn, x, **extra):
            x = x.detach().clone().requires_grad_()
            loss = fn(x, target, **kw, **extra)
            return loss.detach(), torch.autograd.grad(loss, x, torch.linspace(0.5, 1.5, N, device="cuda"))[0]

        loss, grad = run(cross_entropy, logits, backend="native")
        want_loss, want_grad = run(cross_entropy_ref, logits.double())
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
        if dtype == torch.float32:
            torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)
        else:
            assert_lowp_close(grad, run(cross_entropy_ref, logits.float())[1],
                              run(cross_entropy_ref, logits, upcast=False)[1], "grad")

    @pytest.mark.parametrize("head_dim, stride_t, message", [
        (96, 96, "head_dim must be 64 or 128"),
        (64, 128, r"q, k and v must be dense \(B, H, T, D\) here, got strides \(512, 512, 128, 1\)"),
    ])
    def test_attention_head_dim_and_layout_are_checked(self, head_dim, stride_t, message):
        q = torch.randn(1, 1, 8, 128, device="cuda")
        lse = torch.empty(1, 1, 4, device="cuda")
        with pytest.raises(ValueError, match=message):
            _C.attention_forward_cuda(
                q=q.data_ptr(), k=q.data_ptr(), v=q.data_ptr(), out=q.data_ptr(), lse=lse.data_ptr(), key_mask=0,
                doc_span=0, batch=1, heads=1, seq_len=4, head_dim=head_dim, dtype=0, is_causal=False, scale=0.1,
                window_left=-1, window_right=-1, stride_b=4 * stride_t, stride_h=4 * stride_t, stride_t=stride_t,
                stream=torch.cuda.current_stream().cuda_stream,
            )

    def test_mlm_mask_binding_checks_like_the_cpu_one(self):
        ids = torch.randint(0, 100, (10,), device="cuda")
        masked, labels = poisoned(10, dtype=torch.int64, device="cuda"), poisoned(10, dtype=torch.int64, device="cuda")
        with pytest.raises(ValueError, match="mask_token_id must be in"):
            _C.mlm_mask_cuda(
                input_ids=ids.data_ptr(), special=0, masked=masked.data_ptr(), labels=labels.data_ptr(), numel=10,
                id_size=8, special_size=0, mask_token_id=100, vocab_size=100, mlm_probability=0.15, seed=0,
                stream=torch.cuda.current_stream().cuda_stream,
            )
