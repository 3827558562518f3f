"""The PyTorch references against naive float64 computations, and the op contract."""

import math

import pytest
import torch
import torch.nn.functional as F

from minipt.ops import BackendUnavailableError
from minipt.ops import (
    attention,
    attention_ref,
    cross_entropy,
    cross_entropy_ref,
    linear_cross_entropy,
    linear_cross_entropy_ref,
    mlm_mask,
    mlm_mask_ref,
)


# ----------------------------------------------------------------------------- attention
def naive_attention(q, k, v, is_causal, attention_mask, scale):
    """Row by row: masked softmax(q_i · K / sqrt(D)) V over the visible keys only."""
    B, H, T, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                keys = [
                    j for j in range(T)
                    if (attention_mask is None or bool(attention_mask[b, j])) and (not is_causal or j <= i)
                ]
                if not keys:
                    continue
                s = torch.stack([q[b, h, i] @ k[b, h, j] * scale for j in keys])
                p = torch.exp(s - s.max())
                p = p / p.sum()
                out[b, h, i] = sum(p[n] * v[b, h, j] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_ref_matches_naive(is_causal, padded):
    B, H, T, D = 3, 2, 7, 5
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    mask = None
    if padded:
        lengths = torch.tensor([7, 3, 0])  # full, partial, and a sequence with no real token
        mask = torch.arange(T)[None, :] < lengths[:, None]
    scale = 1 / math.sqrt(D)
    got = attention_ref(q, k, v, is_causal=is_causal, attention_mask=mask)
    want = naive_attention(q, k, v, is_causal, mask, scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_attention_ref_fully_masked_rows_have_zero_output_and_gradients():
    B, H, T, D = 2, 1, 4, 3
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    out = attention_ref(q, k, v, attention_mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    # Padded keys of sequence 0 receive no gradient.
    assert (k.grad[0, :, 2:] == 0).all() and (v.grad[0, :, 2:] == 0).all()


def test_attention_ref_gradients_match_naive():
    B, H, T, D = 2, 2, 5, 4
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.autograd.gradcheck(
        lambda q, k, v: attention_ref(q, k, v, is_causal=True, attention_mask=mask), (q, k, v)
    )


def test_attention_dispatch_and_scale():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    got = attention(q, k, v, scale=0.3, backend="torch")
    want = naive_attention(q.double(), k.double(), v.double(), False, None, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- cross-entropy
def naive_cross_entropy(logits, target, ignore_index, reduction, eps, softcap=None, z_loss=0.0):
    """The textbook formula, row by row, in float64: on s·tanh(x / s) with a softcap, plus z·lse² with a z-loss."""
    losses, counted = [], 0
    for x, t in zip(logits.double(), target.tolist()):
        if t == ignore_index:
            losses.append(torch.zeros((), dtype=torch.float64))
            continue
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        m = x.max()
        lse = m + torch.log(torch.exp(x - m).sum())
        logp = x - lse
        losses.append(-(1 - eps) * logp[t] - eps / x.numel() * logp.sum() + z_loss * lse**2)
        counted += 1
    loss = torch.stack(losses)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(counted, 1)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
def test_cross_entropy_ref_matches_torch(reduction, label_smoothing, ignored):
    N, V = 13, 41
    logits = torch.randn(N, V, dtype=torch.float64) * 3
    target = torch.randint(0, V, (N,))
    if ignored == "some":
        target[::3] = -100
    elif ignored == "all":
        target[:] = -100
    got = cross_entropy_ref(logits, target, reduction=reduction, label_smoothing=label_smoothing)
    want = naive_cross_entropy(logits, target, -100, reduction, label_smoothing)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if ignored == "all" and reduction == "mean":
        assert got.item() == 0.0  # minipt's one departure from torch, which gives NaN
    else:
        torch.testing.assert_close(
            got, F.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)
        )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("softcap, z_loss", [(2.0, 0.0), (None, 0.1), (2.0, 0.1)])
def test_cross_entropy_ref_softcap_and_z_loss_match_naive(reduction, softcap, z_loss):
    """The loss, its gradient and the z term ``return_z_loss`` gives, against the textbook formula's."""
    N, V = 13, 41
    logits = (torch.randn(N, V, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, V, (N,))
    target[::3] = -100
    got, z = cross_entropy_ref(logits, target, reduction=reduction, label_smoothing=0.1, softcap=softcap,
                               z_loss=z_loss, return_z_loss=True)
    want = naive_cross_entropy(logits, target, -100, reduction, 0.1, softcap, z_loss)
    want_z = naive_cross_entropy(logits, target, -100, reduction, 0.1, softcap, z_loss) - naive_cross_entropy(
        logits, target, -100, reduction, 0.1, softcap)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, want_z.detach(), rtol=1e-12, atol=1e-12)
    assert not z.requires_grad and (z.abs().sum() > 0) == (z_loss > 0)
    upstream = torch.rand(got.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(got, logits, upstream)
    (w,) = torch.autograd.grad(want, logits, upstream)
    torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_cross_entropy_ref_custom_ignore_index_and_gradients():
    N, V = 9, 17
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (N,))
    target[2] = 5
    got = cross_entropy_ref(logits, target, ignore_index=5, label_smoothing=0.2)
    want = F.cross_entropy(logits, target, ignore_index=5, label_smoothing=0.2)
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got, logits)
    (w,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g, w)


def test_cross_entropy_all_ignored_mean_is_zero_with_zero_gradient():
    logits = torch.randn(4, 7, requires_grad=True)
    loss = cross_entropy(logits, torch.full((4,), -100), backend="torch")
    loss.backward()
    assert loss.item() == 0.0
    assert (logits.grad == 0).all()


def test_cross_entropy_low_precision_returns_float32():
    """As F.cross_entropy under autocast: the loss of bf16 logits is float32, not rounded to bf16."""
    logits = torch.randn(5, 11, dtype=torch.bfloat16)
    target = torch.randint(0, 11, (5,))
    got = cross_entropy(logits, target, backend="torch")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), F.cross_entropy(logits.double(), target), rtol=1e-5, atol=0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_ref_matches_torch(with_bias):
    N, D, V = 11, 6, 23
    hidden = torch.randn(N, D, dtype=torch.float64)
    weight = torch.randn(V, D, dtype=torch.float64)
    bias = torch.randn(V, dtype=torch.float64) if with_bias else None
    target = torch.randint(0, V, (N,))
    target[0] = -100
    got = linear_cross_entropy(hidden, weight, target, bias=bias, label_smoothing=0.1, backend="torch")
    want = F.cross_entropy(F.linear(hidden, weight, bias), target, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert linear_cross_entropy_ref is not None


# ----------------------------------------------------------------------------- MLM masking
def test_mlm_mask_ref_statistics():
    V, mask_id = 1000, 4
    ids = torch.randint(5, V, (256, 512))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    ids[special] = 2
    masked, labels = mlm_mask(ids, mask_token_id=mask_id, vocab_size=V, special_tokens_mask=special, seed=1, backend="torch")
    selected = labels != -100
    n = (~special).sum().item()
    frac = selected.sum().item() / n
    sigma = math.sqrt(0.15 * 0.85 / n)
    assert abs(frac - 0.15) < 4 * sigma
    assert not selected[special].any()
    assert (labels[selected] == ids[selected]).all()
    assert (masked[~selected] == ids[~selected]).all()
    k = selected.sum().item()
    to_mask = (masked[selected] == mask_id).float().mean().item()
    kept = (masked[selected] == ids[selected]).float().mean().item()
    s = math.sqrt(0.8 * 0.2 / k)
    assert abs(to_mask - 0.8) < 4 * s
    # "kept" includes random draws that happen to hit the original id (p = 1/V).
    assert abs(kept - 0.1) < 4 * math.sqrt(0.1 * 0.9 / k) + 1e-3
    assert ((masked >= 0) & (masked < V)).all()


def test_mlm_mask_ref_is_deterministic_per_seed_and_leaves_input():
    ids = torch.randint(0, 50, (8, 33))
    before = ids.clone()
    a = mlm_mask_ref(ids, mask_token_id=3, vocab_size=50, seed=7)
    b = mlm_mask_ref(ids, mask_token_id=3, vocab_size=50, seed=7)
    c = mlm_mask_ref(ids, mask_token_id=3, vocab_size=50, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(ids, before)


# ----------------------------------------------------------------------------- bad input
def test_unknown_backend_and_env_override(monkeypatch):
    x = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="backend must be one of"):
        cross_entropy(x, t, backend="cudnn")
    monkeypatch.setenv("MINIPT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MINIPT_BACKEND"):
        cross_entropy(x, t)
    monkeypatch.setenv("MINIPT_BACKEND", "torch")
    torch.testing.assert_close(cross_entropy(x, t), F.cross_entropy(x, t))


def test_auto_on_a_cpu_runs_the_native_kernels_or_torch_without_the_extension(monkeypatch):
    from minipt.ops import _backend, resolve_backends

    monkeypatch.delenv("MINIPT_BACKEND", raising=False)
    assert set(resolve_backends("auto", "cpu").values()) == {"native"}
    monkeypatch.setattr(_backend, "native_import_error", lambda: "no module named minipt._C")
    assert set(resolve_backends("auto", "cpu").values()) == {"torch"}


def test_triton_on_cpu_outside_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend='triton'"):
        cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), backend="triton")


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError, "q must have 4"),
        (lambda: attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 4, 8)), ValueError, "one shape"),
        (lambda: attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).double(), torch.randn(1, 1, 4, 8)), TypeError, "k has dtype"),
        (lambda: attention(*(torch.randn(2, 1, 4, 8) for _ in range(3)), attention_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "attention_mask must have shape"),
        (lambda: attention(*(torch.randn(2, 1, 4, 8) for _ in range(3)), attention_mask=torch.zeros(2, 4)), TypeError, "attention_mask must be bool"),
        (lambda: attention(*(torch.randn(2, 1, 4, 8).long() for _ in range(3))), TypeError, "q must have dtype"),
        (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1])), RuntimeError, r"target values must be in \[0, 5\)"),
        (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, -1, 1])), RuntimeError, "target values"),
        (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1]),), ValueError, "target must have shape"),
        (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0])), TypeError, "target must have dtype"),
        (lambda: cross_entropy(torch.randn(3, 5, 2), torch.tensor([0, 1, 2])), ValueError, "logits must have 2"),
        (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), reduction="avg"), ValueError, "reduction must be"),
        (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 5), torch.tensor([0, 1, 2])), ValueError, "weight must have shape"),
        (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4).double(), torch.tensor([0, 1, 2])), TypeError, "weight has dtype"),
        (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2]), bias=torch.randn(6)), ValueError, "bias must have shape"),
        (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 9, 2])), RuntimeError, "target values"),
        (lambda: mlm_mask(torch.randn(2, 3), mask_token_id=1, vocab_size=5), TypeError, "input_ids must have dtype"),
        (lambda: mlm_mask(torch.zeros(2, 3, dtype=torch.long), mask_token_id=5, vocab_size=5), ValueError, "mask_token_id"),
        (lambda: mlm_mask(torch.zeros(2, 3, dtype=torch.long), mask_token_id=1, vocab_size=0), ValueError, "vocab_size"),
        (lambda: mlm_mask(torch.zeros(2, 3, dtype=torch.long), mask_token_id=1, vocab_size=5, mlm_probability=1.2), ValueError, "mlm_probability"),
        (lambda: mlm_mask(torch.zeros(2, 3, dtype=torch.long), mask_token_id=1, vocab_size=5, special_tokens_mask=torch.zeros(3, 2, dtype=torch.bool)), ValueError, "special_tokens_mask must have the shape"),
        (lambda: mlm_mask(torch.zeros(2, 3, dtype=torch.long), mask_token_id=1, vocab_size=5, seed=-1), ValueError, "seed"),
    ],
)
def test_bad_input_is_named(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_torch_backend_compiles_without_graph_breaks():
    f = torch.compile(lambda x, t: cross_entropy(x, t, backend="torch"), fullgraph=True, backend="eager")
    x = torch.randn(8, 33, requires_grad=True)
    t = torch.randint(0, 33, (8,))
    t[1] = -100
    torch.testing.assert_close(f(x, t), F.cross_entropy(x, t))
