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
* ``minipt-native``: ``attention(backend="native")``, skipped where it raises
  BackendUnavailableError.

Cases. The sweeps hold B·T at 16k tokens and H·D at 2048 (H = 2048 / D: 32 heads
of 64, 16 of 128), bf16, T from 512 to 8192, D 64 and 128, causal and
bidirectional; ``ratio`` is ``sdpa-flash``'s time over the row's. The BERT case is
a padded batch: B = 32, H = 12, D = 64, T = 512, lengths uniform in [64, 512]
(seed 0), given to minipt as ``attention_mask`` and to SDPA as the equivalent
boolean (B, 1, 1, T) mask; its ``ratio`` is ``sdpa``'s time (SDPA's own choice for
a masked call) over the row's.

FLOPs: 4·B·H·T²·D for the forward (QKᵀ and PV), halved when causal; the backward
counts 2.5× the forward, so forward + backward is 3.5×. The padded case counts the
real keys only (4·H·T·D·Σ lengths), the work a kernel that skips padding must do.
``mode="fwd"`` runs under ``torch.no_grad()``; ``fwd+bwd`` computes dq, dk and dv
for a fixed random output gradient. On the CPU (fp32, tiny sizes) the figures
say nothing about a GPU.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import add_ratios, cli, peak_memory_bytes, time_ms
from minipt.ops._backend import BackendUnavailableError
from minipt.ops import attention

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


def naive_attention(q, k, v, *, is_causal=False, key_mask=None):
    """softmax(q kᵀ / sqrt(D) + mask) v with the scores and probabilities materialised."""
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, T, T)
    T = q.shape[-2]
    if is_causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1).to(q.dtype) @ v


def make_fn(provider: str, is_causal: bool, key_mask: torch.Tensor | None):
    """fn(q, k, v) -> out for one provider; ``key_mask`` is the (B, T) bool padding mask or None."""
    sdpa_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T), True = attend
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
    if provider in ("naive", "sdpa-math") and T > MATERIALISED_MAX_T:
        return {"skipped": f"materialises the (B, H, T, T) scores; timed up to T={MATERIALISED_MAX_T}"}
    step = make_step(make_fn(provider, is_causal, key_mask), *qkv, mode)
    try:
        step()  # warm-up: compilation, and whether the provider takes this call at all
    except BackendUnavailableError as exc:
        return {"skipped": str(exc)[:300]}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"skipped": "out of GPU memory"}
    except RuntimeError as exc:
        if provider in SDPA_BACKENDS:  # "No available kernel" and the reasons SDPA warns about
            return {"skipped": f"{provider} refuses this call: {str(exc).splitlines()[0][:200]}"}
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
            for p in PROVIDERS
        ]
        add_ratios(group, PADDED_BASELINE)
        rows.extend(group)
    return rows


def run(device: str, quick: bool) -> list[dict]:
    return sweep_rows(device, quick) + padded_rows(device, quick)


def plot_tflops_vs_t(title: str, rows: list[dict], path: Path) -> Path | None:
    """TFLOP/s against T, one line per provider, one panel per (causal, mode, D) sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(r["name"] for r in rows if not r["name"].startswith("bert") and "tflops" in r))
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
