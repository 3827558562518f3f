"""Cross-entropy forward + backward: minipt's kernels against PyTorch, eager and compiled.

Each step computes the mean loss of (N, V) logits and its gradient. ``torch`` is
eager ``F.cross_entropy`` (the baseline of ``ratio``), ``torch-compile`` the same
under ``torch.compile``, ``triton`` minipt's fused kernels (CUDA only), ``native``
the C++/CUDA ones. On CUDA the logits are bf16, as an LM head under autocast
gives them; on the CPU they are fp32 at small sizes, and those figures say
nothing about a GPU.

gbps counts the bytes a fused kernel must move, for every provider: read the
logits in the forward, read them again and write their gradient in the
backward (3·N·V elements). ``peak_mem_mb`` is the peak allocation of a step above
the logits and targets already resident, so the gradient itself (one logits-sized
buffer) is the floor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import add_ratios, cli, peak_memory_bytes, time_ms
from minipt.ops import BackendUnavailableError, cross_entropy

BASELINE = "torch"
PROVIDERS = (BASELINE, "torch-compile", "triton", "native")
GPU_N, GPU_VOCABS, GPU_QUICK_VOCABS = 8192, (8192, 32768, 50304, 128256), (32768, 128256)
CPU_SIZES = ((4096, 8192), (1024, 32768))  # (N, V)
COMPILE_QUICK_V = 32768  # under --quick only this size is compiled: each new shape compiles anew


def make_inputs(N: int, V: int, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(N, V, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, V, (N,), generator=gen).to(device)
    target[::10] = -100  # padding, as an LM batch has
    return logits, target


def make_step(provider: str, logits: torch.Tensor, target: torch.Tensor):
    """A no-argument callable: the loss and the gradient of the logits."""
    if provider == BASELINE:
        fn = F.cross_entropy
    elif provider == "torch-compile":
        fn = torch.compile(F.cross_entropy)
    else:
        def fn(x, t):
            return cross_entropy(x, t, backend=provider)

    def step():
        loss = fn(logits, target)
        return torch.autograd.grad(loss, logits)[0]

    return step


def _measure(provider: str, N: int, V: int, device: str, quick: bool) -> dict:
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    row = {"name": "cross_entropy", "provider": provider, "N": N, "V": V, "dtype": str(dtype).replace("torch.", "")}
    if provider == "triton" and not on_cuda:
        row["skipped"] = "Triton runs on CUDA; on the CPU it only interprets, which times nothing useful"
        return row
    if provider == "torch-compile" and not on_cuda:
        row["skipped"] = "timed on CUDA only: compiling takes tens of seconds on a small CPU"
        return row
    if provider == "torch-compile" and quick and V != COMPILE_QUICK_V:
        row["skipped"] = f"not in --quick: only V={COMPILE_QUICK_V} is compiled"
        return row
    logits, target = make_inputs(N, V, device, dtype)
    step = make_step(provider, logits, target)
    try:
        step()  # warm-up, and compilation
    except BackendUnavailableError as exc:
        row["skipped"] = str(exc)[:300]
        return row
    ms = time_ms(step, device, rep=5 if quick else 20)
    row.update(median_ms=ms, gbps=3 * logits.numel() * logits.element_size() / ms / 1e6)
    peak = peak_memory_bytes(step, device)
    if peak is not None:
        row["peak_mem_mb"] = peak / 2**20
        row["peak_over_logits"] = peak / (logits.numel() * logits.element_size())
    return row


def run(device: str, quick: bool) -> list[dict]:
    if torch.device(device).type == "cuda":
        sizes = [(GPU_N, V) for V in (GPU_QUICK_VOCABS if quick else GPU_VOCABS)]
    else:
        sizes = CPU_SIZES[:1] if quick else CPU_SIZES
    rows = []
    for N, V in sizes:
        size_rows = [_measure(p, N, V, device, quick) for p in PROVIDERS]
        add_ratios(size_rows, BASELINE)
        rows.extend(size_rows)
    return rows


if __name__ == "__main__":
    cli("cross_entropy", run)
