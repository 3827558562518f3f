"""attention's sliding window (``window_size=(left, right)``) against the float64 reference, on every backend.

Query i sees keys i - left <= j <= i + right, -1 leaving a side unbounded. The cases
cross the Triton interpreter's 16- and 32-row blocks and the C++ kernels' 64-row
tiles with windows of 0, 1, a few keys, and more than T, alone and combined with
causal masking, key padding and packed documents; every gradient is compared, on
outputs allocated poisoned. The tiles outside a window are poisoned too: NaN there
must reach no output of the C++ kernels; test_attention_tiles.py shows that the
Triton kernels read exactly the tiles that ``attention_tiles`` counts, windows
included. The helpers are test_attention.py's.
"""

import pytest
import torch

from conftest import TRITON_DEVICE, TRITON_SWEEP, requires_cuda
from minipt.ops import attention
from minipt.ops._backend import native_module
from minipt.ops.attention import visible_keys
from minipt.ops.attention._common import window_bounds
from test_attention import check_against_reference, forward_backward, make_document_ids, make_mask, make_qkv

# (backend, the device its op tests run on); "torch" is the reference in the input dtype.
BACKENDS = [pytest.param("torch", "cpu", id="torch"), pytest.param("triton", TRITON_DEVICE, id="triton"),
            pytest.param("native", "cpu", id="native-cpu")]
SWEEP_BACKENDS = [BACKENDS[0], TRITON_SWEEP, BACKENDS[2]]  # interpreted Triton: the whole suite only
# Windows for T in 1..100: a query alone, one key either side, a few keys, one side unbounded, wider than T.
WINDOWS = [(0, 0), (1, 0), (0, 1), (5, 3), (-1, 4), (9, -1), (150, 1), (200, 200)]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("window_size", WINDOWS, ids=str)
@pytest.mark.parametrize("T", [1, 17, 100])
@pytest.mark.parametrize("is_causal", [False, True])
def test_window_matches_reference(backend, device, window_size, T, is_causal, poisoned_empty):
    q, k, v = make_qkv(1, 2, T, 16, torch.float32, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=is_causal, window_size=window_size)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("window_size, is_causal", [((8, 8), False), ((15, 0), True), ((40, -1), True)], ids=str)
def test_window_fp16(backend, device, window_size, is_causal, poisoned_empty):
    q, k, v = make_qkv(2, 2, 150, 64, torch.float16, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=is_causal, window_size=window_size,
                            attention_mask=make_mask("right", 2, 150, device))


@pytest.mark.parametrize("backend, device", SWEEP_BACKENDS)
@pytest.mark.parametrize("mask", [None, "right", "left", "holes"])
@pytest.mark.parametrize("pattern", [None, "random", "aligned"])
@pytest.mark.parametrize("window_size, is_causal", [((4, 2), False), ((0, 0), True), ((20, -1), False),
                                                    ((33, 0), True)], ids=str)
def test_window_with_padding_and_documents(backend, device, mask, pattern, window_size, is_causal, poisoned_empty):
    """Every combination of the window with key padding and packed documents; padded keys get zero gradients."""
    B, T = 4, 90
    q, k, v = make_qkv(B, 2, T, 16, torch.float32, device=device)
    key_mask = make_mask(mask, B, T, device)
    ids = None if pattern is None else make_document_ids(pattern, B, T, seed=T, device=device)
    _, (dq, dk, dv) = check_against_reference(q, k, v, backend=backend, is_causal=is_causal, window_size=window_size,
                                              attention_mask=key_mask, document_ids=ids)
    if key_mask is not None:
        hidden = ~key_mask.bool()[:, None, :, None].expand_as(dk)
        assert (dk[hidden] == 0).all() and (dv[hidden] == 0).all(), "padded keys must get exactly zero gradient"


def test_window_with_padding_and_documents_on_triton(poisoned_empty):
    """The quick subset's case of the sweep above on the Triton backend: a causal window over holes and documents."""
    test_window_with_padding_and_documents("triton", TRITON_DEVICE, "holes", "random", (33, 0), True, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [24, 80])
@pytest.mark.parametrize("window_size, is_causal", [((63, 0), True), ((64, 64), False), ((1, 130), False)], ids=str)
def test_native_cpu_window_across_tiles(dtype, D, window_size, is_causal, poisoned_empty):
    """Windows whose edges fall inside, on and across the C++ kernels' 64-row tiles, with documents and holes."""
    B, H, T = 2, 2, 300
    q, k, v = make_qkv(B, H, T, D, dtype, layout="bthd", device="cpu")
    check_against_reference(q, k, v, backend="native", is_causal=is_causal, window_size=window_size,
                            attention_mask=make_mask("holes", B, T, "cpu"),
                            document_ids=make_document_ids("random", B, T, seed=5, device="cpu"))


@pytest.mark.parametrize("backend, device", BACKENDS[1:])
def test_window_bf16_small(backend, device, poisoned_empty):
    """In the interpreter, Triton passes only because its kernels upcast bf16 dot operands there."""
    q, k, v = make_qkv(2, 2, 70, 32, torch.bfloat16, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=True, window_size=(10, 0),
                            attention_mask=make_mask("left", 2, 70, device))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_rows_that_see_no_key_through_the_window_are_zero_with_zero_gradients(backend, device, poisoned_empty):
    """Window (0, 0): a query sees only its own key, so each padded position's row sees none."""
    B, H, T, D = 2, 2, 40, 16
    q, k, v = make_qkv(B, H, T, D, torch.float32, device=device)
    mask = make_mask("holes", B, T, device).bool()
    grad_out = torch.randn(B, H, T, D, device=device)
    out, (dq, dk, dv) = forward_backward(attention, q, k, v, grad_out, attention_mask=mask, window_size=(0, 0),
                                         backend=backend)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    blind = ~mask[:, None, :, None].expand_as(out)
    assert blind.any() and (out[blind] == 0).all() and (dq[blind] == 0).all()
    assert (dk[blind] == 0).all() and (dv[blind] == 0).all()
    torch.testing.assert_close(out[~blind], v[~blind])  # a row that sees one key returns its value


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_windows_that_hide_nothing_are_no_window(backend, device):
    """A side of T - 1 or more, and any right side under causal masking, hide nothing: the same bits as no window."""
    T = 50
    q, k, v = make_qkv(2, 2, T, 16, torch.float32, device=device)
    mask = make_mask("right", 2, T, device)
    for is_causal, window in ((False, (T - 1, T + 7)), (False, (-1, -1)), (True, (-1, 3)), (True, (100, 0))):
        want = attention(q, k, v, is_causal=is_causal, attention_mask=mask, backend=backend)
        got = attention(q, k, v, is_causal=is_causal, attention_mask=mask, window_size=window, backend=backend)
        assert torch.equal(got, want), (is_causal, window)
    assert window_bounds((T - 2, 0), False, T) == (T - 2, 0) and window_bounds((4, 9), True, T) == (4, -1)


def test_reference_mask_is_the_window():
    T = 9
    for left, right in ((0, 0), (2, 1), (-1, 3), (4, -1)):
        visible = visible_keys(T, None, False, "cpu", window_size=(left, right))[0, 0]
        want = torch.tensor([[(left == -1 or i - left <= j) and (right == -1 or j <= i + right) for j in range(T)]
                             for i in range(T)])
        assert torch.equal(visible, want)


def test_torch_reference_in_float64():
    q, k, v = make_qkv(1, 2, 30, 8, torch.float64, device="cpu")
    out = attention(q, k, v, window_size=(3, 2), backend="torch")
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    want = scores.masked_fill((j < i - 3) | (j > i + 2), float("-inf")).softmax(-1) @ v
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window_size", [5, (3,), (1, 2, 3), "ab", (1.0, 2), (True, 0), (-2, 0), (0, -5), [3, None],
                                         (torch.tensor(3), 0)], ids=str)
def test_bad_windows_are_named(window_size):
    q, k, v = make_qkv(1, 1, 6, 16, torch.float32, device="cpu")
    for backend in ("torch", "native"):
        with pytest.raises(ValueError, match=r"window_size must be None or a pair \(left, right\) of ints"):
            attention(q, k, v, window_size=window_size, backend=backend)


# ----------------------------------------------------------------------------- tiles outside the window
def test_native_cpu_never_reads_tiles_outside_the_window(poisoned_empty):
    """Causal window of L keys, L the C++ tile: NaN in V before query i - (L - 1) (forward), or in dO after
    key j + (L - 1) (backward), must reach no output whose window excludes it, whatever tiles it shares."""
    L = max(native_module().attention_cpu_tile)
    T, nan = 4 * L, float("nan")
    kw = dict(is_causal=True, window_size=(L - 1, 0), backend="native")
    q, k, v = make_qkv(1, 2, T, 16, torch.float32, device="cpu")
    v[..., :L + 1, :] = nan
    out = attention(q, k, v, **kw)
    assert out[..., :2 * L, :].isnan().all(), "the poison is read where the window shows it"
    assert out[..., 2 * L:, :].isfinite().all(), "read keys before the window"

    v = make_qkv(1, 2, T, 16, torch.float32, device="cpu")[2]
    grad_out = torch.randn(q.shape)
    grad_out[..., 3 * L:, :] = nan
    _, (dq, dk, dv) = forward_backward(attention, q, k, v, grad_out, **kw)
    for name, g in (("dk", dk), ("dv", dv)):
        assert g[..., :2 * L, :].isfinite().all(), f"{name} read queries after the window"
        assert g[..., 2 * L + 1:, :].isnan().all(), f"{name}: the poison is read where the window shows it"
    assert dq[..., :3 * L, :].isfinite().all()


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("window_size, is_causal, pattern", [((1023, 0), True, None), ((256, 256), False, "right"),
                                                             ((100, 0), True, "docs")], ids=str)
def test_cuda_window_real_sizes(backend, dtype, D, window_size, is_causal, pattern, poisoned_empty):
    """bf16 needs a GPU: the interpreter's bf16 tl.dot is wrong (see test_attention.py's docstring)."""
    B, H, T = 2, 4, 2048
    q, k, v = make_qkv(B, H, T, D, dtype, layout="bthd")
    ids = make_document_ids("random", B, T, seed=D) if pattern == "docs" else None
    check_against_reference(q, k, v, backend=backend, is_causal=is_causal, window_size=window_size,
                            attention_mask=make_mask("right" if pattern == "right" else None, B, T), document_ids=ids)


@requires_cuda
def test_cuda_window_under_torch_compile():
    """The window is two ints of the triton_op: compiled with fullgraph=True, nothing breaks the graph."""
    q, k, v = make_qkv(2, 2, 300, 64, torch.bfloat16)

    def loss(q, k, v):
        return (attention(q, k, v, is_causal=True, window_size=(64, 0), backend="triton").float() ** 2).sum()

    got, got_grads = forward_backward(torch.compile(loss, fullgraph=True), q, k, v, torch.tensor(1.0, device="cuda"))
    want, want_grads = forward_backward(loss, q, k, v, torch.tensor(1.0, device="cuda"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
