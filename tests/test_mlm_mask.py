"""mlm_mask on every backend: the contract, and the statistics of its draws.

Backends draw from different generators, so they agree with the reference in
distribution, not element by element. Each statistical check allows 4σ; with
fixed seeds a run is deterministic, so a pass is not luck that can flip.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import TRITON_DEVICE
from minipt.ops._backend import BackendUnavailableError
from minipt.ops import mlm_mask
from minipt.ops.mlm_mask import IGNORE_INDEX, masked_capacity, masked_positions

BACKENDS = ["torch", "triton", "native"]
V, MASK_ID = 1000, 4


def batch(shape=(256, 512), dtype=torch.int64, special_rate=0.1):
    """Ids in [5, V) with [CLS]/[SEP] at both ends and scattered special positions."""
    ids = torch.randint(5, V, shape, dtype=dtype, device=TRITON_DEVICE)
    special = torch.rand(shape, device=TRITON_DEVICE) < special_rate
    special[..., 0] = special[..., -1] = True
    ids[special] = 2
    return ids, special


def within(observed: float, expected: float, n: int, slack: float = 0.0) -> bool:
    """|observed - expected| within 4σ of a binomial proportion over n trials (+ slack)."""
    return abs(observed - expected) <= 4 * math.sqrt(expected * (1 - expected) / n) + slack


def chi2_bound(dof: int, z: float = 4.0) -> float:
    """The upper z-sigma quantile of χ²(dof), by the Wilson–Hilferty approximation."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_rates_split_and_labels(backend, poisoned_empty):
    ids, special = batch()
    before = ids.clone()
    masked, labels = mlm_mask(ids, mask_token_id=MASK_ID, vocab_size=V, special_tokens_mask=special, seed=3, backend=backend)
    assert torch.equal(ids, before), "input_ids was modified"
    assert masked.shape == ids.shape and labels.shape == ids.shape
    assert masked.dtype == ids.dtype and labels.dtype == ids.dtype

    selected = labels != IGNORE_INDEX
    assert not selected[special].any(), "a special position was selected"
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    assert ((masked >= 0) & (masked < V)).all()

    n = int((~special).sum())
    k = int(selected.sum())
    assert within(k / n, 0.15, n)
    to_mask = (masked[selected] == MASK_ID).float().mean().item()
    kept = (masked[selected] == ids[selected]).float().mean().item()
    to_random = 1 - to_mask - kept
    # A random draw can land on the original id or on [MASK] (1/V each).
    assert within(to_mask, 0.8, k, slack=1 / V)
    assert within(kept, 0.1, k, slack=1 / V)
    assert within(to_random, 0.1, k, slack=2 / V)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_ids_are_uniform(backend):
    vocab, mask_id = 16, 0
    # Ids outside the vocabulary make every random replacement recognisable.
    ids = torch.full((128, 512), 10**6, dtype=torch.int64, device=TRITON_DEVICE)
    masked, labels = mlm_mask(ids, mask_token_id=mask_id, vocab_size=vocab, mlm_probability=1.0, seed=11, backend=backend)
    assert (labels == ids).all()
    drawn = masked[(masked != ids) & (masked != mask_id)]
    assert ((drawn > 0) & (drawn < vocab)).all()
    # A draw of [MASK] itself looks like masking, so test the other vocab - 1 ids.
    counts = torch.bincount(drawn, minlength=vocab)[1:].double()
    expected = counts.sum() / (vocab - 1)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_bound(vocab - 2), f"random ids are not uniform: chi2 = {chi2:.1f}"
    assert within(drawn.numel() / ids.numel(), 0.1 * (vocab - 1) / vocab, ids.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_are_independent_across_positions(backend):
    ids, _ = batch(special_rate=0.0)
    p = 0.15
    _, labels = mlm_mask(ids, mask_token_id=MASK_ID, vocab_size=V, mlm_probability=p, seed=5, backend=backend)
    sel = (labels != IGNORE_INDEX).double()
    rows, cols = sel.shape
    assert len({tuple(r.tolist()) for r in sel.bool()}) == rows, "two rows share a selection pattern"
    # Rates per column and per row: χ² of the binomial counts against p.
    for counts, trials, dof in ((sel.sum(0), rows, cols), (sel.sum(1), cols, rows)):
        chi2 = ((counts - trials * p) ** 2 / (trials * p * (1 - p))).sum().item()
        assert chi2 < chi2_bound(dof), f"selection rate depends on the position: chi2 = {chi2:.0f} over {dof}"
    # Neighbours along a row, and the same column of neighbouring rows.
    for a, b in ((sel[:, :-1], sel[:, 1:]), (sel[:-1], sel[1:])):
        corr = torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()
        assert abs(corr) < 4 / math.sqrt(a.numel()), f"neighbouring selections correlate: {corr:.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result_and_different_seed_differs(backend):
    ids, special = batch((32, 128))
    kw = dict(mask_token_id=MASK_ID, vocab_size=V, special_tokens_mask=special, backend=backend)
    a = mlm_mask(ids, seed=123, **kw)
    b = mlm_mask(ids, seed=123, **kw)
    c = mlm_mask(ids, seed=124, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # Seeds that differ only above bit 31 differ too (torch's CPU generator keeps
    # only the low 32 bits of a seed, so the reference folds the high word in).
    for high in (2**32 + 123, 2**40 + 123, 2**62 + 123):
        d = mlm_mask(ids, seed=high, **kw)
        assert not torch.equal(a[1], d[1]), high


@pytest.mark.parametrize("backend", BACKENDS)
def test_probability_zero_and_one(backend, poisoned_empty):
    ids, special = batch((16, 100))
    masked, labels = mlm_mask(
        ids, mask_token_id=MASK_ID, vocab_size=V, special_tokens_mask=special, mlm_probability=0.0, backend=backend
    )
    assert (labels == IGNORE_INDEX).all() and torch.equal(masked, ids)
    masked, labels = mlm_mask(
        ids, mask_token_id=MASK_ID, vocab_size=V, special_tokens_mask=special, mlm_probability=1.0, backend=backend
    )
    assert torch.equal(labels[~special], ids[~special])
    assert (labels[special] == IGNORE_INDEX).all() and torch.equal(masked[special], ids[special])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("special_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
def test_int32_ids_and_special_mask_dtypes(backend, special_dtype, poisoned_empty):
    ids, special = batch((8, 77), dtype=torch.int32)
    masked, labels = mlm_mask(
        ids, mask_token_id=MASK_ID, vocab_size=V, special_tokens_mask=special.to(special_dtype), mlm_probability=0.5,
        backend=backend,
    )
    assert masked.dtype == torch.int32 and labels.dtype == torch.int32
    selected = labels != IGNORE_INDEX
    assert selected.any() and not selected[special].any()
    assert torch.equal(labels[selected], ids[selected])
    assert ((masked >= 0) & (masked < V)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (1023,), (3, 5, 67)])
def test_any_shape_and_every_element_written(backend, shape, poisoned_empty):
    ids = torch.randint(0, V, shape, device=TRITON_DEVICE)
    masked, labels = mlm_mask(ids, mask_token_id=MASK_ID, vocab_size=V, mlm_probability=0.5, seed=9, backend=backend)
    assert masked.shape == shape and labels.shape == shape
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    assert ((masked >= 0) & (masked < V)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    ids, special = batch((64, 48))
    kw = dict(mask_token_id=MASK_ID, vocab_size=V, seed=2, backend=backend)
    masked, labels = mlm_mask(ids.t(), special_tokens_mask=special.t(), **kw)
    assert masked.shape == (48, 64)
    want_masked, want_labels = mlm_mask(ids.t().contiguous(), special_tokens_mask=special.t().contiguous(), **kw)
    assert torch.equal(masked, want_masked) and torch.equal(labels, want_labels)


def test_masked_positions_pair_hidden_rows_with_labels():
    ids, special = batch((4, 33))
    _, labels = mlm_mask(ids, mask_token_id=MASK_ID, vocab_size=V, special_tokens_mask=special, mlm_probability=0.3, backend="torch")
    count = int((labels != IGNORE_INDEX).sum())
    capacity = count + 7
    pos = masked_positions(labels, capacity)
    assert pos.dtype == torch.int64 and pos.shape == (capacity,)
    want = torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).view(-1)
    assert torch.equal(pos[:count], want)
    assert (pos[count:] == 0).all()  # padding slots, which the caller masks out
    hidden = torch.arange(labels.numel(), device=labels.device).view(*labels.shape, 1).float()
    assert torch.equal(hidden.view(-1, 1)[pos, 0].long(), pos)
    assert torch.equal(masked_positions(labels, count), want)
    with pytest.raises(RuntimeError, match="more labelled positions than capacity"):
        masked_positions(labels, count - 1)
    with pytest.raises(TypeError, match="labels must have dtype"):
        masked_positions(labels.float(), capacity)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        masked_positions(labels, 0)


def test_masked_capacity_bounds_the_binomial_tail():
    for n, p in [(1, 0.15), (10, 0.15), (4096, 0.15), (256 * 512, 0.15), (1000, 0.5), (1000, 1.0), (1000, 0.0)]:
        cap = masked_capacity(n, p)
        assert 1 <= cap <= max(n, 1) or n == 0
        # mean + 8 sd, unless that exceeds n
        assert cap >= min(n, n * p + 8 * (n * p * (1 - p)) ** 0.5)
    # 100k draws at BERT's rate never pass the bound
    labels = torch.rand(100_000, 512) < 0.15
    assert int(labels.sum(1).max()) <= masked_capacity(512, 0.15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(input_ids=torch.zeros(2, 3)), TypeError, "input_ids must have dtype"),
        (dict(input_ids=torch.zeros(2, 3, dtype=torch.int16)), TypeError, "input_ids must have dtype"),
        (dict(mask_token_id=V), ValueError, "mask_token_id must be an int in"),
        (dict(mask_token_id=-1), ValueError, "mask_token_id must be an int in"),
        (dict(vocab_size=0), ValueError, "vocab_size must be a positive int"),
        (dict(vocab_size=2.5), ValueError, "vocab_size must be a positive int"),
        (dict(mlm_probability=-0.1), ValueError, "mlm_probability must be a float in"),
        (dict(mlm_probability=1.5), ValueError, "mlm_probability must be a float in"),
        (dict(special_tokens_mask=torch.zeros(3, 2, dtype=torch.bool)), ValueError, "special_tokens_mask must have the shape"),
        (dict(special_tokens_mask=torch.zeros(2, 3)), TypeError, "special_tokens_mask must have dtype"),
        (dict(seed=-1), ValueError, "seed must be an int"),
    ],
)
def test_bad_input_is_named(backend, kwargs, exc, pattern):
    args = dict(input_ids=torch.zeros(2, 3, dtype=torch.long), mask_token_id=MASK_ID, vocab_size=V)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        mlm_mask(**args, backend=backend)


# Compiled in a fresh process, where TRITON_INTERPRET is off, down to sm_90 machine code.
COMPILE_FOR_SM90 = textwrap.dedent("""
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mm = importlib.import_module("minipt.ops.mlm_mask")
    for ids, special, has_special in (("*i64", "*u8", True), ("*i32", "*i64", True), ("*i64", "*i64", False)):
        sig = {"Ids_ptr": ids, "Special_ptr": special, "Out_ptr": ids, "Labels_ptr": ids, "n_elements": "i64",
               "seed": "i64", "select_threshold": "i32", "mask_threshold": "i32", "random_threshold": "i32",
               "mask_token_id": "i32", "vocab_size": "i32", "HAS_SPECIAL": "constexpr", "BLOCK": "constexpr"}
        src = ASTSource(fn=mm._mlm_mask_kernel, signature=sig, constexprs={"HAS_SPECIAL": has_special, "BLOCK": 1024})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]
""")


def test_kernel_compiles_for_sm90():
    """The interpreter does not type-check as the compiler does; compile each variant for an H100 (no GPU needed)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_triton_vocab_beyond_32_bits_is_refused():
    ids = torch.zeros(2, 3, dtype=torch.long, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="vocab_size must be < 2\\*\\*32"):
        mlm_mask(ids, mask_token_id=1, vocab_size=2**32, backend="triton")


def test_triton_outside_interpreter_on_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend='triton'"):
        mlm_mask(torch.zeros(2, 3, dtype=torch.long), mask_token_id=1, vocab_size=5, backend="triton")
