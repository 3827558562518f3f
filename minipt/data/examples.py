"""Labelled examples for fine-tuning: read from .csv or .jsonl, split, encoded as BERT inputs, batched.

A ``.csv`` has a header row, a ``.jsonl`` one object per line; both give
``text``, an optional ``text_pair`` and ``label``: a string, or a JSON integer
(``1`` and ``"1"`` are one label; a float, boolean or list is refused with its
line). The labels are the sorted distinct values of the training examples, two
or more; a validation or test label never seen in training is named with its
file and line. An example is ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]``,
cut to ``max_length`` from the longer text's end, as Hugging Face's
``longest_first`` truncation does.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from minipt.config import ConfigError
from minipt.data.sources import DataError, json_reason, not_utf8, open_source
from minipt.tokenizer import TextTokenizer


@dataclass
class Example:
    text: str
    text_pair: str | None
    label: str
    line: int = 0  # where the example is in its file, for error messages


def read_examples(path: str) -> list[Example]:
    """The examples of a .csv (header row) or .jsonl file; a bad row is named by its line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"examples file {path!r} does not exist")
    if file.suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"{path}: examples must be a .csv or .jsonl file")
    with open_source(file) as f:
        raw = f.read()  # examples fit in memory; read whole, a bad byte is named by its line
    try:
        text = io.StringIO(raw.decode("utf-8"), newline="")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise not_utf8(f"{path}:{line}", exc) from None
    if file.suffix == ".csv":
        rows = _csv_rows(path, text)
    else:
        rows = []
        for number, line in enumerate(text, 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: not a JSON object: {json_reason(exc)}") from None
    examples = []
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{path}:{number}: every example needs a non-empty 'text'")
        label = row.get("label")
        if label in (None, ""):
            raise DataError(f"{path}:{number}: every example needs a 'label'")
        # 1 and "1" are one class; 1.0, true or [1] would become classes of their own spelling
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{path}:{number}: the label {json.dumps(label)} is a {type(label).__name__}; a label "
                            "is a string or an integer")
        pair = row.get("text_pair") or None
        examples.append(Example(row["text"], None if pair is None else str(pair), str(label), number))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _csv_rows(path: str, text: io.StringIO) -> list[tuple[int, dict]]:
    """(line where it starts, row as a dict) of every row after the header.

    Read strictly, so that a quote left open, which would swallow the rest of the file into one
    field, and a row of another width than the header are named by the line they start on."""
    reader = csv.reader(text, strict=True)
    start, rows = 1, []
    try:
        columns = next(reader, [])
        missing = [name for name in ("text", "label") if name not in columns]
        if columns and missing:
            raise DataError(f"{path}:1: the header has no {' or '.join(map(repr, missing))} column "
                            f"(it has {', '.join(map(repr, columns))})")
        start = reader.line_num + 1
        for fields in reader:
            if fields and len(fields) != len(columns):
                raise DataError(
                    f"{path}:{start}: {len(fields)} field(s) where the header has {len(columns)} "
                    f"({', '.join(columns)}); a text holding a comma must be quoted: \"like, this\"")
            if fields:
                rows.append((start, dict(zip(columns, fields))))
            start = reader.line_num + 1
    except csv.Error as exc:
        if str(exc) == "unexpected end of data":
            raise DataError(f"{path}:{start}: a quoted field opened on line {start} is never closed (the file ends "
                            "inside it); close the quote, and double any quote inside a quoted field (\"\")") from None
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc}); a quote inside a quoted field is "
                        "written twice (\"\"), and a field with a quote in it is quoted whole") from None
    return rows


def split_examples(data: str, val_data: str = "", test_data: str = "", *, val_fraction: float = 0.1,
                   seed: int = 0) -> tuple[list[Example], list[Example], list[Example], list[str]]:
    """Training, validation and test examples, and the labels: checked to be two or more, all seen in training.

    Without ``val_data``, a shuffle of ``data`` seeded by ``seed`` gives up its last ``val_fraction``."""
    train = read_examples(data)
    if val_data:
        val, val_source = read_examples(val_data), val_data
    else:
        train = train[:]
        random.Random(seed).shuffle(train)
        cut = len(train) - max(1, int(len(train) * val_fraction))
        if cut < 1:
            raise DataError(f"{data} holds {len(train)} example(s): too few to hold out a validation share; "
                              "give more, or --val_data")
        train, val, val_source = train[:cut], train[cut:], data
    labels = sorted({ex.label for ex in train})
    if len(labels) < 2:
        raise DataError(f"the training examples of {data} all have the label {labels[0]!r}: "
                          "a classifier needs two labels or more")
    test = read_examples(test_data) if test_data else []
    for examples, source, side in ((val, val_source, "validation"), (test, test_data, "test")):
        for ex in examples:
            if ex.label not in labels:
                raise DataError(f"{source}:{ex.line}: the {side} label {ex.label!r} never occurs in the "
                                  f"training examples of {data} (labels: {', '.join(labels)})")
    return train, val, test, labels


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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the training examples in ``epoch``: a function of the seed alone, so a resume redraws it."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order
