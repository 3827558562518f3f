"""Labelled examples for fine-tuning: read from .csv, .tsv or .jsonl, split, encoded as BERT inputs, batched.

Each example has a text, an optional second text (a pair) and a label, each
from a named column: :class:`Columns` (``--text_field``, ``--text_pair_field``,
``--label_field``). A ``.csv`` or ``.tsv`` names its columns in its first row;
without a header row (``--header=false``, as CoLA's files) the columns go by
index from 0. A ``.tsv`` is read as GLUE's are: tab-separated with no quoting,
so a quote mark is text. A ``.jsonl`` holds one object per line.

The label is a class or, for regression (``num_labels=1``), a number:

* ``num_labels`` unset: the classes are the sorted distinct labels of the
  training examples, two or more. A label is a string or a JSON integer (``1``
  and ``"1"`` are one class); a float, boolean or list is refused with its line.
  A validation or test label never seen in training is named with its file and
  line.
* ``num_labels=N``: the labels are the integers 0 to N-1, as GLUE's; one outside
  is named with its file and line.
* ``num_labels=1``: every label is a finite number.

An example is ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]``, cut to
``max_length`` from the longer text's end, as Hugging Face's ``longest_first``
truncation does.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from minipt.config import ConfigError
from minipt.data.sources import DataError, json_reason, not_utf8, open_source
from minipt.tokenizer import TextTokenizer

FORMATS = (".csv", ".tsv", ".jsonl")


@dataclass(frozen=True)
class Columns:
    """Where an example's parts are: column names (a header row's or a jsonl's keys), or indices without a header."""

    text: str = "text"
    text_pair: str | None = None  # None: "text_pair" where the file has it, else no pairs
    label: str = "label"
    header: bool = True  # .csv and .tsv


@dataclass
class Example:
    text: str
    text_pair: str | None
    label: str | int | float  # as read: a .csv or .tsv gives strings, a .jsonl also JSON numbers
    line: int = 0  # where the example is in its file, for error messages
    target: int | float | None = None  # the class index or the number the model learns, from the label


def _rows(path: str, text: io.StringIO, suffix: str, columns: Columns) -> list[tuple[int, dict]]:
    """(line, {column: value}) per record; a .csv or .tsv header that lacks a named column is an error."""
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text, 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: not a JSON object: {json_reason(exc)}") from None
        return rows
    return _table_rows(path, text, suffix, columns)


def _table_rows(path: str, text: io.StringIO, suffix: str, columns: Columns) -> list[tuple[int, dict]]:
    """(line where it starts, row as a dict) of every row of a .csv or .tsv file after its header, if any.

    A .csv is read strictly, so that a quote left open, which would swallow the rest of the file into one
    field, and a row of another width than the header are named by the line they start on. GLUE's .tsv
    files quote nothing: a quote mark there is part of the text."""
    tsv = suffix == ".tsv"
    reader = csv.reader(text, **({"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"strict": True}))
    start, rows, names = 1, [], None
    try:
        if columns.header:
            names = next(reader, [])
            wanted = [columns.text, columns.label] + ([columns.text_pair] if columns.text_pair else [])
            missing = [name for name in wanted if name not in names]
            if names and missing:
                raise DataError(f"{path}:1: the header has no {' or '.join(map(repr, missing))} column (it has "
                                f"{', '.join(map(repr, names))}); a file without a header row: --header=false and "
                                "the columns by index (--text_field=0 ...)")
            start = reader.line_num + 1
        for fields in reader:
            if fields and names is not None and len(fields) != len(names):
                hint = "" if tsv else "; a text holding a comma must be quoted: \"like, this\""
                raise DataError(f"{path}:{start}: {len(fields)} field(s) where the header has {len(names)} "
                                f"({', '.join(names)}){hint}")
            if fields:  # a blank line holds no example
                rows.append((start, dict(zip(names, fields)) if names is not None
                             else {str(i): v for i, v in enumerate(fields)}))
            start = reader.line_num + 1
    except csv.Error as exc:
        if str(exc) == "unexpected end of data":
            raise DataError(f"{path}:{start}: a quoted field opened on line {start} is never closed (the file ends "
                            "inside it); close the quote, and double any quote inside a quoted field (\"\")") from None
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc}); a quote inside a quoted field is "
                        "written twice (\"\"), and a field with a quote in it is quoted whole") from None
    return rows


def read_examples(path: str, columns: Columns = Columns()) -> list[Example]:
    """The examples of a .csv, .tsv or .jsonl file; a bad row is named by its line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"examples file {path!r} does not exist")
    if file.suffix not in FORMATS:
        raise ConfigError(f"{path}: examples must be a .csv, .tsv or .jsonl file")
    with open_source(file) as f:
        raw = f.read()  # examples fit in memory; read whole, a bad byte is named by its line
    try:
        # a byte-order mark is no part of the first column's name
        text = io.StringIO(raw.decode("utf-8").removeprefix("\ufeff"), newline="")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise not_utf8(f"{path}:{line}", exc) from None
    pair_name = columns.text_pair or "text_pair"
    examples = []
    for number, row in _rows(path, text, file.suffix, columns):
        if not isinstance(row, dict) or not isinstance(row.get(columns.text), str) or not row[columns.text].strip():
            raise DataError(f"{path}:{number}: every example needs a non-empty {columns.text!r}")
        label = row.get(columns.label)
        if label in (None, ""):
            raise DataError(f"{path}:{number}: every example needs a {columns.label!r}")
        if isinstance(label, bool) or not isinstance(label, (str, int, float)):
            raise DataError(f"{path}:{number}: the label {json.dumps(label)} is a {type(label).__name__}; a label "
                            "is a string or a number")
        if columns.text_pair and columns.text_pair not in row:
            raise DataError(f"{path}:{number}: the example has no {columns.text_pair!r} (--text_pair_field)")
        pair = row.get(pair_name) or None
        examples.append(Example(row[columns.text], None if pair is None else str(pair), label, number))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _class_names(train: list[Example], source: str, num_labels: int | None) -> list[str]:
    """The class names: "0" to "N-1" with ``num_labels``, else the training labels' sorted spellings."""
    if num_labels is not None:
        return [str(i) for i in range(num_labels)]
    for ex in train:
        # 1 and "1" are one class; 1.0 would become a class of its own spelling
        if isinstance(ex.label, float):
            raise DataError(f"{source}:{ex.line}: the label {ex.label!r} is a float; a class is a string or an "
                            "integer (numbers to predict: --num_labels=1, regression)")
    labels = sorted({str(ex.label) for ex in train})
    if len(labels) < 2:
        raise DataError(f"the training examples of {source} all have the label {labels[0]!r}: "
                        "a classifier needs two labels or more")
    return labels


def _target(ex: Example, source: str, side: str, labels: list[str] | None, data: str, num_labels: int | None):
    """The class index or the number that ``ex``'s label stands for; one that stands for none is named."""
    where = f"{source}:{ex.line}"
    if labels is None:  # regression
        try:
            value = float(ex.label)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DataError(f"{where}: the label {ex.label!r} is not a finite number: --num_labels=1 is regression, "
                            "whose labels are numbers")
        return value
    name = ex.label.strip() if isinstance(ex.label, str) else ex.label
    if num_labels is not None:
        if not (isinstance(name, int) or (isinstance(name, str) and name.isdigit())) or not 0 <= int(name) < num_labels:
            raise DataError(f"{where}: the {side} label {ex.label!r} is not one of 0 to {num_labels - 1} "
                            f"(--num_labels={num_labels})")
        return int(name)
    if isinstance(ex.label, float) or str(ex.label) not in labels:
        raise DataError(f"{where}: the {side} label {ex.label!r} never occurs in the training examples of {data} "
                        f"(labels: {', '.join(labels)})")
    return labels.index(str(ex.label))


def split_examples(data: str, val_data: str = "", test_data: str = "", *, columns: Columns = Columns(),
                   num_labels: int | None = None, val_fraction: float = 0.1,
                   seed: int = 0) -> tuple[list[Example], list[Example], list[Example], list[str] | None]:
    """Training, validation and test examples, each with its ``target``, and the class names (None: regression).

    Without ``val_data``, a shuffle of ``data`` seeded by ``seed`` gives up its last ``val_fraction``."""
    train = read_examples(data, columns)
    if val_data:
        val, val_source = read_examples(val_data, columns), val_data
    else:
        train = train[:]
        random.Random(seed).shuffle(train)
        cut = len(train) - max(1, int(len(train) * val_fraction))
        if cut < 1:
            raise DataError(f"{data} holds {len(train)} example(s): too few to hold out a validation share; "
                            "give more, or --val_data")
        train, val, val_source = train[:cut], train[cut:], data
    labels = None if num_labels == 1 else _class_names(train, data, num_labels)
    test = read_examples(test_data, columns) if test_data else []
    for examples, source, side in ((train, data, "training"), (val, val_source, "validation"),
                                   (test, test_data, "test")):
        for ex in examples:
            ex.target = _target(ex, source, side, labels, data, num_labels)
    return train, val, test, labels


def encode(examples: list[Example], tok: TextTokenizer, max_length: int) -> list[tuple]:
    """(ids, token types, target) per example: [CLS] A [SEP] (B [SEP]), cut to max_length from the longer text's end."""
    out = []
    for ex in examples:
        a, b = tok.encode(ex.text), tok.encode(ex.text_pair) if ex.text_pair is not None else None
        room = max_length - (3 if b is not None else 2)
        while len(a) + len(b or []) > room:
            (a if b is None or len(a) >= len(b) else b).pop()
        ids, types = [tok.cls_id, *a, tok.sep_id], [0] * (len(a) + 2)
        if b is not None:
            ids, types = ids + [*b, tok.sep_id], types + [1] * (len(b) + 1)
        out.append((ids, types, ex.target))
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
