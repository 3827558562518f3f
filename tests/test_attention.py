"""attention kernels against a float64 reference: output and all three gradients, masks, layouts, errors.

The op tests run on two backends, each on its own device (``BACKENDS``): Triton on
the GPU, or without one in the interpreter at small sizes, and the native
backend's C++ kernels on the CPU. The native CUDA kernels take head dims 64 and
128 only; they run in the CUDA tests at the end.

In the interpreter bf16 needs the Triton kernels' upcast, because the
interpreter's ``tl.dot`` multiplies the raw bits of bf16 operands
(triton-lang/triton#11584): one small bf16 case checks that upcast, and the
Triton bf16 matrix runs on CUDA only. The C++ kernels run every dtype on the CPU.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, TRITON_DEVICE, TRITON_SWEEP, requires_cuda
from minipt.ops._backend import BackendUnavailableError, native_module
from minipt.ops import attention, attention_ref
from minipt.ops.attention import triton as attention_triton

DEVICE = TRITON_DEVICE
LOW_PRECISION = (torch.float16, torch.bfloat16)
# (backend, the device its op tests run on)
BACKENDS = [pytest.param("triton", TRITON_DEVICE, id="triton"), pytest.param("native", "cpu", id="native-cpu")]
# The same for the exhaustive sweeps, whose interpreted Triton cases only the whole suite runs.
SWEEP_BACKENDS = [TRITON_SWEEP, pytest.param("native", "cpu", id="native-cpu")]


# ----------------------------------------------------------------------------- helpers
def make_qkv(B, H, T, D, dtype, layout="bhtd", device=DEVICE):
    """Fresh random q, k, v of shape (B, H, T, D) in one of several memory layouts."""
    if layout == "bhtd":
        return [torch.randn(B, H, T, D, device=device).to(dtype) for _ in range(3)]
    if layout == "bthd":  # a model's (B, T, H, D) projection, transposed: T and H strides swap
        return [torch.randn(B, T, H, D, device=device).to(dtype).transpose(1, 2) for _ in range(3)]
    if layout == "packed":  # q, k, v slices of one (B, T, 3, H, D) projection, none of them dense
        qkv = torch.randn(B, T, 3, H, D, device=device).to(dtype)
        return [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    if layout == "d_strided":  # D is not the unit-stride dimension
        return [torch.randn(B, H, D, T, device=device).to(dtype).transpose(2, 3) for _ in range(3)]
    raise ValueError(layout)


def make_mask(pattern, B, T, device=DEVICE):
    """(B, T) key-padding masks; every pattern has a sequence with no real key when B > 1."""
    arange = torch.arange(T, device=device)
    if pattern is None:
        return None
    if pattern == "right":  # lengths: full, none, unaligned to any block, a single token
        lengths = torch.tensor([T, 0, T // 2 + 3, 1][:B], device=device).clamp(max=T)
        return arange[None, :] < lengths[:, None]
    if pattern == "left":  # a contiguous span that does not start at 0, as int64
        starts = torch.tensor([0, T, (T + 1) // 3, T - 1][:B], device=device)
        return (arange[None, :] >= starts[:, None]).long()
    if pattern == "holes":  # no structure at all, as int32
        mask = torch.rand(B, T, device=device) < 0.6
        mask[-1] = False
        return mask.int()
    raise ValueError(pattern)


def forward_backward(fn, q, k, v, grad_out, **kw):
    """Output and (dq, dk, dv) of ``fn`` at fresh leaves made from q, k, v."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]  # new leaves, same storage and strides
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def reference(q, k, v, grad_out, **kw):
    return forward_backward(attention_ref, q.double(), k.double(), v.double(), grad_out.double(), **kw)


def rounding_atol(ref, dtype):
    """Twice the rounding error of ``dtype`` at the reference's magnitude (flash-attention's atol),
    at least 1e-5: a reference of exact zeros (dq at T = 1) has no rounding error to measure."""
    x = ref.to(dtype)
    return max(2 * ((x + 0.3 - 0.3) - x).abs().max().item(), 1e-5)


def assert_matches(got, want, lowp, dtype, name):
    """fp32: close to float64. fp16/bf16: the three-way rule of STYLE.md,
    |kernel - ref| <= 2·|torch in dtype - ref| + atol, on the largest error."""
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")
        return
    err = (got.double() - want).abs().max().item()
    torch_err = (lowp.double() - want).abs().max().item()
    bound = 2 * torch_err + rounding_atol(want, dtype)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (torch in {dtype}: {torch_err:.3g})"


def check_against_reference(q, k, v, *, backend="triton", **kw):
    """Runs the kernel and the references, and compares the output and the three gradients."""
    dtype = q.dtype
    grad_out = torch.randn(q.shape, device=q.device).to(dtype)
    out, grads = forward_backward(attention, q, k, v, grad_out, backend=backend, **kw)
    want_out, want_grads = reference(q, k, v, grad_out, **kw)
    lowp_out, lowp_grads = (None, (None,) * 3)
    if dtype in LOW_PRECISION:
        lowp_out, lowp_grads = forward_backward(attention_ref, q, k, v, grad_out, upcast=False, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert_matches(out, want_out, lowp_out, dtype, "out")
    for name, g, w, lp in zip(("dq", "dk", "dv"), grads, want_grads, lowp_grads):
        assert g.dtype == dtype and g.shape == q.shape
        assert_matches(g, w, lp, dtype, name)
    return out, grads


# ----------------------------------------------------------------------------- small sizes
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("T", [1, 17, 64, 129])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_reference(backend, device, T, D, is_causal, dtype, poisoned_empty):
    q, k, v = make_qkv(1, 2, T, D, dtype, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["packed", "bthd", "mixed", "d_strided"])
def test_native_cpu_reads_split_heads_in_place(layout, dtype, poisoned_empty):
    """The C++ kernels read q, k and v through their strides when the three share them (a model's heads
    split from one projection: "packed"), copy them when not ("mixed", "d_strided"), and write dq, dk
    and dv as (B, T, H, D) memory, so the heads' gradients merge back into the projection's without a
    transpose. Checked against float64 at a length across the 64-row tiles, with padding."""
    B, H, T, D = 2, 3, 70, 24
    if layout == "mixed":  # q transposed from (B, T, H, D), k and v dense: no shared strides
        q = make_qkv(B, H, T, D, dtype, layout="bthd", device="cpu")[0]
        k, v = make_qkv(B, H, T, D, dtype, device="cpu")[1:]
    else:
        q, k, v = make_qkv(B, H, T, D, dtype, layout=layout, device="cpu")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    reads = []

    class Copies(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    with Copies():
        out = attention(*leaves, is_causal=True, attention_mask=make_mask("right", B, T, "cpu"), backend="native")
    assert (len(reads) == 0) == (layout in ("packed", "bthd")), f"{layout}: {len(reads)} copies of q, k and v"
    grad_out = torch.randn(B, T, H, D).to(dtype).transpose(1, 2)
    grads = torch.autograd.grad(out, leaves, grad_out)
    for g in grads:
        assert g.stride() == bthd_strides(B, H, T, D), "dq, dk and dv are (B, T, H, D) memory"
    want_out, want_grads = reference(q, k, v, grad_out, is_causal=True, attention_mask=make_mask("right", B, T, "cpu"))
    lowp_out, lowp_grads = (None, (None,) * 3)
    if dtype in LOW_PRECISION:
        lowp_out, lowp_grads = forward_backward(attention_ref, q, k, v, grad_out, upcast=False, is_causal=True,
                                                attention_mask=make_mask("right", B, T, "cpu"))
    assert_matches(out.detach(), want_out, lowp_out, dtype, "out")
    for name, g, want, lowp in zip(("dq", "dk", "dv"), grads, want_grads, lowp_grads):
        assert_matches(g, want, lowp, dtype, name)


def test_native_cpu_copies_a_key_whose_last_dimension_is_strided(poisoned_empty):
    """k shares q's strides along B, H and T but steps 2 along D: the kernels cannot read it in place."""
    B, H, T, D = 2, 3, 40, 16
    wide = [torch.randn(B, H, T, 2 * D) for _ in range(3)]
    q, k, v = wide[0][..., :D], wide[1][..., ::2], wide[2][..., :D]
    assert q.stride()[:3] == k.stride()[:3] == v.stride()[:3] and k.stride(-1) == 2
    check_against_reference(q, k, v, backend="native", is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [16, 40, 64, 80])
@pytest.mark.parametrize("T", [1, 7, 65, 130])
@pytest.mark.parametrize("is_causal", [False, True])
def test_native_cpu_any_head_dim_and_length(T, D, is_causal, dtype, poisoned_empty):
    """The C++ kernels take any D (40 and 80 end in a narrower column loop) and any T around their 64-row tiles."""
    q, k, v = make_qkv(2, 3, T, D, dtype, device="cpu")
    check_against_reference(q, k, v, backend="native", is_causal=is_causal,
                            attention_mask=make_mask("right", 2, T, "cpu"))


@pytest.mark.parametrize("backend, device", SWEEP_BACKENDS)
@pytest.mark.parametrize("pattern", ["right", "left", "holes"])
@pytest.mark.parametrize("T", [17, 129])
@pytest.mark.parametrize("is_causal", [False, True])
def test_key_padding(backend, device, pattern, T, is_causal, poisoned_empty):
    B, H, D = 4, 2, 32
    q, k, v = make_qkv(B, H, T, D, torch.float32, device=device)
    mask = make_mask(pattern, B, T, device)
    _, (dq, dk, dv) = check_against_reference(q, k, v, backend=backend, is_causal=is_causal, attention_mask=mask)
    hidden = ~mask.bool()[:, None, :, None].expand_as(dk)
    assert (dk[hidden] == 0).all() and (dv[hidden] == 0).all(), "padded keys must get exactly zero gradient"


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_key_padding_fp16(backend, device, is_causal, poisoned_empty):
    q, k, v = make_qkv(4, 2, 50, 64, torch.float16, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=is_causal,
                            attention_mask=make_mask("right", 4, 50, device))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_rows_without_keys_are_zero_with_zero_gradients(backend, device, poisoned_empty):
    """Sequence 1 has no real key; with causal + left padding the first rows of sequence 0 see none either."""
    B, H, T, D = 2, 2, 40, 16
    q, k, v = make_qkv(B, H, T, D, torch.float32, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[0, 21:] = True
    grad_out = torch.randn(B, H, T, D, device=device)
    out, (dq, dk, dv) = forward_backward(
        attention, q, k, v, grad_out, is_causal=True, attention_mask=mask, backend=backend
    )
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (out[0, :, :21] == 0).all() and (dq[0, :, :21] == 0).all()
    assert (out[0, :, 21:] != 0).any()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["bthd", "packed", "d_strided"])
def test_non_contiguous_inputs(backend, device, layout, poisoned_empty):
    q, k, v = make_qkv(2, 3, 45, 32, torch.float32, layout=layout, device=device)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, backend=backend, is_causal=True, attention_mask=make_mask("right", 2, 45, device))


def bthd_strides(B, H, T, D):
    """Strides of a (B, H, T, D) view of dense (B, T, H, D) memory."""
    return (T * H * D, D, H * D, 1)


def check_heads_merge_without_copies(backend, layout, dtype, device=DEVICE):
    """The output is a (B, H, T, D) view of (B, T, H, D) memory whatever the input layout; merging
    its heads is a view, and the gradient through the merged heads reaches the op in the same layout."""
    B, H, T, D = 2, 3, 33, 64
    q, k, v = make_qkv(B, H, T, D, dtype, layout=layout, device=device)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves, is_causal=True, backend=backend)
    assert out.shape == (B, H, T, D) and out.stride() == bthd_strides(B, H, T, D)
    merged = out.transpose(1, 2).reshape(B, T, H * D)
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()
    arriving = []
    out.register_hook(arriving.append)
    weight = torch.randn(B, T, H * D, device=q.device).to(dtype)
    (merged * weight).sum().backward()
    assert arriving[0].stride() == bthd_strides(B, H, T, D), "the gradient reaches the op as a (B, T, H, D) view"
    grad_out = weight.view(B, T, H, D).transpose(1, 2)
    want_out, want_grads = reference(q, k, v, grad_out, is_causal=True)
    lowp_out, lowp_grads = (None, (None,) * 3)
    if dtype in LOW_PRECISION:
        lowp_out, lowp_grads = forward_backward(attention_ref, q, k, v, grad_out, is_causal=True, upcast=False)
    assert_matches(out.detach(), want_out, lowp_out, dtype, "out")
    for name, leaf, want, lowp in zip(("dq", "dk", "dv"), leaves, want_grads, lowp_grads):
        assert_matches(leaf.grad, want, lowp, dtype, name)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["bhtd", "bthd", "packed"])
def test_output_is_a_bthd_view_and_heads_merge_without_copies(backend, device, layout, poisoned_empty):
    check_heads_merge_without_copies(backend, layout, torch.float32, device)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_expanded_gradient(backend, device, poisoned_empty):
    """out.sum() sends back a stride-0 gradient, which the kernels cannot stride through: it is copied once."""
    q, k, v = make_qkv(2, 3, 33, 16, torch.float32, layout="bthd", device=device)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    attention(*leaves, backend=backend).sum().backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    attention_ref(*ref).sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("scale", [0.05, -0.3, 0.0])
def test_scale(backend, device, scale, poisoned_empty):
    """Any finite scale, including a negative one (which turns the smallest score into the largest)."""
    q, k, v = make_qkv(1, 2, 40, 16, torch.float32, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=True, scale=scale)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_bf16_small(backend, device, poisoned_empty):
    """In the interpreter, Triton passes only because its kernels upcast bf16 dot operands there."""
    q, k, v = make_qkv(2, 2, 37, 32, torch.bfloat16, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=True, attention_mask=make_mask("right", 2, 37, device))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 16), (2, 0, 5, 16), (2, 2, 0, 16)])
def test_empty_inputs(backend, device, shape):
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    mask = torch.ones(shape[0], shape[2], dtype=torch.bool, device=device)
    out = attention(q, k, v, attention_mask=mask, backend=backend)
    out.sum().backward()
    assert out.shape == shape and q.grad.shape == shape


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_backward_is_deterministic(backend, device):
    q, k, v = make_qkv(2, 2, 70, 32, torch.float32, device=device)
    grad_out = torch.randn_like(q)
    mask = make_mask("holes", 2, 70, device)
    runs = [forward_backward(attention, q, k, v, grad_out, attention_mask=mask, backend=backend)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    not HAS_CUDA,
    reason="needs CUDA: compiling traces the launchers with fake tensors, which interpreter kernels cannot take",
)
def test_torch_compile_fullgraph():
    """The op is a torch.library.triton_op: compiled with fullgraph=True, nothing breaks the graph."""
    q, k, v = make_qkv(2, 2, 300, 64, torch.bfloat16)
    mask = make_mask("right", 2, 300)

    def loss(q, k, v):
        return (attention(q, k, v, is_causal=True, attention_mask=mask, backend="triton").float() ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    got, got_grads = forward_backward(compiled, q, k, v, torch.tensor(1.0, device=DEVICE))
    want, want_grads = forward_backward(loss, q, k, v, torch.tensor(1.0, device=DEVICE))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- packed documents
def make_document_ids(pattern, B, T, seed=0, device=DEVICE):
    """(B, T) non-decreasing ids: random packings of documents whose lengths run from 1 to T."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        if pattern == "random":  # lengths anywhere in 1..T, mostly unaligned to any block
            lengths = []
            while sum(lengths) < T:
                lengths.append(int(torch.randint(1, T + 1, (1,), generator=gen)) // (b + 1) + 1)
        elif pattern == "aligned":  # document edges on 16-token block edges
            lengths = [16 * int(torch.randint(1, 4, (1,), generator=gen)) for _ in range(T)]
        elif pattern == "singles":  # every document a single token
            lengths = [1] * T
        elif pattern == "one":
            lengths = [T]
        else:
            raise ValueError(pattern)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:T]
        rows.append(ids + 7 * b)  # ids need not start at 0 nor be shared between rows
    return torch.stack(rows).to(device)


@pytest.mark.parametrize("backend, device", SWEEP_BACKENDS)
@pytest.mark.parametrize("pattern", ["random", "aligned", "singles", "one"])
@pytest.mark.parametrize("T", [17, 100])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask", [None, "right"])
def test_documents(backend, device, pattern, T, is_causal, mask, poisoned_empty):
    B = 3
    q, k, v = make_qkv(B, 2, T, 16, torch.float32, device=device)
    ids = make_document_ids(pattern, B, T, seed=T, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=is_causal, attention_mask=make_mask(mask, B, T, device),
                            document_ids=ids)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_documents_many_random_packings(backend, device, seed, poisoned_empty):
    """Packings drawn afresh, int32 ids, with causal and padding drawn too."""
    gen = torch.Generator().manual_seed(seed)
    T = int(torch.randint(2, 130, (1,), generator=gen))
    ids = make_document_ids("random", 2, T, seed=100 + seed, device=device).int()
    mask = make_mask(["right", "left", "holes", None][seed], 2, T, device)
    q, k, v = make_qkv(2, 1, T, 32, torch.float32, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=bool(seed % 2), attention_mask=mask, document_ids=ids)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_documents_fp16(backend, device, is_causal, poisoned_empty):
    q, k, v = make_qkv(2, 2, 70, 64, torch.float16, device=device)
    check_against_reference(q, k, v, backend=backend, is_causal=is_causal,
                            attention_mask=make_mask("right", 2, 70, device),
                            document_ids=make_document_ids("random", 2, 70, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [130, 300])
def test_native_cpu_causal_padding_and_documents(dtype, T, poisoned_empty):
    """All three masks at once, at lengths that cut documents and padding across several tiles."""
    B, H, D = 3, 2, 40
    q, k, v = make_qkv(B, H, T, D, dtype, layout="bthd", device="cpu")
    ids = make_document_ids("random", B, T, seed=T, device="cpu")
    check_against_reference(q, k, v, backend="native", is_causal=True, attention_mask=make_mask("holes", B, T, "cpu"),
                            document_ids=ids)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_documents_wholly_padded_get_zeros(backend, device, poisoned_empty):
    """A document whose keys are all padding: its rows output zeros with zero gradients."""
    T = 40
    q, k, v = make_qkv(1, 2, T, 16, torch.float32, device=device)
    ids = (torch.arange(T, device=device) >= 25).long()[None]  # documents [0, 25) and [25, 40)
    mask = (torch.arange(T, device=device) < 25)[None]
    grad_out = torch.randn(q.shape, device=device)
    out, (dq, dk, dv) = forward_backward(attention, q, k, v, grad_out, attention_mask=mask, document_ids=ids,
                                         backend=backend)
    assert (out[..., 25:, :] == 0).all() and (dq[..., 25:, :] == 0).all()
    assert (dk[..., 25:, :] == 0).all() and (dv[..., 25:, :] == 0).all()
    assert (out[..., :25, :] != 0).any()


def test_native_cpu_never_reads_skipped_tiles(poisoned_empty):
    """NaN reaches every output of a tile the C++ kernels visit (p = 0 times NaN is NaN), so NaN in keys
    (forward) or output gradients (backward) that only skipped tiles hold must reach no output: other
    documents, keys after the causal bound, tiles that are all padding. Documents here start on tile edges."""
    L = max(native_module().attention_cpu_tile)  # both tile sizes divide it
    T, nan = 4 * L, float("nan")
    ids = torch.tensor([0] * L + [1] * (2 * L) + [2] * L)[None]  # documents [0, L), [L, 3L), [3L, 4L)
    mask = (torch.arange(T) < 3 * L)[None]  # the last document is all padding
    q, k, v = make_qkv(1, 2, T, 16, torch.float32, device="cpu")
    kw = dict(is_causal=True, attention_mask=mask, document_ids=ids, backend="native")
    k[..., 2 * L:, :], v[..., 2 * L:, :] = nan, nan  # the second half of document 1, and document 2
    out = attention(q, k, v, **kw)
    assert out[..., :2 * L, :].isfinite().all(), "read keys of another document or after the causal bound"
    assert out[..., 2 * L:3 * L, :].isnan().all(), "the poison is read where it is visible"
    assert (out[..., 3 * L:, :] == 0).all(), "read a tile of padding"

    k, v = make_qkv(1, 2, T, 16, torch.float32, device="cpu")[1:]
    grad_out = torch.randn(q.shape)
    grad_out[..., L:2 * L, :] = nan  # queries of the first half of document 1
    _, (dq, dk, dv) = forward_backward(attention, q, k, v, grad_out, **kw)
    for name, g in (("dk", dk), ("dv", dv)):
        assert g[..., :L, :].isfinite().all(), f"{name} of document 0 read another document's queries"
        assert g[..., L:2 * L, :].isnan().all(), f"{name}: the poison is read where it is visible"
        assert g[..., 2 * L:3 * L, :].isfinite().all(), f"{name} read queries before the causal bound"
        assert (g[..., 3 * L:, :] == 0).all()
    assert dq[..., :L, :].isfinite().all() and dq[..., 2 * L:3 * L, :].isfinite().all()
    assert (dq[..., 3 * L:, :] == 0).all()


def test_native_cpu_skips_tiles_of_padding_without_documents():
    L = max(native_module().attention_cpu_tile)
    T = 4 * L + 9
    mask = (torch.arange(T) < L + 3)[None]  # keys from 2L on are whole tiles of padding
    q, k, v = make_qkv(1, 2, T, 24, torch.float32, device="cpu")
    k[..., 2 * L:, :], v[..., 2 * L:, :] = float("nan"), float("nan")
    assert attention(q, k, v, attention_mask=mask, backend="native").isfinite().all()


def test_document_ids_errors_are_named():
    q, k, v = make_qkv(2, 1, 6, 16, torch.float32)
    ids = torch.zeros(2, 6, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"document_ids must have shape \(B, T\) = \(2, 6\), got \(2, 5\)"):
        attention(q, k, v, document_ids=ids[:, :5], backend="triton")
    with pytest.raises(TypeError, match="document_ids must be int32 or int64, got torch.float32"):
        attention(q, k, v, document_ids=ids.float(), backend="triton")
    with pytest.raises(TypeError, match="document_ids must be int32 or int64, got torch.int16"):
        attention(q, k, v, document_ids=ids.short(), backend="torch")
    # On CUDA the order is checked by a device-side assert, which would end this process's CUDA context.
    backwards = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 1, 2, 3]])
    with pytest.raises(ValueError, match="document_ids must be non-decreasing along each row"):
        attention(q.cpu(), k.cpu(), v.cpu(), document_ids=backwards, backend="torch")


@requires_cuda
def test_document_ids_on_another_device_are_named():
    q, k, v = make_qkv(1, 1, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="document_ids is on cpu"):
        attention(q, k, v, document_ids=torch.zeros(1, 4, dtype=torch.long), backend="triton")


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("is_causal, pattern", [(True, None), (False, "right")])
def test_cuda_documents_real_sizes(backend, dtype, D, is_causal, pattern, poisoned_empty):
    """bf16 needs a GPU: the interpreter's bf16 tl.dot is wrong (see the module docstring)."""
    B, H, T = 2, 4, 2048
    q, k, v = make_qkv(B, H, T, D, dtype, layout="bthd")
    gen = torch.Generator().manual_seed(D)
    lengths = torch.randint(1, 700, (T,), generator=gen)
    ids = torch.repeat_interleave(torch.arange(T), lengths)[:T].view(1, T).repeat(B, 1).cuda()
    check_against_reference(q, k, v, backend=backend, is_causal=is_causal, attention_mask=make_mask(pattern, B, T),
                            document_ids=ids)


# ----------------------------------------------------------------------------- CUDA, real sizes
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize(
    "T, is_causal, pattern", [(4096, False, None), (4096, True, None), (1000, False, "right"), (1000, True, "holes")]
)
def test_cuda_real_sizes(backend, dtype, D, T, is_causal, pattern, poisoned_empty):
    """bf16 needs a GPU: the interpreter's bf16 tl.dot is wrong (see the module docstring)."""
    B, H = (2, 4) if T <= 1024 else (1, 2)
    q, k, v = make_qkv(B, H, T, D, dtype, layout="bthd")
    check_against_reference(q, k, v, backend=backend, is_causal=is_causal, attention_mask=make_mask(pattern, B, T))


@requires_cuda
@pytest.mark.parametrize("D, dtype", [(16, torch.bfloat16), (32, torch.bfloat16), (128, torch.float32)])
def test_cuda_other_head_dims(D, dtype, poisoned_empty):
    """The head dims and dtypes the other tests leave out (bf16 needs a GPU, see the module docstring)."""
    q, k, v = make_qkv(2, 3, 257, D, dtype)
    check_against_reference(q, k, v, is_causal=True, attention_mask=make_mask("right", 2, 257))


@requires_cuda
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_native_output_is_a_bthd_view_and_heads_merge_without_copies(layout, poisoned_empty):
    check_heads_merge_without_copies("native", layout, torch.bfloat16)


@requires_cuda
def test_cuda_offsets_past_int32():
    """B·H·T·D > 2^31 elements: the last sequence must equal the same sequence run alone."""
    B, H, T, D = 33, 128, 4096, 128  # 2^31 + 2^26 elements, 4.4 GB per bf16 tensor
    need = 8 * B * H * T * D * 2
    if torch.cuda.get_device_properties(0).total_memory < need * 1.3:
        pytest.skip(f"needs about {need * 1.3 / 2**30:.0f} GiB of GPU memory")
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = attention(q, k, v, is_causal=True, backend="triton")
    out.backward(torch.ones_like(out))
    last = [x[-1:].detach().clone().requires_grad_() for x in (q, k, v)]
    out_last = attention(*last, is_causal=True, backend="triton")
    out_last.backward(torch.ones_like(out_last))
    assert torch.equal(out[-1:], out_last)
    for full, alone in zip((q, k, v), last):
        assert torch.equal(full.grad[-1:], alone.grad)


# ----------------------------------------------------------------------------- launch configs
def test_launch_table_covers_every_kernel_and_falls_back_to_the_nearest_lower_capability():
    keys = {(kind, dim, size) for kind in ("fwd", "dkdv", "dq") for dim in (64, 128) for size in (2, 4)}
    assert {(8, 0), (8, 6), (8, 9), (9, 0)} <= set(attention_triton._CONFIGS)
    for capability, table in attention_triton._CONFIGS.items():
        assert set(table) == keys, capability
    assert set(attention_triton._WINDOW_CONFIGS) == set(attention_triton._CONFIGS)
    for capability, table in attention_triton._WINDOW_CONFIGS.items():
        assert set(table) <= keys, capability
    expected = {(8, 0): (8, 0), (8, 6): (8, 6), (8, 7): (8, 6), (8, 9): (8, 9), (9, 0): (9, 0), (10, 0): (9, 0),
                (12, 1): (9, 0), (7, 5): (8, 0)}
    assert {c: attention_triton._table_capability(c) for c in expected} == expected


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("D", [8, 48, 256])
def test_unsupported_head_dim_is_named(D):
    q, k, v = make_qkv(1, 1, 4, D, torch.float32)
    with pytest.raises(ValueError, match=f"head dim D = {D}"):
        attention(q, k, v, backend="triton")


def test_float64_is_refused_by_triton():
    q, k, v = make_qkv(1, 1, 4, 16, torch.float64)
    with pytest.raises(TypeError, match="backend='triton' supports float16, bfloat16 and float32"):
        attention(q, k, v, backend="triton")


def test_mixed_dtypes_and_mask_shape_are_named():
    q, k, v = make_qkv(2, 1, 4, 16, torch.float32)
    with pytest.raises(TypeError, match="v has dtype"):
        attention(q, k, v.half(), backend="triton")
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, T\) = \(2, 4\)"):
        attention(q, k, v, attention_mask=torch.ones(2, 5, dtype=torch.bool, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match=r"attention_mask must have shape"):
        attention(q, k, v, attention_mask=torch.ones(4, dtype=torch.bool, device=DEVICE), backend="triton")


@requires_cuda
def test_mixed_devices_are_named():
    q, k, v = make_qkv(1, 1, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="k is on cpu but q is on cuda"):
        attention(q, k.cpu(), v, backend="triton")
    with pytest.raises(ValueError, match="attention_mask is on cpu"):
        attention(q, k, v, attention_mask=torch.ones(1, 4, dtype=torch.bool), backend="triton")


def test_triton_on_cpu_outside_the_interpreter_is_refused(monkeypatch):
    # resolve_backend reads TRITON_INTERPRET at call time; the kernels were
    # decorated under the conftest's value, so only the refusal changes.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 1, 4, 16, torch.float32, device="cpu")
    with pytest.raises(BackendUnavailableError, match="backend='triton' runs on CUDA tensors"):
        attention(q, k, v, backend="triton")


def test_float64_is_refused_by_native_on_the_cpu():
    q, k, v = make_qkv(1, 1, 4, 24, torch.float64, device="cpu")
    with pytest.raises(BackendUnavailableError, match="backend='native' supports float32, float16 and bfloat16"):
        attention(q, k, v, backend="native")
