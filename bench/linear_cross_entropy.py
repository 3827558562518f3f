"""LM-head cross-entropy, forward + backward: minipt's chunked kernels against ``F.linear`` + ``F.cross_entropy``.

Each step computes the mean loss of ``hidden @ weightᵀ`` against the targets and
the gradients of hidden and weight. ``torch`` materialises the (N, V) logits
(the baseline of ``ratio`` and ``mem_ratio``); ``triton`` is minipt's chunked
path (cuBLAS GEMMs around the fused cross-entropy kernel, CUDA only); ``native``
the C++/CUDA one. On CUDA the inputs are bf16, on the CPU fp32 at small sizes,
and CPU figures say nothing about a GPU.

tflops counts the three GEMMs of a linear layer's forward and backward
(6·N·D·V), whatever a provider actually runs. ``peak_mem_mb`` is the peak
allocation of a step above the inputs already resident; ``mem_ratio`` is that
over the baseline's. The targets on a GPU (N = 16384, D = 768, V = 50304):
mem_ratio ≤ 0.25 and a time no worse than 1.1× the baseline (ratio ≥ 0.91).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import add_ratios, cli, peak_memory_bytes, time_ms
from minipt.ops import BackendUnavailableError, linear_cross_entropy

BASELINE = "torch"
PROVIDERS = (BASELINE, "triton", "native")
GPU_SIZES = ((16384, 768, 50304), (4096, 768, 50304), (8192, 2048, 128256))  # (N, D, V); GPT-2 small first
GPU_QUICK_SIZES = GPU_SIZES[:1]
CPU_SIZES = ((1024, 256, 8192), (512, 512, 32768))


def make_inputs(N: int, D: int, V: int, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, V, (N,), generator=gen).to(device)
    target[::10] = -100  # padding, as an LM batch has
    return hidden, weight, target


def make_step(provider: str, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor):
    """A no-argument callable: the gradients of hidden and weight."""
    if provider == BASELINE:
        def fn():
            return F.cross_entropy(F.linear(hidden, weight), target)
    else:
        def fn():
            return linear_cross_entropy(hidden, weight, target, backend=provider)

    return lambda: torch.autograd.grad(fn(), (hidden, weight))


def _measure(provider: str, N: int, D: int, V: int, device: str, quick: bool) -> dict:
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    row = {"name": "linear_cross_entropy", "provider": provider, "N": N, "D": D, "V": V,
           "dtype": str(dtype).replace("torch.", "")}
    if provider == "triton" and not on_cuda:
        row["skipped"] = "Triton runs on CUDA; on the CPU it only interprets, which times nothing useful"
        return row
    hidden, weight, target = make_inputs(N, D, V, device, dtype)
    step = make_step(provider, hidden, weight, target)
    try:
        step()
    except BackendUnavailableError as exc:
        row["skipped"] = str(exc)[:300]
        return row
    ms = time_ms(step, device, rep=3 if quick else 10)
    row.update(median_ms=ms, tflops=6 * N * D * V / ms / 1e9)
    peak = peak_memory_bytes(step, device)
    if peak is not None:
        row["peak_mem_mb"] = peak / 2**20
    return row


def run(device: str, quick: bool) -> list[dict]:
    if torch.device(device).type == "cuda":
        sizes = GPU_QUICK_SIZES if quick else GPU_SIZES
    else:
        sizes = CPU_SIZES[:1] if quick else CPU_SIZES
    rows = []
    for N, D, V in sizes:
        size_rows = [_measure(p, N, D, V, device, quick) for p in PROVIDERS]
        base = add_ratios(size_rows, BASELINE)
        if base is not None and base.get("peak_mem_mb"):
            for r in size_rows:
                if r.get("peak_mem_mb") is not None:
                    r["mem_ratio"] = r["peak_mem_mb"] / base["peak_mem_mb"]
        rows.extend(size_rows)
    return rows


if __name__ == "__main__":
    cli("linear_cross_entropy", run)
