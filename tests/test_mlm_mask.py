"""mlm_mask on every backend: one stream, the contract, and the statistics of its draws.

The torch reference defines the stream (Philox4x32-10 keyed by the seed, counted by
element), and every backend must reproduce it bit for bit, so most tests compare
with ``torch.equal``. The statistical tests check that the stream itself gives
BERT's rates; each allows 4σ, and with fixed seeds a run is deterministic, so a
pass is not luck that can flip.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAS_CUDA, TRITON_DEVICE
from minipt.ops import BackendUnavailableError, mlm_mask
from minipt.ops._triton import jit, tl
from minipt.ops.mlm_mask import (
    IGNORE_INDEX, masked_capacity, masked_positions, mlm_mask_ref, philox4x32_10,
)

BACKENDS = ["torch", "triton", "native"]
V, MASK_ID = 1000, 4
SEEDS = [0, 1, 2**32 + 123, 2**40 + 123, 2**63 - 1]
SPECIAL_DTYPES = [None, torch.bool, torch.uint8, torch.int32, torch.int64]
# Random123's known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def batch(shape=(256, 512), dtype=torch.int64, special_rate=0.1, device=TRITON_DEVICE):
    """Ids in [5, V) with [CLS]/[SEP] at both ends and scattered special positions."""
    ids = torch.randint(5, V, shape, dtype=dtype, device=device)
    special = torch.rand(shape, device=device) < special_rate
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


def assert_same(got, want, what):
    for name, g, w in zip(("masked", "labels"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {name} is {g.dtype} {tuple(g.shape)}"
        assert torch.equal(g.cpu(), w.cpu()), f"{what}: {name} differs at {(g.cpu() != w.cpu()).nonzero()[:5].tolist()}"


# ----------------------------------------------------------------------------- the stream
@pytest.mark.parametrize("device", ["cpu", "cuda"] if HAS_CUDA else ["cpu"])
def test_philox_matches_random123_known_answers(device):
    for counter, key, want in PHILOX_KNOWN_ANSWERS:
        words = [torch.tensor([c], dtype=torch.int64, device=device) for c in counter]
        assert tuple(int(w) for w in philox4x32_10(*words, *key)) == want


@jit
def _philox_known_answer_kernel(Counter_ptr, Out_ptr, seed):
    c0 = tl.load(Counter_ptr).to(tl.uint32)
    c1 = tl.load(Counter_ptr + 1).to(tl.uint32)
    c2 = tl.load(Counter_ptr + 2).to(tl.uint32)
    c3 = tl.load(Counter_ptr + 3).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, 10)
    tl.store(Out_ptr, w0.to(tl.int64))
    tl.store(Out_ptr + 1, w1.to(tl.int64))
    tl.store(Out_ptr + 2, w2.to(tl.int64))
    tl.store(Out_ptr + 3, w3.to(tl.int64))


def test_triton_philox_keys_and_counts_as_random123():
    """The kernel's tl.philox takes the key as seed = k1 · 2**32 + k0 and returns Random123's word order."""
    for counter, (k0, k1), want in PHILOX_KNOWN_ANSWERS:
        out = torch.full((4,), -1, dtype=torch.int64, device=TRITON_DEVICE)
        _philox_known_answer_kernel[(1,)](torch.tensor(counter, device=TRITON_DEVICE), out, k1 << 32 | k0)
        assert tuple(out.tolist()) == want


@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (3, 5, 67)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("special_dtype", SPECIAL_DTYPES)
def test_backends_agree_bit_for_bit(shape, id_dtype, special_dtype, poisoned_empty):
    ids, special = batch(shape, dtype=id_dtype, special_rate=0.2)
    special = None if special_dtype is None else special.to(special_dtype)
    for seed in SEEDS:
        kw = dict(mask_token_id=MASK_ID, vocab_size=V, special_tokens_mask=special, mlm_probability=0.4, seed=seed)
        want = mlm_mask(ids, **kw, backend="torch")
        for backend in ("triton", "native"):
            assert_same(mlm_mask(ids, **kw, backend=backend), want, f"{backend}, seed {seed}")
    if ids.numel() >= 1000:  # the comparison saw all three actions
        masked, labels = want
        selected = labels != IGNORE_INDEX
        assert (masked[selected] == MASK_ID).any() and (masked[selected] == ids[selected]).any()
        assert ((masked != MASK_ID) & (masked != ids)).any()


@pytest.mark.parametrize("id_dtype, vocab", [(torch.int32, 2**31 - 1), (torch.int64, 2**40), (torch.int64, 2**63 - 1)])
def test_backends_agree_on_random_ids_of_any_vocab(id_dtype, vocab):
    ids = torch.zeros(4000, dtype=id_dtype, device=TRITON_DEVICE)
    kw = dict(mask_token_id=3, vocab_size=vocab, mlm_probability=1.0, seed=2**40 + 123)
    want = mlm_mask(ids, **kw, backend="torch")
    drawn = want[0][(want[0] != 3) & (want[0] != 0)]
    assert drawn.numel() > 300 and drawn.max().item() >= vocab // 2 and drawn.min().item() >= 0
    for backend in ("triton", "native"):
        assert_same(mlm_mask(ids, **kw, backend=backend), want, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_masks_as_its_contiguous_copy(backend):
    ids, special = batch((64, 48))
    kw = dict(mask_token_id=MASK_ID, vocab_size=V, seed=2**32 + 123)
    got = mlm_mask(ids.t(), special_tokens_mask=special.t(), **kw, backend=backend)
    assert got[0].shape == (48, 64)
    assert_same(got, mlm_mask_ref(ids.t().contiguous(), special_tokens_mask=special.t().contiguous(), **kw), backend)
    # A strided view (every other column of a 3-D tensor) as well.
    ids3, special3 = batch((3, 10, 20))
    ids3, special3 = ids3[:, :, ::2], special3[:, :, ::2]
    got = mlm_mask(ids3, special_tokens_mask=special3, **kw, backend=backend)
    assert_same(got, mlm_mask_ref(ids3.contiguous(), special_tokens_mask=special3.contiguous(), **kw), backend)


def test_selection_threshold_is_exact_at_its_boundary():
    """Take p exactly at an element's selection draw u / 2**24: that element is
    selected at p = (u + 1) / 2**24 and not at p = u / 2**24, on every backend
    (the native kernels receive p in float32, so this checks its rounding too)."""
    n, seed = 64, 2**40 + 123
    ids = torch.randint(5, V, (n,), device=TRITON_DEVICE)
    groups = torch.arange(n // 4, device=TRITON_DEVICE)
    zero = torch.zeros_like(groups)
    words = torch.stack(philox4x32_10(groups, zero, zero, zero, seed & 0xFFFFFFFF, seed >> 32), dim=1).view(-1)
    k = 37
    u = int(words[k]) >> 8
    for p, chosen in ((u / 2**24, False), ((u + 1) / 2**24, True)):
        kw = dict(mask_token_id=MASK_ID, vocab_size=V, mlm_probability=p, seed=seed)
        want = mlm_mask(ids, **kw, backend="torch")
        assert bool(want[1][k] != IGNORE_INDEX) == chosen
        for backend in ("triton", "native"):
            assert_same(mlm_mask(ids, **kw, backend=backend), want, f"{backend}, p = {p}")


@pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device: each backend on CUDA is compared with the CPU reference on the GPU machine"
)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_cuda_gives_the_cpu_reference_bits(backend, id_dtype):
    ids, special = batch((37, 515), dtype=id_dtype, device="cpu")
    for seed in SEEDS:
        kw = dict(mask_token_id=MASK_ID, vocab_size=V, mlm_probability=0.3, seed=seed)
        want = mlm_mask(ids, special_tokens_mask=special, **kw, backend="torch")
        assert_same(mlm_mask(ids.cuda(), special_tokens_mask=special.cuda(), **kw, backend=backend), want, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_to_one_graph(backend):
    if backend == "triton" and not HAS_CUDA:
        pytest.skip(
            "under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction, which torch.library.wrap_triton "
            "passes through untraced, so tracing would run the interpreter on fake tensors; compiled on CUDA"
        )
    ids, special = batch((8, 33))

    def mask_fn(ids, special):
        return mlm_mask(
            ids, mask_token_id=MASK_ID, vocab_size=V, special_tokens_mask=special, seed=2**40 + 123, backend=backend
        )

    # fullgraph=True fails on any graph break. Inductor spends minutes fusing the
    # reference's ~500 integer ops into one kernel (over 10 on a 2-core CPU), so the
    # reference stops at the traced graph (aot_eager); the custom ops compile fully.
    compiler = "aot_eager" if backend == "torch" else "inductor"
    torch._dynamo.reset()
    assert_same(torch.compile(mask_fn, fullgraph=True, backend=compiler)(ids, special), mask_fn(ids, special), backend)


# ----------------------------------------------------------------------------- statistics and the contract
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
    # The key takes both words of the seed: seeds that differ only above bit 31 differ too.
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
        (dict(vocab_size=2**63), ValueError, "vocab_size must be a positive int <= 9223372036854775807"),
        (dict(input_ids=torch.zeros(2, 3, dtype=torch.int32), vocab_size=2**31), ValueError, "int32 id"),
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
    # Seeds and vocab sizes below 2**31 reach the kernel as i32, larger ones as i64.
    for ids, special, has_special, scalar in (
        ("*i64", "*u8", True, "i64"), ("*i32", "*i64", True, "i32"), ("*i64", "*i64", False, "i32"),
    ):
        sig = {"Ids_ptr": ids, "Special_ptr": special, "Out_ptr": ids, "Labels_ptr": ids, "n_elements": "i64",
               "seed": scalar, "select_below": "i32", "mask_below": "i32", "random_below": "i32",
               "mask_token_id": "i32", "vocab_size": scalar, "HAS_SPECIAL": "constexpr", "GROUPS": "constexpr"}
        src = ASTSource(fn=mm._mlm_mask_kernel, signature=sig, constexprs={"HAS_SPECIAL": has_special, "GROUPS": 256})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]
""")


@pytest.mark.slow
def test_kernel_compiles_for_sm90():
    """The interpreter does not type-check as the compiler does; compile each variant for an H100 (no GPU needed)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_triton_outside_interpreter_on_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend='triton'"):
        mlm_mask(torch.zeros(2, 3, dtype=torch.long), mask_token_id=1, vocab_size=5, backend="triton")
