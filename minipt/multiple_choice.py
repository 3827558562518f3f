"""Multiple-choice evaluation of GPT: HellaSwag, from its jsonl or from llm.c's eval file.

An example is a context and K endings (HellaSwag: 4), one of them right: its
label. Each ending is scored by the cross-entropy, in nats, of its tokens, each
predicted from the context and the ending's tokens before it. The model picks
the ending it finds likeliest, by one of three measures:

* ``acc``: the lowest summed loss, i.e. the highest log-likelihood. This is
  both llm.c's ``acc`` and lm-evaluation-harness's ``acc``.
* ``acc_norm``: the lowest mean loss per ending token, llm.c's ``acc_norm``.
* ``acc_norm_chars``: the highest log-likelihood per character of the
  ending, lm-evaluation-harness's ``acc_norm``. The harness divides by
  ``len(ending)``, the ending's text without the space before it. Here that
  text is the ending's ids decoded, so a jsonl and its .bin count alike.

Ties go to the first ending.

The rendering is llm.c's (``dev/data/hellaswag.py``): the tokens of ``ctx``,
then those of ``" " + ending``. Where a record has no ``ctx``, it is ``ctx_a``
and ``ctx_b`` joined by a space, as the dataset defines ``ctx``. llm.c's .bin
holds exactly these ids. lm-evaluation-harness scores a rewritten text: the
activity label before the context, ``ctx_b`` capitalised, and WikiHow's
``[title]`` markers removed. Its figures for one model therefore differ
somewhat from these.

The rows (context + ending) of ``batch_size`` examples go through the model in
one forward pass, right-padded; causal attention keeps the padding out of every
scored position. The LM head reads only the ending positions
(``linear_cross_entropy``, one loss per position), so the (rows, T, V) logits
are never built.

The model reads at most ``block_size`` tokens. A longer row (context + ending,
less its last token) keeps its last ``block_size`` tokens: the context loses
its start, as in lm-evaluation-harness. ``truncated`` counts the examples cut.
An ending longer than ``block_size`` tokens is refused.

llm.c's eval file (``write_evalfile``, ``dev/data/data_common.py``) starts with
a header of 256 int32: magic 20240522, version 1, the number of examples, and
the longest example in bytes. Then each example is a stream of uint16:

* 65535, the example's size in bytes, its index, its label, and the number of
  endings K;
* the context's length and ids;
* K times, an ending's length and ids.

The ids are GPT-2's, and each is checked against the model's tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minipt.config import ConfigError
from minipt.data.sources import DataError, not_utf8, open_source
from minipt.data.tokens import LLMC_MAGIC
from minipt.ops import IGNORE_INDEX, linear_cross_entropy
from minipt.runtime import Runtime
from minipt.tokenizer import TextTokenizer

EVAL_MAGIC, EVAL_VERSION, EVAL_HEADER_BYTES = 20240522, 1, 256 * 4
START_EXAMPLE = 2**16 - 1
GPT2_VOCAB = 50257


@dataclass
class Question:
    context: list[int]
    endings: list[list[int]]
    label: int  # the index of the right ending
    where: str  # "FILE:LINE" or "FILE: byte N", for error messages


# ----------------------------------------------------------------------------- reading
def read_questions(path: str, tok: TextTokenizer) -> list[Question]:
    """The examples of a HellaSwag ``.jsonl`` (tokenized by ``tok``) or of llm.c's eval ``.bin``."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--data={path} is not a file: --task=hellaswag reads HellaSwag's .jsonl "
                          "or llm.c's eval .bin (hellaswag_val.bin)")
    if file.suffix == ".jsonl":
        return read_jsonl(file, tok)
    if file.suffix == ".bin":
        return read_eval_file(file, tok.vocab_size)
    raise ConfigError(f"--data={path}: --task=hellaswag reads HellaSwag's .jsonl or llm.c's eval .bin")


def _label(row: dict, count: int, where: str) -> int:
    label = row.get("label")
    if label is None or label == "":
        raise DataError(f"{where}: no 'label' (HellaSwag's test split is unlabelled: score the validation split)")
    # the Hugging Face copy of the dataset spells the label as a string
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < count:
        raise DataError(f"{where}: the label {json.dumps(label)} is not the index of one of its {count} endings")
    return label


def read_jsonl(file: Path, tok: TextTokenizer) -> list[Question]:
    """HellaSwag's records: ``ctx`` (or ``ctx_a`` + ``ctx_b``), ``endings``, ``label``; a bad one is named by line."""
    with open_source(file) as f:
        raw = f.read()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise not_utf8(f"{file}:{line}", exc) from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not a JSON object: {exc}") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: not a JSON object but a {type(row).__name__}")
        context = row.get("ctx")
        if context is None and isinstance(row.get("ctx_a"), str):
            context = " ".join(part for part in (row["ctx_a"], row.get("ctx_b") or "") if part)
        if not isinstance(context, str) or not context.strip():
            raise DataError(f"{where}: an example needs a non-empty 'ctx' (or 'ctx_a' and 'ctx_b')")
        endings = row.get("endings")
        if not (isinstance(endings, list) and len(endings) >= 2
                and all(isinstance(e, str) and e.strip() for e in endings)):
            raise DataError(f"{where}: 'endings' must be a list of two or more non-empty strings")
        records.append((where, context, endings, _label(row, len(endings), where)))
    if not records:
        raise DataError(f"{file} holds no examples")
    contexts = tok.encode_batch([context for _, context, _, _ in records])
    endings = iter(tok.encode_batch([" " + e for _, _, es, _ in records for e in es]))
    return [Question(context, [next(endings) for _ in es], label, where)
            for (where, _, es, label), context in zip(records, contexts)]


def read_eval_file(file: Path, vocab_size: int) -> list[Question]:
    """llm.c's eval file; a malformed one is named by the byte offset of what is wrong."""
    with open_source(file) as f:
        data = f.read()
    if len(data) < EVAL_HEADER_BYTES:
        raise DataError(f"{file}: byte 0: {len(data)} bytes, shorter than the {EVAL_HEADER_BYTES}-byte header "
                        "of llm.c's eval file")
    magic, version, count = (int(v) for v in np.frombuffer(data, "<i4", 3))
    if magic != EVAL_MAGIC:
        shard = f" ({LLMC_MAGIC} is an llm.c token shard, which --task=text scores)" if magic == LLMC_MAGIC else ""
        raise DataError(f"{file}: byte 0: magic number {magic}, not {EVAL_MAGIC} (llm.c's eval file){shard}")
    if version != EVAL_VERSION:
        raise DataError(f"{file}: byte 4: version {version}, expected {EVAL_VERSION} (uint16 ids)")
    if count < 1:
        raise DataError(f"{file}: byte 8: the header counts {count} examples")
    if len(data) % 2:
        raise DataError(f"{file}: byte {len(data) - 1}: the examples are uint16, but the file has an odd size")
    words = np.frombuffer(data, "<u2", offset=EVAL_HEADER_BYTES).astype(np.int64)
    questions, at = [], 0  # at: the next example's first word
    for i in range(count):
        where = f"{file}: byte {EVAL_HEADER_BYTES + 2 * at} (example {i})"
        if at >= len(words):
            raise DataError(f"{file}: byte {len(data)}: the file ends after {i} of the {count} examples its "
                            "header counts")
        if words[at] != START_EXAMPLE:
            raise DataError(f"{where}: expected the example delimiter {START_EXAMPLE}, found {words[at]}")
        size = int(words[at + 1]) if at + 1 < len(words) else 0
        if size < 10 or size % 2 or at + size // 2 > len(words):
            raise DataError(f"{where}: the example's size ({size} bytes) does not fit the file")
        questions.append(_parse_example(words[at:at + size // 2], file, EVAL_HEADER_BYTES + 2 * at, where,
                                        vocab_size))
        at += size // 2
    if at != len(words):
        raise DataError(f"{file}: byte {EVAL_HEADER_BYTES + 2 * at}: {2 * (len(words) - at)} bytes follow the "
                        f"{count} examples the header counts")
    return questions


def _parse_example(words: np.ndarray, file: Path, base: int, where: str, vocab_size: int) -> Question:
    """One example's words: delimiter, size, index, label, K, then the context and K endings, each length-prefixed."""
    label, count = int(words[3]), int(words[4])
    if count < 2 or label >= count:
        raise DataError(f"{where}: {count} ending(s) and the label {label}: expected two or more endings "
                        "and a label below their number")
    at, pieces = 5, []
    for _ in range(count + 1):  # the context, then the endings
        length = int(words[at]) if at < len(words) else 0
        if length < 1 or at + 1 + length > len(words):
            raise DataError(f"{where}: the length {length} at byte {base + 2 * at} is empty or runs past the "
                            f"example's {2 * len(words)} bytes")
        pieces.append(words[at + 1:at + 1 + length])
        at += 1 + length
    if at != len(words):
        raise DataError(f"{where}: its fields end at byte {base + 2 * at}, before the example's {2 * len(words)} bytes")
    ids = words[5:]
    if ids.max() >= vocab_size:  # the lengths are < 2**16 - 1 too, so this is only a bound to look closer
        for piece_at, piece in zip(np.cumsum([5] + [1 + len(p) for p in pieces[:-1]]) + 1, pieces):
            bad = np.flatnonzero(piece >= vocab_size)
            if bad.size:
                raise DataError(
                    f"{where}: token id {piece[bad[0]]} at byte {base + 2 * (piece_at + bad[0])} is past the "
                    f"{vocab_size} tokens of the model's tokenizer: the file holds GPT-2 ids ({GPT2_VOCAB} tokens), "
                    "for a model with GPT-2's tokenizer")
    return Question(pieces[0].tolist(), [p.tolist() for p in pieces[1:]], label, where)


# ----------------------------------------------------------------------------- scoring
def ending_rows(questions: list[Question], block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(inputs, targets, examples truncated): a row per ending, right-padded; only ending tokens are targets."""
    inputs, targets, truncated = [], [], 0
    for q in questions:
        cut = False
        for ending in q.endings:
            if len(ending) > block_size:
                raise DataError(f"{q.where}: an ending of {len(ending)} tokens is longer than block_size={block_size}: "
                                "its first token would have no context within the model's reach")
            row = (q.context + ending)[-(block_size + 1):]
            cut |= len(row) < len(q.context) + len(ending)
            inputs.append(row[:-1])
            targets.append([IGNORE_INDEX] * (len(row) - 1 - len(ending)) + ending)
        truncated += cut
    width = max(map(len, inputs))
    x = np.zeros((len(inputs), width), np.int64)  # padding id 0: after the row, no scored position sees it
    y = np.full((len(inputs), width), IGNORE_INDEX, np.int64)
    for i, (row, target) in enumerate(zip(inputs, targets)):
        x[i, :len(row)], y[i, :len(target)] = row, target
    return x, y, truncated


@torch.no_grad()
def ending_losses(model, questions: list[Question], rt: Runtime, *, block_size: int, batch_size: int,
                  backend: str = "auto") -> tuple[list[np.ndarray], int]:
    """(the summed loss of every ending, per example; the number of examples truncated)."""
    model.eval()
    wte = model.transformer.wte.weight  # (V, C): GPT's LM head is tied to it
    losses, truncated = [], 0
    for start in range(0, len(questions), batch_size):
        group = questions[start:start + batch_size]
        x, y, cut = ending_rows(group, block_size)
        truncated += cut
        x, y = torch.from_numpy(x).to(rt.device), torch.from_numpy(y).to(rt.device)
        scored = y != IGNORE_INDEX  # (R, T)
        with rt.autocast():
            hidden = model.hidden_states(x)  # (R, T, C)
            per_token = linear_cross_entropy(hidden[scored], wte, y[scored], reduction="none", backend=backend)
        sums = torch.zeros(len(x), dtype=torch.float64, device=rt.device)
        sums.index_add_(0, scored.nonzero()[:, 0], per_token.double())  # (R,)
        sums = sums.cpu().numpy()
        for q in group:
            losses.append(sums[:len(q.endings)])
            sums = sums[len(q.endings):]
    return losses, truncated


def accuracies(questions: list[Question], losses: list[np.ndarray], tok: TextTokenizer) -> dict:
    """acc, acc_norm (llm.c) and acc_norm_chars (lm-evaluation-harness) of the losses, with the example count."""
    hits = dict.fromkeys(("acc", "acc_norm", "acc_norm_chars"), 0)
    for q, summed in zip(questions, losses):
        tokens = np.array([len(e) for e in q.endings])
        chars = np.array([max(1, len(tok.decode(e).removeprefix(" "))) for e in q.endings])
        hits["acc"] += int(np.argmin(summed)) == q.label
        hits["acc_norm"] += int(np.argmin(summed / tokens)) == q.label
        hits["acc_norm_chars"] += int(np.argmax(-summed / chars)) == q.label
    return {"examples": len(questions), **{name: n / len(questions) for name, n in hits.items()}}


def evaluate_hellaswag(model, tok: TextTokenizer, data: str, rt: Runtime, *, block_size: int, batch_size: int,
                       backend: str = "auto") -> dict:
    """The accuracies of a GPT on the examples of ``data``, with how many were scored and truncated."""
    questions = read_questions(data, tok)
    losses, truncated = ending_losses(model, questions, rt, block_size=block_size, batch_size=batch_size,
                                      backend=backend)
    return {**accuracies(questions, losses, tok), "truncated": truncated}
