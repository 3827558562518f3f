"""Scoring a batch: the model's loss and validation metrics, for training and ``python -m minipt.eval``.

A GPT batch is ``x`` and its next-token targets ``y``. A BERT batch is pairs:
its MLM masks are drawn here, on the device, by :func:`minipt.ops.mlm_mask`
from a seed that names the step, micro-step and rank (:func:`mask_seed`), so a
resumed run draws the masks it would have drawn; its NSP labels enter the loss
under the ``mlm+nsp`` objective only.

:meth:`Scorer.evaluate` sums each metric's terms on the device over the
validation batches (split across ranks), then reads them in one all-reduce.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from minipt.data import to_device
from minipt.models import ModelOutput
from minipt.ops import IGNORE_INDEX, mlm_mask
from minipt.runtime import Runtime

# What an evaluation sums over its batches, then over the ranks in one all-reduce.
EVAL_SUMS = ("loss", "batches", "mlm_loss", "nsp_loss", "mlm_hits", "masked", "nsp_hits", "pairs", "random_b")
# Validation masks come from their own seeds (2**32 is past any step): the same every evaluation.
VALIDATION_STEP = 2**32


def mask_seed(*parts: int) -> int:
    """A 63-bit seed for ``mlm_mask`` from (seed, step, micro-step, rank): reproducible on resume."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Scorer:
    """A model's loss on batches already made, and its metrics on fixed validation batches.

    ``kind`` is ``gpt`` or ``bert``; for BERT, ``mlm_probability`` is the masking
    rate, ``objective`` says whether NSP enters the loss, and ``seed`` seeds the
    validation masks. ``padding`` holds the batches' padding figures (see
    :func:`minipt.data.pair_batches`), reported with every evaluation.
    ``train_model`` is what training steps run through (compiled, or wrapped in
    DDP); evaluation runs ``model`` itself.
    """

    def __init__(self, kind: str, model: torch.nn.Module, tok, rt: Runtime, *, backend: str = "auto",
                 mlm_probability: float = 0.15, objective: str = "mlm+nsp", seed: int = 0,
                 val_batches: list[dict[str, np.ndarray]] = (), padding: dict[str, float] | None = None,
                 train_model: torch.nn.Module | None = None):
        self.kind, self.model, self.tok, self.rt = kind, model, tok, rt
        self.backend, self.mlm_probability, self.objective, self.seed = backend, mlm_probability, objective, seed
        self.val_batches, self.padding = list(val_batches), padding or {}
        self.train_model = model if train_model is None else train_model

    def forward(self, batch: dict[str, torch.Tensor], seed: int, model=None, z_loss: float = 0.0) -> ModelOutput:
        """The output of ``model`` (the training model by default), loss included, on one batch on the device.

        ``z_loss`` > 0 adds the z term to the loss (training does; evaluation scores the cross-entropy alone)."""
        model = model or self.train_model
        if self.kind == "gpt":
            with self.rt.autocast():
                return model(batch["x"], labels=batch["y"], z_loss=z_loss)
        masked, labels = mlm_mask(
            batch["input_ids"], mask_token_id=self.tok.mask_id, vocab_size=self.tok.vocab_size,
            special_tokens_mask=batch["special_tokens_mask"], mlm_probability=self.mlm_probability, seed=seed,
            backend=self.backend,
        )
        nsp = batch["next_sentence_label"] if self.objective == "mlm+nsp" else None
        layout = {k: batch[k] for k in ("position_ids", "document_ids", "cls_positions") if k in batch}
        with self.rt.autocast():
            return model(
                masked, token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"],
                labels=labels, next_sentence_label=nsp, mlm_probability=self.mlm_probability, z_loss=z_loss, **layout,
            )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation metrics over the fixed validation batches, split across ranks."""
        self.model.eval()
        sums = dict.fromkeys(EVAL_SUMS, torch.zeros((), dtype=torch.float64, device=self.rt.device))
        for i in range(self.rt.rank, len(self.val_batches), self.rt.world_size):
            batch = to_device(self.val_batches[i], self.rt.device)
            out = self.forward(batch, mask_seed(self.seed, VALIDATION_STEP, i), model=self.model)
            for name, value in self._eval_terms(out, batch).items():
                sums[name] = sums[name] + value
        self.model.train()
        totals = self.rt.all_reduce_sum(torch.stack([sums[name] for name in EVAL_SUMS])).tolist()
        return self._eval_metrics(dict(zip(EVAL_SUMS, totals)))

    def _eval_terms(self, out: ModelOutput, batch: dict[str, torch.Tensor]) -> dict:
        """One batch's share of each of EVAL_SUMS (those of GPT: loss and batches)."""
        terms = {"loss": out.loss.double(), "batches": 1}
        if self.kind == "bert":
            nsp_labels = batch["next_sentence_label"]  # (B,), or (B, S) with IGNORE_INDEX at empty slots
            # Scored on the rows the MLM loss read; a padding row's IGNORE_INDEX target matches no prediction.
            predicted = self.model.mlm_logits(out.masked_hidden).argmax(-1)
            terms.update(
                mlm_loss=out.mlm_loss.double(), nsp_loss=out.nsp_loss.double() if out.nsp_loss is not None else 0.0,
                mlm_hits=(predicted == out.masked_targets).sum(), masked=(out.masked_targets != IGNORE_INDEX).sum(),
                nsp_hits=(out.nsp_logits.argmax(-1) == nsp_labels).sum(), pairs=(nsp_labels != IGNORE_INDEX).sum(),
                random_b=(nsp_labels == 1).sum(),
            )
        return terms

    def _eval_metrics(self, s: dict[str, float]) -> dict:
        metrics = {"val_loss": s["loss"] / s["batches"]}
        if self.kind == "gpt":
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
            return metrics
        random_share = s["random_b"] / max(s["pairs"], 1)
        metrics.update(
            mlm_loss=s["mlm_loss"] / s["batches"], mlm_acc=s["mlm_hits"] / max(s["masked"], 1),
            nsp_acc=s["nsp_hits"] / max(s["pairs"], 1),
            # what always guessing the commoner NSP label scores: the bar nsp_acc must clear
            nsp_majority=max(random_share, 1.0 - random_share),
        )
        if self.objective == "mlm+nsp":
            metrics["nsp_loss"] = s["nsp_loss"] / s["batches"]
        return {**metrics, **self.padding}
