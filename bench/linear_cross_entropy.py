"""LM-head cross-entropy, forward + backward: minipt's chunked kernels against PyTorch's, unfused and chunked.

Each step computes the mean loss of ``hidden @ weightᵀ`` against the targets and
the gradients of hidden and weight. Providers:

* ``unfused``: ``F.linear`` + ``F.cross_entropy``, which materialise the (N, V)
  logits: the baseline of ``ratio`` and ``mem_ratio``;
* ``torch-chunked``: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``,
  PyTorch's own chunked path with its default policy (torch 2.13); a torch
  without it gets a row saying so;
* ``minipt-torch``, ``minipt-triton``, ``minipt-native``: ``minipt.ops.linear_cross_entropy``
  on each backend: the reference (which materialises the logits), the chunked
  Triton path (CUDA only) and the chunked native one (C++ on the CPU, CUDA on a GPU);
* ``minipt-triton-softcap``, ``minipt-native-softcap``: the same chunked paths with
  soft-capped logits and a z-loss (``SOFTCAP``: Gemma 2's cap of 30, PaLM's 1e-4),
  the kernels' capped variants.

``ratio_vs_chunked`` and ``mem_vs_chunked`` compare each row with ``torch-chunked``;
a capped row's ``ratio_vs_plain`` is its own backend's plain median over its own.
On CUDA the inputs are bf16, on the CPU fp32; CPU figures say nothing about a GPU.

Each provider runs in a process of its own (spawned), so that each peak is its
own: on the CPU ``peak_mem_mb`` is the peak RSS of the provider's first
full-size step over the RSS just before it (the kernel's high-water mark is reset
through ``/proc/self/clear_refs``, after a tiny warm-up that starts the thread
pools), on CUDA ``torch.cuda.max_memory_allocated`` of a step over what was
allocated before it. The processes then take turns, round after round, and each
row reports the median of its rounds, so that load from elsewhere on a shared
machine falls on every provider alike.

tflops counts the three GEMMs of a linear layer's forward and backward
(6·N·D·V), whatever a provider actually runs. The targets on a GPU (N = 16384,
D = 768, V = 50304): mem_ratio ≤ 0.25 and a time no worse than 1.1× the
baseline (ratio ≥ 0.91), and the capped rows within 10% of the plain ones
(ratio_vs_plain ≥ 0.91); on the CPU (N = 8192, D = 512, V = 32768):
``minipt-native`` at least as fast as ``torch-chunked`` (ratio_vs_chunked ≥ 1)
with no more memory (mem_vs_chunked ≤ 1).
"""

from __future__ import annotations

import multiprocessing
import re
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import add_ratios, cli, peak_memory_bytes, time_ms
from minipt.ops import BackendUnavailableError, linear_cross_entropy

BASELINE, CHUNKED = "unfused", "torch-chunked"
CAPPED = "-softcap"  # the suffix of a provider that runs with SOFTCAP
SOFTCAP = dict(softcap=30.0, z_loss=1e-4)
PROVIDERS = (BASELINE, CHUNKED, "minipt-torch", "minipt-triton", f"minipt-triton{CAPPED}", "minipt-native",
             f"minipt-native{CAPPED}")
GPU_SIZES = ((16384, 768, 50304), (4096, 768, 50304), (8192, 2048, 128256))  # (N, D, V); GPT-2 small first
GPU_QUICK_SIZES = GPU_SIZES[:1]
CPU_SIZES = ((8192, 512, 32768),)
CPU_QUICK_SIZES = ((1024, 256, 8192),)
WARMUP_SHAPE = (64, 32, 256)  # (N, D, V): starts a process's thread pools before its peak is taken


def make_inputs(N: int, D: int, V: int, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, V, (N,), generator=gen).to(device)
    target[::10] = -100  # padding, as an LM batch has
    return hidden, weight, target


def unavailable(provider: str, device) -> str | None:
    """Why ``provider`` cannot run on ``device`` in this process's torch, or None."""
    if provider.startswith("minipt-triton") and torch.device(device).type != "cuda":
        return "Triton runs on CUDA; on the CPU it only interprets, which times nothing useful"
    if provider == CHUNKED and not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"F.linear_cross_entropy with options= (chunked) is not available in this torch ({torch.__version__})"
    return None


def make_step(provider: str, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor):
    """A no-argument callable: the gradients of hidden and weight."""
    reason = unavailable(provider, hidden.device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    if provider == BASELINE:
        def fn():
            return F.cross_entropy(F.linear(hidden, weight), target)
    elif provider == CHUNKED:
        options = torch.nn.LinearCrossEntropyOptions()

        def fn():
            return F.linear_cross_entropy(hidden, weight, target, options=options)
    else:
        backend = provider.removeprefix("minipt-").removesuffix(CAPPED)
        options = SOFTCAP if provider.endswith(CAPPED) else {}

        def fn():
            return linear_cross_entropy(hidden, weight, target, backend=backend, **options)

    return lambda: torch.autograd.grad(fn(), (hidden, weight))


# ----------------------------------------------------------------------------- one process per provider
def _status_bytes(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def cpu_peak_bytes(fn) -> int | None:
    """Peak RSS during ``fn()`` over the RSS before it; None where the high-water mark cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        before = _status_bytes("VmRSS")
    except (OSError, AttributeError):
        return None
    fn()
    return _status_bytes("VmHWM") - before


def serve(conn, provider: str, shape: tuple[int, int, int], device: str, threads: int) -> None:
    """A provider's process: its peak, then a time for each round asked of it, until told to stop."""
    torch.set_num_threads(threads)
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    try:
        make_step(provider, *make_inputs(*WARMUP_SHAPE, device, dtype))()
        step = make_step(provider, *make_inputs(*shape, device, dtype))
        if on_cuda:
            step()  # compilation stays out of the peak, which the caching allocator's statistics give exactly
            peak = peak_memory_bytes(step, device)
        else:
            peak = cpu_peak_bytes(step)  # the first full-size step: nothing freed before is there to reuse
        conn.send({} if peak is None else {"peak_mem_mb": peak / 2**20})
    except BackendUnavailableError as exc:
        conn.send({"skipped": str(exc)[:300]})
        return
    except torch.cuda.OutOfMemoryError:
        conn.send({"skipped": "out of GPU memory"})
        return
    except Exception as exc:  # a broken provider is reported in its row; the other rows still run
        conn.send({"error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    while (rep := conn.recv()) is not None:
        conn.send(time_ms(step, device, warmup=0, rep=rep))


def measure_apart(providers, shape, device: str, rounds: int, rep: int) -> dict[str, dict]:
    """``{provider: fields}``: each provider's peak (or why it did not run) and its median over ``rounds``
    turns of ``time_ms``, every provider in a spawned process of its own, the processes taking turns."""
    context = multiprocessing.get_context("spawn")
    results, started, workers = {}, {}, {}
    try:
        for provider in providers:
            reason = unavailable(provider, device)
            if reason is not None:
                results[provider] = {"skipped": reason}
                continue
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(theirs, provider, shape, device, torch.get_num_threads()))
            process.start()
            theirs.close()
            started[provider] = (process, ours)
        # The processes start and take their peaks together (a process's peak is its own); only times take turns.
        for provider, (process, ours) in started.items():
            try:
                results[provider] = ours.recv()
            except EOFError:
                results[provider] = {"error": f"its process died (exit code {process.join() or process.exitcode})"}
            if not {"skipped", "error"} & results[provider].keys():
                workers[provider] = (process, ours)
            else:
                process.join()
        times = {provider: [] for provider in workers}
        for _ in range(rounds):
            for provider, (_, conn) in workers.items():
                conn.send(rep)
                times[provider].append(conn.recv())
        for provider, t in times.items():
            results[provider]["median_ms"] = statistics.median(t)
    finally:
        for process, conn in started.values():
            try:
                conn.send(None)
            except OSError:
                pass
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return results


def size_rows(N: int, D: int, V: int, device: str, rounds: int, rep: int, providers=PROVIDERS) -> list[dict]:
    """One row per provider at one size, with its ratios against the unfused and the chunked baselines."""
    dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    measured = measure_apart(providers, (N, D, V), device, rounds, rep)
    rows = []
    for provider in providers:
        row = {"name": "linear_cross_entropy", "provider": provider, "N": N, "D": D, "V": V, "dtype": dtype}
        fields = measured[provider]
        if "median_ms" in fields:
            fields = {"median_ms": fields["median_ms"], "tflops": 6 * N * D * V / fields["median_ms"] / 1e9,
                      **{k: v for k, v in fields.items() if k != "median_ms"}}
        rows.append({**row, **fields})
    base = add_ratios(rows, BASELINE)
    timed = {r["provider"]: r for r in rows if "median_ms" in r}
    chunked = timed.get(CHUNKED)
    for r in rows:
        if chunked is not None and "median_ms" in r:
            r["ratio_vs_chunked"] = chunked["median_ms"] / r["median_ms"]
        plain = timed.get(r["provider"].removesuffix(CAPPED))
        if r["provider"].endswith(CAPPED) and plain is not None and "median_ms" in r:
            r["ratio_vs_plain"] = plain["median_ms"] / r["median_ms"]
        if r.get("peak_mem_mb") is None:
            continue
        if base is not None and base.get("peak_mem_mb"):
            r["mem_ratio"] = r["peak_mem_mb"] / base["peak_mem_mb"]
        if chunked is not None and chunked.get("peak_mem_mb"):
            r["mem_vs_chunked"] = r["peak_mem_mb"] / chunked["peak_mem_mb"]
    return rows


def run(device: str, quick: bool) -> list[dict]:
    if torch.device(device).type == "cuda":
        sizes, rounds, rep = (GPU_QUICK_SIZES if quick else GPU_SIZES), 3, 1
    else:
        sizes, rounds, rep = (CPU_QUICK_SIZES, 3, 1) if quick else (CPU_SIZES, 5, 1)
    return [row for N, D, V in sizes for row in size_rows(N, D, V, device, rounds, rep)]


if __name__ == "__main__":
    cli("linear_cross_entropy", run)
