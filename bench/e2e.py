"""End-to-end training-step throughput: GPT-2 and BERT (MLM + NSP), minipt against PyTorch and Hugging Face.

A training step is forward + backward + AdamW step on one fixed batch, timed with
the device synchronised around it, after warm-up steps (which include any
compilation). Each case runs the same batch four ways:

* ``minipt``: minipt's models on minipt's kernels (``backend="triton"`` on CUDA,
  which is what ``auto`` picks there; on the CPU ``backend="native"``, the C++
  kernels, which ``auto`` picks there, reported skipped with the reason where the
  extension was not built);
* ``torch``: the same models on PyTorch's own ops (``backend="torch"``: SDPA and
  ``F.cross_entropy``), eager. This is the baseline of ``ratio``;
* ``torch-compile``: the ``torch`` model under ``torch.compile``;
* ``hf``: Hugging Face's ``GPT2LMHeadModel`` / ``BertForPreTraining`` with
  ``attn_implementation="sdpa"``, randomly initialised from a config of the same
  size (nothing is downloaded). ``ratio_vs_hf`` is its time over each row's time.

On CUDA the models keep fp32 weights and run under bf16 autocast; on the CPU they
run in fp32 at small sizes, and those figures say nothing about a GPU. ``--quick``
takes fewer steps and leaves out ``torch-compile``, whose compilation alone takes
20 s to a minute a model. The environment variable ``BENCH_E2E_BUDGET_S`` bounds
the run: a compiled run not started within that many seconds is reported skipped.
The timed steps of a case go round its providers one step at a time, so that load
from elsewhere on a shared CPU falls on all of them alike.

MFU divides the achieved model FLOP/s by a peak MEASURED at the start of the run:
an 8192³ bf16 GEMM on CUDA (an fp32 GEMM on the CPU), reported as its own row.
Model FLOPs per token follow ``GPT.flops_per_token`` / ``BERT.flops_per_token``
(6·N + 12·L·C·T, PaLM's estimate) with T the sequence length run and BERT's
decoder counted where MLM needs it (``train_flops_per_token``). They count every
position of a padded batch, as published MFU figures do; ``real_tokens_per_s``
counts the non-padding tokens alone.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

from bench.common import cli, peak_memory_bytes, sync, time_ms, time_steps_ms
from minipt.ops import BackendUnavailableError, IGNORE_INDEX, mlm_mask
from minipt.models import BertConfig, GPTConfig, build_model
from minipt.runtime import autocast, resolve_dtype

PROVIDERS = ("torch", "minipt", "hf", "torch-compile")  # the baseline first; compilation, the slowest, last
BASELINE = "torch"
BUDGET_ENV = "BENCH_E2E_BUDGET_S"  # seconds after which no compiled run is started

# bert-base-uncased's ids for the special tokens; every preset's vocabulary holds them.
CLS_ID, SEP_ID, MASK_ID = 101, 102, 103
FIRST_WORD_ID = 999  # ids below are [unused] slots and punctuation; sentences draw from the rest
MLM_PROBABILITY = 0.15  # BERT's masking rate: the batches' and minipt's MLM-head row budget


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # "gpt" or "bert"
    preset: str  # GPTConfig / BertConfig preset
    seq_len: int
    batch: int


# Sizes for one 80 GB H100: about 16k tokens per step for GPT-2 and BERT at T=512, 32k at T=128.
GPU_CASES = (
    Case("gpt2-124m", "gpt", "gpt2", seq_len=1024, batch=16),
    Case("bert-base-T128", "bert", "bert-base", seq_len=128, batch=256),
    Case("bert-base-T512", "bert", "bert-base", seq_len=512, batch=32),
)
# The same comparison at sizes two CPU cores get through in seconds.
CPU_CASES = (
    Case("gpt-mini", "gpt", "gpt-mini", seq_len=64, batch=16),
    Case("bert-tiny-T128", "bert", "bert-tiny", seq_len=128, batch=16),
    Case("bert-tiny-T512", "bert", "bert-tiny", seq_len=512, batch=4),
)


# ----------------------------------------------------------------------------- models
def minipt_config(case: Case, backend: str):
    if case.family == "gpt":
        return GPTConfig.preset(case.preset, block_size=case.seq_len, backend=backend)
    cfg = BertConfig.preset(case.preset, backend=backend)
    if case.seq_len > cfg.block_size:
        raise ValueError(f"{case.name}: seq_len {case.seq_len} exceeds {case.preset}'s {cfg.block_size} positions")
    return cfg


def hf_model(cfg) -> torch.nn.Module:
    """Hugging Face's model of the same size as ``cfg``, randomly initialised, on SDPA attention."""
    import transformers

    if isinstance(cfg, GPTConfig):
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
            layer_norm_epsilon=cfg.layer_norm_eps, activation_function="gelu_new", use_cache=False,
            bos_token_id=None, eos_token_id=None, attn_implementation="sdpa",
        )
        return transformers.GPT2LMHeadModel(hf_cfg)
    # minipt's attention op has no dropout, so neither does this baseline's.
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.inner_size, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0, max_position_embeddings=cfg.block_size,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        attn_implementation="sdpa",
    )
    return transformers.BertForPreTraining(hf_cfg)


def train_flops_per_token(case: Case, cfg, mlm_fraction: float) -> float:
    """The model's own estimate at the case's sequence length, with BERT's decoder where MLM runs it.

    BERT's tied V×C decoder runs at the masked positions only (``mlm_fraction`` of
    all positions); counting it everywhere would put MFU above 1 at BERT-tiny's size.
    """
    with torch.device("meta"):  # counts parameters without allocating or initialising them
        model = build_model(case.family, cfg)
    if case.family == "bert":
        return model.flops_per_token(case.seq_len, mlm_fraction)
    return model.flops_per_token(case.seq_len)


# ----------------------------------------------------------------------------- batches
def make_batch(case: Case, cfg, device, seed: int = 0) -> dict:
    """One batch of ``case``'s shape on ``device``, the same for every provider.

    GPT: random token ids and the next-token targets. BERT: ``[CLS] A [SEP] B [SEP]``
    pairs padded to ``seq_len``, each of a length drawn uniformly from [T/4, T] so
    that padding takes a good share of the batch, as in pre-training, masked by
    ``minipt.ops.mlm_mask``, with random NSP labels.
    """
    gen = torch.Generator().manual_seed(seed)
    B, T = case.batch, case.seq_len
    if case.family == "gpt":
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen)
        return {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}

    if T < 20:
        raise ValueError(f"{case.name}: BERT pairs need seq_len >= 20, got {T}")
    pos = torch.arange(T)[None]  # (1, T)
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=gen)  # (B, 1)
    # Segment A takes 1 .. length-4 tokens; [CLS], two [SEP] and at least one B token make the rest.
    a_len = 1 + (torch.rand(B, 1, generator=gen) * (lengths - 4)).long()  # (B, 1)
    sep_a, sep_b = 1 + a_len, lengths - 1
    ids = torch.randint(FIRST_WORD_ID, cfg.vocab_size, (B, T), generator=gen)
    ids = torch.where(pos == 0, CLS_ID, ids)
    ids = torch.where((pos == sep_a) | (pos == sep_b), SEP_ID, ids)
    real = pos < lengths
    ids = torch.where(real, ids, cfg.pad_token_id)
    special = (pos == 0) | (pos == sep_a) | (pos == sep_b) | ~real
    # The torch backend makes the same batch on every device and backend.
    masked, labels = mlm_mask(
        ids, mask_token_id=MASK_ID, vocab_size=cfg.vocab_size, special_tokens_mask=special,
        mlm_probability=MLM_PROBABILITY, seed=seed, backend="torch",
    )
    return {
        "input_ids": masked.to(device),
        "token_type_ids": ((pos > sep_a) & real).long().to(device),
        "attention_mask": real.long().to(device),
        "labels": labels.to(device),
        "next_sentence_label": torch.randint(0, 2, (B,), generator=gen).to(device),
    }


def loss_of(model, batch: dict, family: str, *, hf: bool) -> torch.Tensor:
    if family == "bert":  # the same keyword arguments for minipt and Hugging Face, but the masking rate
        return model(**batch).loss if hf else model(**batch, mlm_probability=MLM_PROBABILITY).loss
    if hf:
        # GPT2LMHeadModel shifts the labels itself: it is given the inputs and predicts T-1 of them.
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    return model(batch["input_ids"], labels=batch["labels"]).loss


# ----------------------------------------------------------------------------- measurement
def matmul_peak(device: str) -> dict:
    """The card's achievable matmul rate, measured: the denominator of MFU."""
    if torch.device(device).type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=2, rep=5)
    return {
        "name": "matmul_peak", "provider": "torch", "shape": f"{n}x{n}x{n}", "dtype": str(dtype).replace("torch.", ""),
        "median_ms": ms, "tflops": 2 * n**3 / ms / 1e9,
    }


def _steps(device: str, quick: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps)."""
    if torch.device(device).type == "cuda":
        return (2, 6) if quick else (3, 15)
    return (1, 3) if quick else (2, 10)


def backend_for(provider: str, device: str) -> str:
    if provider != "minipt":
        return "torch"
    return "triton" if torch.device(device).type == "cuda" else "native"


class TrainingStep:
    """A fresh model and AdamW for one provider; calling it runs one training step on ``batch``
    and returns the step's loss (detached)."""

    def __init__(self, case: Case, provider: str, device: str, batch: dict):
        self.device = torch.device(device)
        torch.manual_seed(0)
        cfg = minipt_config(case, backend_for(provider, device))
        with self.device:  # initialise on the device: a CPU init of 124M parameters takes seconds
            self.model = hf_model(cfg) if provider == "hf" else build_model(case.family, cfg)
        self.model.train()
        # Fused AdamW is PyTorch's fastest on CUDA; every provider gets the same optimizer.
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, weight_decay=0.1, fused=self.device.type == "cuda"
        )
        self.forward = torch.compile(self.model) if provider == "torch-compile" else self.model
        self.dtype = resolve_dtype("bfloat16" if self.device.type == "cuda" else "float32", self.device)
        self.family, self.hf = case.family, provider == "hf"
        self.batch = batch

    def __call__(self) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            loss = loss_of(self.forward, self.batch, self.family, hf=self.hf)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def resident_bytes(self) -> int:
        """Parameters and optimizer state: what stays allocated between steps."""
        tensors = [*self.model.parameters()]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _release(device: str) -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _record_failure(row: dict, exc: Exception, device: str) -> None:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        row["error"] = f"out of memory at batch {row['batch']} x {row['seq_len']}"
    elif isinstance(exc, BackendUnavailableError) and torch.device(device).type == "cpu":
        # A minipt installed without its C++ extension has no native CPU kernels: the row
        # says so rather than failing the run. On CUDA a missing kernel is a failure.
        row["skipped"] = str(exc).splitlines()[0][:300]
    else:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def measure_case(case: Case, device: str, quick: bool, batch: dict, flops_per_token: float, deadline: float):
    """Every provider on one case: median step time, throughput and peak memory.

    After each provider's warm-up, the timed steps go round the providers one step at a
    time, so that load from elsewhere on a shared machine falls on all of them alike.
    A provider that fails gets its reason in its row; the others carry on.
    """
    dev = torch.device(device)
    rows = {
        provider: {
            "name": case.name, "provider": provider, "backend": backend_for(provider, device),
            "batch": case.batch, "seq_len": case.seq_len, "dtype": "bf16-autocast" if dev.type == "cuda" else "fp32",
        }
        for provider in PROVIDERS
    }
    warmup, steps = _steps(device, quick)
    live, losses, times = {}, {}, {}
    for provider in PROVIDERS:
        if provider == "torch-compile" and quick:
            rows[provider]["skipped"] = "not in --quick: compiling takes 20 s to a minute a model"
            continue
        if provider == "torch-compile" and time.monotonic() > deadline:
            rows[provider]["skipped"] = f"the {BUDGET_ENV} time budget was spent"
            continue
        try:
            step = TrainingStep(case, provider, device, batch)
            t0 = time.perf_counter()
            losses[provider] = [step() for _ in range(warmup)]
            sync(device)
            rows[provider]["warmup_s"] = time.perf_counter() - t0
            live[provider], times[provider] = step, []
        except Exception as exc:  # one provider's failure must not hide the others' figures
            _record_failure(rows[provider], exc, device)
            step = None
            gc.collect()
    for _ in range(steps):
        for provider, step in list(live.items()):
            try:
                times[provider] += time_steps_ms(lambda: losses[provider].append(step()), device, steps=1)
            except Exception as exc:
                _record_failure(rows[provider], exc, device)
                del live[provider]
                gc.collect()

    tokens = case.batch * case.seq_len
    real_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else tokens
    for provider, step in live.items():
        row = rows[provider]
        final_loss = losses[provider][-1].item()
        if not math.isfinite(final_loss):
            row["error"] = f"the training loss is {final_loss} after {len(losses[provider])} steps"
            continue
        ms = statistics.median(times[provider])
        peak = peak_memory_bytes(step, device)  # the step's own peak above what is resident
        row.update(
            median_ms=ms,
            tokens_per_s=tokens / (ms / 1e3),
            real_tokens_per_s=real_tokens / (ms / 1e3),
            tflops=flops_per_token * tokens / (ms / 1e3) / 1e12,
            peak_mem_mb=None if peak is None else (step.resident_bytes() + peak) / 2**20,
            loss=final_loss,
        )
    live.clear()
    _release(device)
    for provider, row in rows.items():
        outcome = row.get("error") or row.get("skipped")
        if outcome is None:
            outcome = f"{row['median_ms']:9.1f} ms  {row['tokens_per_s']:10.0f} tok/s"
        print(f"  {case.name:16s} {provider:14s} {outcome}", flush=True)
    return [rows[p] for p in PROVIDERS]


def run(device: str, quick: bool) -> list[dict]:
    deadline = time.monotonic() + float(os.environ.get(BUDGET_ENV, "inf"))
    dev = torch.device(device)
    peak = matmul_peak(device)
    print(f"measured matmul peak: {peak['tflops']:.3g} TFLOP/s ({peak['dtype']}, {peak['shape']})", flush=True)
    rows = [peak]
    for case in GPU_CASES if dev.type == "cuda" else CPU_CASES:
        cfg = minipt_config(case, "torch")
        batch = make_batch(case, cfg, device)
        mlm_fraction = float((batch["labels"] != IGNORE_INDEX).float().mean()) if case.family == "bert" else 1.0
        case_rows = measure_case(case, device, quick, batch, train_flops_per_token(case, cfg, mlm_fraction), deadline)
        by_provider = {r["provider"]: r["median_ms"] for r in case_rows if "median_ms" in r}
        for row in case_rows:
            if "median_ms" not in row:
                continue
            row["mfu"] = row["tflops"] / peak["tflops"]
            if BASELINE in by_provider:
                row["ratio"] = by_provider[BASELINE] / row["median_ms"]
            if "hf" in by_provider:
                row["ratio_vs_hf"] = by_provider["hf"] / row["median_ms"]
        rows.extend(case_rows)
    return rows


if __name__ == "__main__":
    cli("e2e", run)
