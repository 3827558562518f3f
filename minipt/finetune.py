"""``python -m minipt.finetune --init_from DIR --data train.csv``: fine-tune BERT for sequence classification.

``DIR`` is a BERT run or a Hugging Face BERT folder (read by
:func:`minipt.sample.load_run`). The examples are a ``.csv`` with a header row
or a ``.jsonl``, with ``text``, an optional ``text_pair`` and ``label`` (any
string; the labels are the sorted distinct values of the training set). The
head is ``BertForSequenceClassification``'s: dropout and a linear layer on the
pooled [CLS] state (the pretrained pooler, dense + tanh). The optimizer and the
schedule are the trainer's (AdamW, linear warm-up, cosine decay). After each
epoch it reports validation accuracy and macro-F1 (F1 averaged over the labels
that occur in the truth or the predictions, as scikit-learn does); at the end it
writes ``metrics.jsonl`` and, in ``out_dir/hf``, the model as a
``transformers.BertForSequenceClassification`` with its tokenizer (the export
needs ``transformers``).
"""

from __future__ import annotations

import csv
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from minipt import checkpoint as ckpt
from minipt import hf, runtime, sample
from minipt.config import ConfigError, check_types, make_config, parse_overrides
from minipt.model import BERT
from minipt.ops import cross_entropy
from minipt.runlog import append_metrics
from minipt.tokenizer import TextTokenizer, TokenizerError
from minipt.train import learning_rate, make_optimizer

PROG = "python -m minipt.finetune"


@dataclass
class FinetuneConfig:
    # ---- model and data
    init_from: str = ""  # a BERT run folder or a Hugging Face BERT folder
    data: str = ""  # training examples: .csv (header row) or .jsonl with text, optional text_pair, label
    val_data: str = ""  # validation examples, same format; empty: the last val_fraction of --data
    val_fraction: float = 0.1  # share of --data held out when no --val_data is given
    max_length: int | None = None  # tokens per example with [CLS] and [SEP]s (longer: cut); none: block_size
    # ---- optimization
    epochs: int = 3  # passes over the training examples
    batch_size: int = 16  # examples per step
    learning_rate: float = 2e-5  # peak learning rate (BERT's paper: 2e-5 to 5e-5)
    warmup_iters: int = 0  # steps of linear warm-up
    weight_decay: float = 0.01  # AdamW weight decay, on matrices and embeddings only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    dropout: float | None = None  # dropout in the encoder and before the classifier; none: the checkpoint's
    # ---- system
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on a GPU, else float32), float32 or bfloat16
    backend: str = "auto"  # minipt.ops backend: auto, torch, triton or native
    seed: int = 1337  # seeds the classifier's initialisation and the order of the examples
    out_dir: str = "out-finetune"  # metrics.jsonl, and the exported model in out_dir/hf

    # what the trainer's schedule reads: one cosine decay over the whole run, to zero
    decay_lr = True
    final_min_lr = 0.0
    final_lr_decay_iters = 0

    def __post_init__(self):
        check_types(self)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 3:
            raise ConfigError(f"max_length must be >= 3 ([CLS], a token, [SEP]), got {self.max_length}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


# ----------------------------------------------------------------------------- examples
@dataclass
class Example:
    text: str
    text_pair: str | None
    label: str


def read_examples(path: str) -> list[Example]:
    """The examples of a .csv (header row) or .jsonl file; a bad row is named by its line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"examples file {path!r} does not exist")
    if file.suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"{path}: examples must be a .csv or .jsonl file")
    with open(file, encoding="utf-8", newline="") as f:
        if file.suffix == ".csv":
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
        else:
            rows = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((number, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{path}:{number}: not a JSON object: {exc}") from None
    examples = []
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ConfigError(f"{path}:{number}: every example needs a non-empty 'text'")
        if row.get("label") in (None, ""):
            raise ConfigError(f"{path}:{number}: every example needs a 'label'")
        pair = row.get("text_pair") or None
        examples.append(Example(row["text"], None if pair is None else str(pair), str(row["label"])))
    if not examples:
        raise ConfigError(f"{path} holds no examples")
    return examples


def encode(examples: list[Example], tok: TextTokenizer, label_ids: dict[str, int], max_length: int) -> list[tuple]:
    """(ids, token types, label) per example: [CLS] A [SEP] (B [SEP]), cut to max_length from the longer text's end."""
    out = []
    for ex in examples:
        a, b = tok.encode(ex.text), tok.encode(ex.text_pair) if ex.text_pair is not None else None
        room = max_length - (3 if b is not None else 2)
        while len(a) + len(b or []) > room:
            (a if b is None or len(a) >= len(b) else b).pop()
        ids, types = [tok.cls_id, *a, tok.sep_id], [0] * (len(a) + 2)
        if b is not None:
            ids, types = ids + [*b, tok.sep_id], types + [1] * (len(b) + 1)
        out.append((ids, types, label_ids[ex.label]))
    return out


def collate(rows: list[tuple], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row_ids, row_types, _) in enumerate(rows):
        ids[i, :len(row_ids)], types[i, :len(row_ids)], mask[i, :len(row_ids)] = (
            torch.tensor(row_ids), torch.tensor(row_types), 1)
    labels = torch.tensor([label for _, _, label in rows])
    return {k: v.to(device) for k, v in dict(input_ids=ids, token_type_ids=types, attention_mask=mask,
                                              labels=labels).items()}


# ----------------------------------------------------------------------------- the model
class BertClassifier(nn.Module):
    """BertForSequenceClassification: dropout and a linear layer on the pooled [CLS] state."""

    def __init__(self, bert: BERT, num_labels: int):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(bert.config.dropout)
        self.classifier = nn.Linear(bert.config.n_embd, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        x = self.bert.encode(input_ids, token_type_ids, attention_mask)  # (B, T, C)
        pooled = torch.tanh(self.bert.pooler(x[:, 0]))  # (B, C)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)


def scores(predicted: list[int], truth: list[int]) -> dict:
    """Accuracy and macro-F1 over the labels in the truth or the predictions."""
    f1s = []
    for label in sorted(set(predicted) | set(truth)):
        tp = sum(p == t == label for p, t in zip(predicted, truth))
        fp = sum(p == label != t for p, t in zip(predicted, truth))
        fn = sum(t == label != p for p, t in zip(predicted, truth))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": sum(p == t for p, t in zip(predicted, truth)) / len(truth), "macro_f1": sum(f1s) / len(f1s)}


@torch.no_grad()
def evaluate(model: BertClassifier, rows: list[tuple], cfg: FinetuneConfig, rt: runtime.Runtime, pad_id: int) -> dict:
    model.eval()
    predicted = []
    for i in range(0, len(rows), cfg.batch_size):
        batch = collate(rows[i:i + cfg.batch_size], pad_id, rt.device)
        with rt.autocast():
            predicted += model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).argmax(-1).tolist()
    model.train()
    return scores(predicted, [label for _, _, label in rows])


# ----------------------------------------------------------------------------- the command
def finetune(cfg: FinetuneConfig, rt: runtime.Runtime, log=print):
    """Fine-tune; returns the model, its tokenizer, its labels and the last validation scores."""
    if not cfg.init_from or not cfg.data:
        raise ConfigError("--init_from (a BERT run or Hugging Face BERT folder) and --data are required")
    torch.manual_seed(cfg.seed)
    bert, tok, saved = sample.load_run(cfg.init_from, backend=cfg.backend, dropout=cfg.dropout)
    if saved["model_type"] != "bert":
        raise ConfigError(f"--init_from={cfg.init_from} holds a {saved['model_type']} model; fine-tuning needs BERT")
    max_length = cfg.max_length or bert.config.block_size
    if max_length > bert.config.block_size:
        raise ConfigError(f"max_length={max_length} exceeds the model's {bert.config.block_size} positions")
    train = read_examples(cfg.data)
    if cfg.val_data:
        val = read_examples(cfg.val_data)
    else:
        cut = len(train) - max(1, int(len(train) * cfg.val_fraction))
        train, val = train[:cut], train[cut:]
    labels = sorted({ex.label for ex in train})
    unseen = sorted({ex.label for ex in val} - set(labels))
    if unseen:
        raise ConfigError(f"validation labels {unseen} never occur in the training examples {labels}")
    label_ids = {name: i for i, name in enumerate(labels)}
    train_rows, val_rows = (encode(x, tok, label_ids, max_length) for x in (train, val))
    model = BertClassifier(bert, len(labels)).to(rt.device).train()
    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    cfg.final_lr_decay_iters = max(cfg.epochs * steps_per_epoch, cfg.warmup_iters)
    optimizer = make_optimizer(model, cfg, rt.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ckpt.METRICS).unlink(missing_ok=True)
    log(f"fine-tuning {cfg.init_from} on {len(train_rows)} examples, {len(labels)} labels, "
        f"{len(val_rows)} for validation")
    order, step, result = random.Random(cfg.seed), 0, {}
    for epoch in range(1, cfg.epochs + 1):
        order.shuffle(train_rows)
        for i in range(0, len(train_rows), cfg.batch_size):
            batch = collate(train_rows[i:i + cfg.batch_size], tok.pad_id, rt.device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            with rt.autocast():
                logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            loss = cross_entropy(logits.float(), batch["labels"], backend=cfg.backend)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        result = {"epoch": epoch, "iter": step, "train_loss": loss.item(),
                  **evaluate(model, val_rows, cfg, rt, tok.pad_id)}
        append_metrics(out, result)
        log(f"epoch {epoch}: train loss {result['train_loss']:.4f}, accuracy {result['accuracy']:.4f}, "
            f"macro-F1 {result['macro_f1']:.4f}")
    return model, tok, labels, result


def export(model: BertClassifier, tok: TextTokenizer, labels: list[str], folder: Path) -> None:
    """The model as transformers' BertForSequenceClassification, with its tokenizer.json, in ``folder``."""
    hf.classifier_to_hf(model.bert, model.classifier, labels).save_pretrained(folder)
    tok.save(folder / ckpt.TOKENIZER)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = make_config(FinetuneConfig, parse_overrides(FinetuneConfig, argv, PROG, __doc__.split("\n\n")[0]))
        rt = runtime.setup(cfg.device, cfg.dtype)
        hf.require_transformers()  # the export at the end needs it: fail now, not after the training
        model, tok, labels, _ = finetune(cfg, rt)
        export(model, tok, labels, Path(cfg.out_dir) / "hf")
        print(f"done: {Path(cfg.out_dir) / 'hf'} holds the model as a BertForSequenceClassification")
        return 0
    except (ConfigError, TokenizerError, ckpt.CheckpointError, ValueError, ImportError) as exc:
        print(f"minipt.finetune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
