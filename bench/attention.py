"""Attention forward and forward + backward: minipt's kernels against PyTorch's SDPA backends.

Providers, all on the same q, k, v of shape (B, H, T, D):

* ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``:
  ``F.scaled_dot_product_attention`` held to one backend with ``sdpa_kernel``; a
  backend that refuses a shape (flash takes no mask, efficient and cuDNN no CPU
  tensors) is reported as skipped with its reason;
* ``sdpa``: SDPA left to choose its own backend;
* ``naive``: PyTorch attention that materialises the (B, H, T, T) scores and the
  softmax (in fp32), as written by hand;
* ``minipt-triton``: ``attention(backend="triton")``, CUDA only: on the CPU it
  would run in the Triton interpreter, which times nothing useful;
* ``minipt-native``: ``attention(backend="native")``, the CUDA kernels on CUDA and
  the C++ kernels on the CPU, skipped where it raises BackendUnavailableError.

Cases. The sweeps hold B·T at 16k tokens and H·D at 2048 (H = 2048 / D: 32 heads
of 64, 16 of 128), bf16, T from 512 to 8192, D 64 and 128, causal and
bidirectional; ``ratio`` is ``sdpa-flash``'s time over the row's. The BERT case is
a padded batch: B = 32, H = 12, D = 64, T = 512, lengths uniform in [64, 512]
(seed 0), given to minipt as ``attention_mask`` and to SDPA as the equivalent
boolean (B, 1, 1, T) mask; its ``ratio`` is ``sdpa``'s time (SDPA's own choice for
a masked call) over the row's.

Packed cases (``document_ids``): a GPT row of T = 8192 packed with causal
documents of lengths uniform in [256, 2048], the last one cut at the row's end,
and a BERT batch of T = 512 packed from sentence pairs whose two segments are
each uniform in [32, 256] tokens, a pair that does not fit starting the next row
and the rest padded. Providers: minipt's kernels, SDPA given the equivalent
boolean (B, 1, T, T) mask, FlexAttention's document mask (a ``BlockMask``,
compiled) where torch has it, and dense attention over the same T (causal for
GPT, padding only for BERT), the cost packing would have without document
skipping. Their FLOPs count each document's own scores, 4·H·D·Σ lenᵢ² (halved
when causal). Each packed case also reports the exact (query block, key block)
tiles minipt visits against the dense count, with the sm_90 bf16 launch table's
tiles (``attention_tiles``): on any machine, a CPU included, that figure is exact.

Sliding window (``WINDOW_GPU``): two GPT rows of T = 8192, H = 16, D = 64, causal, each
query seeing itself and the 1023 keys before it (``window_size=(1023, 0)``), bf16;
``--quick`` times fwd+bwd alone.
Providers: minipt's kernels, FlexAttention's sliding-window ``BlockMask``
(compiled) where torch has it, SDPA given the equivalent boolean (T, T) mask,
and dense causal SDPA over the same T, the cost without a window. Their FLOPs
count the visible (query, key) pairs, 4·B·H·D·Σᵢ min(i + 1, 1024). The case also
reports the tiles minipt visits against the causal tiles, with the sm_90 bf16
launch table's tiles, on any machine.

CPU cases (``CPU_NATIVE``, on the CPU only): the native C++ kernels against
SDPA, float32, at sizes two cores time in seconds, the two providers taking
turns round after round (``bench.native_cpu.interleaved_ms``), so that load from
elsewhere on a shared machine falls on both; ``ratio`` is ``sdpa``'s median over
the row's. ``cpu-causal``: B = 2, H = 8, T = 1024, D = 64, SDPA with
``is_causal``. ``cpu-packed``: B = 2, H = 4, T = 4096, D = 64, causal, each row
cut into 8 documents at 7 random points (seed 0), SDPA given the boolean
(B, 1, T, T) mask, FLOPs counted as in the packed cases above. ``cpu-bert-padded``: B = 4, H = 8, T = 512, D = 64, lengths
uniform in [64, 512] (seed 0), SDPA given the boolean (B, 1, 1, T) mask.
``cpu-window``: B = 2, H = 4, T = 4096, D = 64, causal with a window of 512 keys,
SDPA given the boolean (T, T) mask, FLOPs counted as in the window case above.

PyTorch's peers (``PEERS``), each given the masks of the row it joins:
``flex`` is FlexAttention (``flex_attention`` under ``torch.compile``) with
the equivalent ``BlockMask``, built at the first call and kept, so that the
timed calls run the attention alone; ``varlen`` is ``varlen_attn`` (CUDA only)
with each document, or each row's real tokens, one sequence of a (tokens, H,
D) batch cut by ``cu_seq`` offsets, its timings including the copies into that
layout and back. On CUDA both join the padded and packed rows; on the CPU
FlexAttention joins the ``CPU_PEER_CASES`` (causal, packed, padded), forward
only: PyTorch's FlexAttention has no backward on the CPU (it raises), and its
fwd+bwd rows say so; ``--quick`` leaves it out, as compiling it for the CPU
takes about a minute a mask on two cores. ``ratio_vs_flex`` is FlexAttention's median over the
row's. A torch without one of them gets a row saying so. Compilation never
counts: every provider's first call, untimed, compiles it.

FLOPs: 4·B·H·T²·D for the forward (QKᵀ and PV), halved when causal; the backward
counts 2.5× the forward, so forward + backward is 3.5×. A padded case counts the
real keys only (4·H·T·D·Σ lengths), the work a kernel that skips padding must do.
``mode="fwd"`` runs under ``torch.no_grad()``; ``fwd+bwd`` computes dq, dk and dv
for a fixed random output gradient. CPU figures (fp32) say nothing about a GPU.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import add_ratios, cli, peak_memory_bytes, time_ms
from bench.native_cpu import interleaved_ms
from minipt.ops._backend import BackendUnavailableError
from minipt.ops import attention
from minipt.ops.attention import visible_keys
from minipt.ops.attention._tiles import attention_tiles
from minipt.ops.attention.triton import _CONFIGS

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
PROVIDERS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "sdpa", "naive", "minipt-triton", "minipt-native")
SWEEP_BASELINE, PADDED_BASELINE = "sdpa-flash", "sdpa"
MODES = ("fwd", "fwd+bwd")

GPU_TOKENS, GPU_WIDTH, GPU_TS, GPU_QUICK_TS = 16384, 2048, (512, 1024, 2048, 4096, 8192), (1024, 4096)
CPU_TOKENS, CPU_WIDTH, CPU_TS, CPU_QUICK_TS = 1024, 256, (128, 256), (128,)
# The materialising providers hold (B, H, T, T) scores: 4 GiB in fp32 at T = 8192, more in the backward.
MATERIALISED_MAX_T = 4096
BERT_GPU = {"B": 32, "H": 12, "D": 64, "T": 512, "min_len": 64}
BERT_CPU = {"B": 4, "H": 2, "D": 64, "T": 128, "min_len": 16}
# Packed rows: (B, H, D, T, shortest and longest document or segment, causal, sentence pairs).
PACKED_GPU = {"gpt-packed": (2, 16, 64, 8192, 256, 2048, True, False),
              "bert-packed": (32, 12, 64, 512, 32, 256, False, True)}
PACKED_PROVIDERS = ("minipt-triton", "minipt-native", "sdpa", "flex", "varlen", "dense")
# PyTorch's peers of the padded and packed rows, and the CPU cases FlexAttention joins (module docstring).
PEERS = ("flex", "varlen")
CPU_PEER_CASES = ("cpu-causal", "cpu-packed", "cpu-bert-padded")
FLEX_COMPILED = True  # the tests run it eagerly: compiling it on two cores takes about a minute a mask
# Sliding window: (B, H, D, T, keys each query sees), causal.
WINDOW_GPU = {"gpt-window": (2, 16, 64, 8192, 1024)}
WINDOW_PROVIDERS = ("minipt-triton", "minipt-native", "flex", "sdpa", "dense")
# The C++ kernels against SDPA on the CPU: (B, H, T, D) of each case (see the module docstring).
CPU_NATIVE = {"cpu-causal": (2, 8, 1024, 64), "cpu-packed": (2, 4, 4096, 64), "cpu-bert-padded": (4, 8, 512, 64),
              "cpu-window": (2, 4, 4096, 64)}
CPU_DOCUMENTS, CPU_BERT_MIN_LEN, CPU_WINDOW = 8, 64, 512


def naive_attention(q, k, v, *, is_causal=False, key_mask=None):
    """softmax(q kᵀ / sqrt(D) + mask) v with the scores and probabilities materialised."""
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, T, T)
    T = q.shape[-2]
    if is_causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1).to(q.dtype) @ v


def make_fn(provider: str, is_causal: bool, key_mask: torch.Tensor | None, document_ids: torch.Tensor | None = None,
            window_size: tuple[int, int] | None = None):
    """fn(q, k, v) -> out for one provider; ``key_mask`` is the (B, T) bool padding mask or None,
    ``document_ids`` the (B, T) ids of packed rows or None, ``window_size`` a sliding window
    (``attention``'s convention) or None ("flex" and "dense" are for packed rows or windows only)."""
    sdpa_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T), True = attend
    if window_size is not None:
        return _windowed_fn(provider, is_causal, window_size)
    if provider in PEERS:
        return peer_fn(provider, is_causal, key_mask, document_ids)
    if document_ids is not None:
        return _packed_fn(provider, is_causal, key_mask, document_ids)
    if provider.startswith("sdpa"):
        backend = SDPA_BACKENDS.get(provider)

        def fn(q, k, v):
            with sdpa_kernel([backend]) if backend is not None else nullcontext():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=is_causal)

        return fn
    if provider == "naive":
        return lambda q, k, v: naive_attention(q, k, v, is_causal=is_causal, key_mask=key_mask)
    backend = provider.removeprefix("minipt-")
    return lambda q, k, v: attention(q, k, v, is_causal=is_causal, attention_mask=key_mask, backend=backend)


def _packed_fn(provider, is_causal, key_mask, document_ids):
    if provider == "sdpa":
        visible = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (B, 1, T, T)
        if key_mask is not None:
            visible = visible & key_mask[:, None, None, :]
        if is_causal:
            visible = visible & torch.ones_like(visible[0, 0]).tril()
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    if provider == "dense":
        dense_mask = None if key_mask is None else key_mask[:, None, None, :]
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, is_causal=is_causal)
    backend = provider.removeprefix("minipt-")
    return lambda q, k, v: attention(q, k, v, is_causal=is_causal, attention_mask=key_mask,
                                     document_ids=document_ids, backend=backend)


def _windowed_fn(provider, is_causal, window_size):
    """make_fn for a sliding window. Masks are built at the first call (the warm-up), once per length,
    so that the timed calls run the attention alone."""
    left, right = window_size
    masks = {}
    if provider == "sdpa":
        def fn(q, k, v):
            T = q.shape[-2]
            if T not in masks:
                masks[T] = visible_keys(T, None, is_causal, q.device, window_size=window_size)  # (1, 1, T, T)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[T])

        return fn
    if provider == "dense":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    if provider == "flex":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as exc:
            raise BackendUnavailableError(f"flex_attention is not in this torch: {exc}") from exc
        compiled = torch.compile(flex_attention)

        def mask_mod(b, h, q_idx, kv_idx):
            near = ((q_idx - kv_idx <= left) | (left == -1)) & ((kv_idx - q_idx <= right) | (right == -1))
            return near & (q_idx >= kv_idx) if is_causal else near

        def fn(q, k, v):
            if q.device.type != "cuda":
                raise BackendUnavailableError("flex_attention is timed on CUDA only")
            T = q.shape[-2]
            if T not in masks:
                masks[T] = create_block_mask(mask_mod, None, None, T, T, device=q.device)
            return compiled(q, k, v, block_mask=masks[T])

        return fn
    backend = provider.removeprefix("minipt-")
    return lambda q, k, v: attention(q, k, v, is_causal=is_causal, window_size=window_size, backend=backend)


# ----------------------------------------------------------------------------- PyTorch's peers
def peer_fn(provider, is_causal, key_mask, document_ids):
    """make_fn for ``PEERS``: raises BackendUnavailableError where this torch or device lacks the op."""
    if provider == "flex":
        return flex_fn(is_causal, key_mask, document_ids)
    return varlen_fn(is_causal, key_mask, document_ids)


def flex_fn(is_causal, key_mask, document_ids):
    """FlexAttention with the BlockMask of minipt's arguments, built at the first call for each (B, T)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise BackendUnavailableError(f"flex_attention is not available in this torch ({torch.__version__})") from exc
    # Static shapes: once torch.compile has seen two shapes it recompiles for dynamic ones, and the CPU's
    # dynamic FlexAttention ran the packed case 60x slower than its static one.
    run = torch.compile(flex_attention, dynamic=False) if FLEX_COMPILED else flex_attention
    per_row = key_mask is not None or document_ids is not None
    block_masks = {}

    def mask_mod(b, h, q_idx, kv_idx):
        visible = q_idx >= kv_idx if is_causal else kv_idx >= 0
        if key_mask is not None:
            visible = visible & key_mask[b, kv_idx]
        if document_ids is not None:
            visible = visible & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        return visible

    def fn(q, k, v):
        if not torch.is_grad_enabled():  # on the CPU FlexAttention refuses inputs that require grad
            q, k, v = q.detach(), k.detach(), v.detach()
        B, T = q.shape[0], q.shape[-2]
        if (B, T) not in block_masks:
            block_masks[B, T] = create_block_mask(mask_mod, B if per_row else None, None, T, T, device=q.device)
        return run(q, k, v, block_mask=block_masks[B, T])

    return fn


def varlen_sequences(key_mask, document_ids):
    """(tokens, cu_seq, max_len) for varlen_attn: the flat positions of the real tokens of (B, T) rows, the
    int32 offsets of each document (or each row) among them, and the longest."""
    ids = document_ids if document_ids is not None else torch.zeros_like(key_mask, dtype=torch.int64)
    B, T = ids.shape
    real = key_mask.reshape(-1) if key_mask is not None else torch.ones(B * T, dtype=torch.bool, device=ids.device)
    tokens = real.nonzero().squeeze(1)
    sequence = (torch.arange(B, device=ids.device)[:, None] * (T + 1) + ids).reshape(-1)[tokens]
    lengths = torch.unique_consecutive(sequence, return_counts=True)[1]
    return tokens, F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), int(lengths.max())


def varlen_fn(is_causal, key_mask, document_ids):
    """varlen_attn over the documents (or padded rows' real tokens), from and back to (B, H, T, D)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise BackendUnavailableError(f"varlen_attn is not available in this torch ({torch.__version__})") from exc
    rows = key_mask if key_mask is not None else document_ids
    if rows is None:
        raise BackendUnavailableError("varlen_attn is timed on padded and packed rows only")
    if rows.device.type != "cuda":
        raise BackendUnavailableError("varlen_attn runs on CUDA only")
    params = inspect.signature(varlen_attn).parameters  # torch 2.13 takes a window, earlier ones is_causal
    if not is_causal:
        causal = {}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        raise BackendUnavailableError(f"varlen_attn of torch {torch.__version__} has no causal option")
    tokens, cu_seq, max_len = varlen_sequences(key_mask, document_ids)

    def fn(q, k, v):
        B, H, T, D = q.shape
        packed = [x.transpose(1, 2).reshape(B * T, H, D).index_select(0, tokens) for x in (q, k, v)]
        out = varlen_attn(*packed, cu_seq, cu_seq, max_len, max_len, **causal)  # (tokens, H, D)
        return out.new_zeros(B * T, H, D).index_copy(0, tokens, out).view(B, T, H, D).transpose(1, 2)

    return fn


def cpu_peers(name: str, mode: str, masks: dict, qkv, quick: bool) -> dict:
    """FlexAttention for a ``CPU_PEER_CASES`` case: ``{"flex": step}`` once its first call (the compilation)
    has run, or ``{"flex": why}`` where it cannot run; ``{}`` for the other cases."""
    if name not in CPU_PEER_CASES:
        return {}
    if quick and FLEX_COMPILED:
        return {"flex": "left out of --quick: compiling it for the CPU takes about a minute a mask"}
    try:
        step = make_step(flex_fn(masks["is_causal"], masks["key_mask"], masks.get("document_ids")), *qkv, mode)
        if mode == "fwd+bwd":
            flex_backward_check(qkv[0].device)
        step()
    except (BackendUnavailableError, NotImplementedError) as exc:
        return {"flex": str(exc).splitlines()[0][:300]}
    return {"flex": step}


def flex_backward_check(device) -> None:
    """Raises NotImplementedError where FlexAttention has no backward on ``device``. Asked of an eager call on
    a tiny input: after a compiled call that raised, torch.compile ran flex_attention eagerly from then on
    (the packed CPU case then took 5.2 s, not 0.14 s)."""
    from torch.nn.attention.flex_attention import flex_attention

    x = torch.zeros(1, 1, 16, 16, device=device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that flex_attention runs uncompiled
        flex_attention(x, x, x).sum().backward()


def add_ratio_vs_flex(group: list[dict]) -> None:
    flex = next((r for r in group if r["provider"] == "flex" and "median_ms" in r), None)
    for r in group:
        if flex is not None and "median_ms" in r:
            r["ratio_vs_flex"] = flex["median_ms"] / r["median_ms"]


def packed_rows_ids(B, T, min_len, max_len, pairs, device, seed=0):
    """(document_ids, key_mask or None, lengths): B rows of T tokens packed with documents.

    Without ``pairs`` documents of min_len..max_len tokens fill each row, the last cut
    at its end; with ``pairs`` each document is two segments of that length, a pair
    that does not fit starts the next row, and the rest of the row is padding.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, T, dtype=torch.int64)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    lengths = []
    pending = None
    for b in range(B):
        pos, doc = 0, 0
        while pos < T:
            n = pending or sum(int(torch.randint(min_len, max_len + 1, (1,), generator=gen)) for _ in range(1 + pairs))
            pending = None
            if pairs and pos + n > T:
                pending = n if n <= T else None
                key_mask[b, pos:] = False
                ids[b, pos:] = doc  # padding closes the row's last document, which it cannot see
                break
            n = min(n, T - pos)
            ids[b, pos:pos + n] = doc
            lengths.append(n)
            pos, doc = pos + n, doc + 1
    return ids.to(device), key_mask.to(device) if pairs else None, lengths


def tile_row(name, T, is_causal, key_mask, document_ids, lengths, D=64) -> dict:
    """Exact tile counts of minipt's kernels with the sm_90 bf16 launch table's tiles."""
    fwd_m, fwd_n = _CONFIGS[(9, 0)][("fwd", D, 2)][:2]
    dkdv_m, dkdv_n = _CONFIGS[(9, 0)][("dkdv", D, 2)][:2]
    forward = attention_tiles(T, fwd_m, fwd_n, is_causal=is_causal, attention_mask=key_mask,
                              document_ids=document_ids)
    dkdv = attention_tiles(T, dkdv_m, dkdv_n, is_causal=is_causal, attention_mask=key_mask, document_ids=document_ids)
    unpacked = attention_tiles(T, fwd_m, fwd_n, is_causal=is_causal, attention_mask=key_mask)["forward"]
    B = document_ids.shape[0]
    return {"name": f"{name} tiles", "provider": "minipt (sm_90 tiles)", "T": T, "B": B, "causal": is_causal,
            "documents": len(lengths), "fwd_tiles": forward["forward"], "dkdv_tiles": dkdv["dkdv"],
            "dense_tiles": forward["dense"], "fwd_tiles_without_documents": unpacked,
            "fwd_fraction": forward["forward"] / forward["dense"],
            "dkdv_fraction": dkdv["dkdv"] / dkdv["dense"],
            "sum_len2_fraction": sum(n * n for n in lengths) / (B * T * T)}


def packed_rows(device: str, quick: bool) -> list[dict]:
    """Tile counts of the packed cases at their real sizes; timings on CUDA only."""
    on_cuda = torch.device(device).type == "cuda"
    rows = []
    for name, (B, H, D, T, min_len, max_len, is_causal, pairs) in PACKED_GPU.items():
        ids, key_mask, lengths = packed_rows_ids(B, T, min_len, max_len, pairs, "cpu")
        rows.append(tile_row(name, T, is_causal, key_mask, ids, lengths, D))
        if not on_cuda:
            continue  # the interpreter and the CPU's SDPA at these sizes time nothing a GPU would
        ids, key_mask = ids.to(device), None if key_mask is None else key_mask.to(device)
        qkv = make_qkv(B, H, T, D, device, torch.bfloat16)
        flops = 4.0 * H * D * sum(n * n for n in lengths) * (0.5 if is_causal else 1.0)
        for mode in MODES:
            case = {"mode": mode, "B": B, "H": H, "T": T, "D": D, "dtype": "bfloat16", "causal": is_causal}
            group = []
            for p in PACKED_PROVIDERS:
                try:
                    fn = make_fn(p, is_causal, key_mask, ids)
                except BackendUnavailableError as exc:
                    group.append({"name": f"{name} {mode}", "provider": p, **case, "skipped": str(exc)[:300]})
                    continue
                group.append({"name": f"{name} {mode}", "provider": p, **case,
                              **measure_fn(fn, mode, qkv, device, quick, flops)})
            add_ratios(group, "sdpa")
            add_ratio_vs_flex(group)
            rows.extend(group)
        del qkv
    return rows


def window_pairs(T: int, W: int) -> int:
    """Visible (query, key) pairs of a causal window of W keys over T positions: Σᵢ min(i + 1, W)."""
    W = min(W, T)
    return W * (W + 1) // 2 + (T - W) * W


def window_tile_row(name, T, W, D=64) -> dict:
    """Exact tile counts of a causal window of W keys against causal attention's, with the sm_90 bf16 tiles."""
    fwd_m, fwd_n = _CONFIGS[(9, 0)][("fwd", D, 2)][:2]
    dkdv_m, dkdv_n = _CONFIGS[(9, 0)][("dkdv", D, 2)][:2]
    fwd, causal_fwd = (attention_tiles(T, fwd_m, fwd_n, is_causal=True, window_size=w)["forward"]
                       for w in ((W - 1, 0), None))
    dkdv, causal_dkdv = (attention_tiles(T, dkdv_m, dkdv_n, is_causal=True, window_size=w)["dkdv"]
                         for w in ((W - 1, 0), None))
    return {"name": f"{name} tiles", "provider": "minipt (sm_90 tiles)", "T": T, "window": W, "causal": True,
            "fwd_tiles": fwd, "dkdv_tiles": dkdv, "causal_fwd_tiles": causal_fwd, "causal_dkdv_tiles": causal_dkdv,
            "fwd_fraction": fwd / causal_fwd, "dkdv_fraction": dkdv / causal_dkdv,
            "pairs_fraction": window_pairs(T, W) / window_pairs(T, T)}


def window_rows(device: str, quick: bool) -> list[dict]:
    """Tile counts of the sliding-window case at its real size; timings on CUDA only."""
    on_cuda = torch.device(device).type == "cuda"
    rows = []
    for name, (B, H, D, T, W) in WINDOW_GPU.items():
        rows.append(window_tile_row(name, T, W, D))
        if not on_cuda:
            continue  # the interpreter and the CPU's SDPA at this size time nothing a GPU would
        qkv = make_qkv(B, H, T, D, device, torch.bfloat16)
        flops = 4.0 * B * H * D * window_pairs(T, W)
        fns = {p: make_fn(p, True, None, window_size=(W - 1, 0)) for p in WINDOW_PROVIDERS}  # shared by both modes
        for mode in ("fwd+bwd",) if quick else MODES:  # quick: FlexAttention compiles once, for training
            case = {"mode": mode, "B": B, "H": H, "T": T, "D": D, "dtype": "bfloat16", "causal": True, "window": W}
            group = [{"name": f"{name} {mode}", "provider": p, **case,
                      **measure_fn(fn, mode, qkv, device, quick, flops)} for p, fn in fns.items()]
            add_ratios(group, "sdpa")
            rows.extend(group)
        del qkv
    return rows


def make_step(fn, q, k, v, mode: str):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(q, k, v)

        return step
    grad_out = torch.randn_like(q)

    def step():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    return step


def make_qkv(B, H, T, D, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]


def bert_lengths(B: int, T: int, min_len: int, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randint(min_len, T + 1, (B,), generator=gen).to(device)


def forward_flops(B, H, T, D, is_causal) -> float:
    return 4 * B * H * T * T * D * (0.5 if is_causal else 1.0)


def measure(provider, mode, qkv, device, quick, *, is_causal, key_mask, flops) -> dict:
    """median_ms, tflops and peak_mem_mb of one provider, or why it was skipped, or its error."""
    on_cuda = torch.device(device).type == "cuda"
    T = qkv[0].shape[-2]
    if provider == "minipt-triton" and not on_cuda:
        return {"skipped": "Triton runs on CUDA; on the CPU it only interprets, which times nothing useful"}
    if provider in PEERS and not on_cuda:
        return {"skipped": "timed on CUDA: on the CPU FlexAttention joins the cpu-* cases; varlen_attn is CUDA only"}
    if provider in ("naive", "sdpa-math") and T > MATERIALISED_MAX_T:
        return {"skipped": f"materialises the (B, H, T, T) scores; timed up to T={MATERIALISED_MAX_T}"}
    refused_by = provider if provider in SDPA_BACKENDS else None
    return measure_fn(make_fn(provider, is_causal, key_mask), mode, qkv, device, quick, flops, refused_by)


def measure_fn(fn, mode, qkv, device, quick, flops, refused_by=None) -> dict:
    """measure() of a ready fn; a RuntimeError is a skip when ``refused_by`` names an SDPA backend."""
    step = make_step(fn, *qkv, mode)
    try:
        step()  # warm-up: compilation, and whether the provider takes this call at all
    except BackendUnavailableError as exc:
        return {"skipped": str(exc)[:300]}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"skipped": "out of GPU memory"}
    except RuntimeError as exc:
        if refused_by:  # "No available kernel" and the reasons SDPA warns about
            return {"skipped": f"{refused_by} refuses this call: {str(exc).splitlines()[0][:200]}"}
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    except Exception as exc:  # a broken provider is reported in its row; the other rows still run
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    ms = time_ms(step, device, rep=5 if quick else 20)
    row = {"median_ms": ms, "tflops": flops * (3.5 if mode == "fwd+bwd" else 1.0) / ms / 1e9}
    peak = peak_memory_bytes(step, device)
    if peak is not None:
        row["peak_mem_mb"] = peak / 2**20
    return row


def sweep_rows(device: str, quick: bool) -> list[dict]:
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    tokens, width = (GPU_TOKENS, GPU_WIDTH) if on_cuda else (CPU_TOKENS, CPU_WIDTH)
    Ts = (GPU_QUICK_TS if quick else GPU_TS) if on_cuda else (CPU_QUICK_TS if quick else CPU_TS)
    dims = (64,) if quick and not on_cuda else (64, 128)
    rows = []
    for is_causal in (True, False):
        for D in dims:
            for T in Ts:
                B, H = max(1, tokens // T), width // D
                qkv = make_qkv(B, H, T, D, device, dtype)
                for mode in MODES:
                    label = f"{'causal' if is_causal else 'bidirectional'} {mode} D={D}"
                    case = {"mode": mode, "B": B, "H": H, "T": T, "D": D, "dtype": str(dtype).removeprefix("torch."),
                            "causal": is_causal}
                    flops = forward_flops(B, H, T, D, is_causal)
                    group = [
                        {"name": label, "provider": p, **case,
                         **measure(p, mode, qkv, device, quick, is_causal=is_causal, key_mask=None, flops=flops)}
                        for p in PROVIDERS
                    ]
                    add_ratios(group, SWEEP_BASELINE)
                    rows.extend(group)
                del qkv
    return rows


def padded_rows(device: str, quick: bool) -> list[dict]:
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    cfg = BERT_GPU if on_cuda else BERT_CPU
    B, H, D, T = cfg["B"], cfg["H"], cfg["D"], cfg["T"]
    lengths = bert_lengths(B, T, cfg["min_len"], device)
    key_mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (B, T)
    qkv = make_qkv(B, H, T, D, device, dtype)
    flops = 4.0 * H * T * D * lengths.sum().item()
    rows = []
    for mode in MODES:
        case = {"mode": mode, "B": B, "H": H, "T": T, "D": D, "dtype": str(dtype).removeprefix("torch."),
                "causal": False, "mean_len": round(lengths.float().mean().item())}
        group = [
            {"name": f"bert-padded {mode}", "provider": p, **case,
             **measure(p, mode, qkv, device, quick, is_causal=False, key_mask=key_mask, flops=flops)}
            for p in PROVIDERS + PEERS
        ]
        add_ratios(group, PADDED_BASELINE)
        add_ratio_vs_flex(group)
        rows.extend(group)
    return rows


def cut_into_documents(B: int, T: int, n: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """(B, T) ids of rows each cut into ``n`` documents at n - 1 distinct random points, and the lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids, lengths = [], []
    for _ in range(B):
        cuts = (torch.randperm(T - 1, generator=gen)[:n - 1] + 1).sort().values
        ids.append(torch.bucketize(torch.arange(T), cuts, right=True))
        lengths += torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([T])])).tolist()
    return torch.stack(ids), lengths


def cpu_case(name: str, B: int, H: int, T: int, D: int) -> tuple[dict, dict, float]:
    """make_fn's masks, the row's extra fields and the forward FLOPs of one ``CPU_NATIVE`` case."""
    if name == "cpu-causal":
        return dict(is_causal=True, key_mask=None), {}, forward_flops(B, H, T, D, True)
    if name == "cpu-window":
        masks = dict(is_causal=True, key_mask=None, window_size=(CPU_WINDOW - 1, 0))
        return masks, {"window": CPU_WINDOW}, 4.0 * B * H * D * window_pairs(T, CPU_WINDOW)
    if name == "cpu-packed":
        ids, lengths = cut_into_documents(B, T, CPU_DOCUMENTS)
        masks = dict(is_causal=True, key_mask=None, document_ids=ids)
        return masks, {"documents": CPU_DOCUMENTS}, 2.0 * H * D * sum(n * n for n in lengths)
    lengths = bert_lengths(B, T, CPU_BERT_MIN_LEN, "cpu")
    key_mask = torch.arange(T)[None, :] < lengths[:, None]
    masks = dict(is_causal=False, key_mask=key_mask)
    return masks, {"mean_len": round(lengths.float().mean().item())}, 4.0 * H * T * D * lengths.sum().item()


def cpu_native_rows(quick: bool) -> list[dict]:
    """``CPU_NATIVE``: minipt-native against sdpa on the CPU, both modes, the providers taking turns."""
    rounds, rep = (2, 1) if quick else (5, 2)
    rows = []
    for name, (B, H, T, D) in CPU_NATIVE.items():
        masks, fields, flops = cpu_case(name, B, H, T, D)
        qkv = make_qkv(B, H, T, D, "cpu", torch.float32)
        for mode in MODES:
            steps = {p: make_step(make_fn(p, **masks), *qkv, mode) for p in ("sdpa", "minipt-native")}
            peers = cpu_peers(name, mode, masks, qkv, quick)
            steps.update((p, step) for p, step in peers.items() if callable(step))
            case = {"mode": mode, "B": B, "H": H, "T": T, "D": D, "dtype": "float32",
                    "causal": masks["is_causal"], **fields}
            group = [{"name": f"{name} {mode}", "provider": p, **case, "median_ms": ms,
                      "tflops": flops * (3.5 if mode == "fwd+bwd" else 1.0) / ms / 1e9}
                     for p, ms in interleaved_ms(steps, rounds, rep).items()]
            group += [{"name": f"{name} {mode}", "provider": p, **case, "skipped": why}
                      for p, why in peers.items() if isinstance(why, str)]
            add_ratios(group, "sdpa")
            add_ratio_vs_flex(group)
            rows.extend(group)
    return rows


def run(device: str, quick: bool) -> list[dict]:
    rows = sweep_rows(device, quick) + padded_rows(device, quick) + packed_rows(device, quick)
    rows += window_rows(device, quick)
    return rows + (cpu_native_rows(quick) if torch.device(device).type == "cpu" else [])


def plot_tflops_vs_t(title: str, rows: list[dict], path: Path) -> Path | None:
    """TFLOP/s against T, one line per provider, one panel per (causal, mode, D) sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(r["name"] for r in rows if r["name"].split()[0] in ("causal", "bidirectional")
                                and "tflops" in r))
    if not panels:
        return None
    cols = 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(11, 3.4 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for provider in PROVIDERS:
            points = sorted((r["T"], r["tflops"]) for r in rows if r["name"] == name and r["provider"] == provider
                            and "tflops" in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("T")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


plot = plot_tflops_vs_t  # python -m bench draws this in place of the default bars


if __name__ == "__main__":
    json_path = cli("attention", run)
    results = json.loads(json_path.read_text())
    png = plot_tflops_vs_t(
        f"attention on {results['machine']['device']}", results["rows"], json_path.with_name("attention_tflops_vs_T.png")
    )
    if png is not None:
        print(f"wrote {png}")
