"""Data preparation at size: minipt's streaming tokenization against Hugging Face ``datasets``.

A synthetic corpus is generated in a temporary folder at run time (never
committed): documents of words drawn from a Zipf law over 30,000 made-up words,
with log-normal lengths (median about 2 KB, a tail of tens of KB, as web pages
have), written as one ``.jsonl`` and, at the smallest size, as a folder of
``.txt`` files too. At each size (0.25, 0.5 and 1 GB; ``--quick``: 2 MB) the
same byte-level BPE tokenizer (trained once on a small sample) tokenizes it in
fresh processes:

* ``minipt-jsonl`` and ``minipt-txt``: ``minipt.data.prepare_data`` into shards;
* ``datasets.map``: what users do today, ``load_dataset("json", ...)`` then
  ``.map(batched=True, num_proc=<cores>)`` with the same tokenizer, Arrow cache
  included.

``mb_per_s`` is the jsonl's bytes over wall time (the txt files hold the same
documents); ``peak_rss_mb`` the peak resident memory of the process tree
(sampled every 50 ms from /proc, workers included); ``ratio`` is a row's throughput over ``datasets.map``'s on the same corpus. The
last row (``first_step_s``) is the wall time of ``python -m minipt.train
--data=<the largest jsonl> --max_iters=1`` from launch to exit, a fresh cache:
the tokenizer trained on its sample, the corpus tokenized, one step, two
evaluations and the save.

The ``one-line text`` row is the memory of a single line of text: 50 MB
(``--quick``: 2 MB) of words from a vocabulary of 18, with no line break,
prepared by ``prepare_data`` with a BPE tokenizer trained on it, as
``one-line.txt`` (``peak_rss_mb``) and as ``.jsonl`` records of 10,000 words
(``jsonl_peak_rss_mb``): a .txt file is read in pieces, so the first stays
near the second instead of at 100 bytes per byte of the line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import cli

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1
WORDS = 30_000


def write_corpus(folder: Path, sizes: tuple[int, ...], seed: int = 0) -> tuple[list[Path], Path]:
    """One ``corpus-<size>.jsonl`` per size, each a prefix of the next, and ``txt/``: the smallest as files."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    weights = 1.0 / np.arange(1, 27)
    vocab = np.array(["".join(rng.choice(letters, size=rng.integers(1, 10), p=weights / weights.sum()))
                      for _ in range(WORDS)])
    zipf = np.cumsum(1.0 / np.arange(1, WORDS + 1))
    zipf /= zipf[-1]
    paths, txt = [folder / f"corpus-{size}.jsonl" for size in sizes], folder / "txt"
    txt.mkdir(parents=True, exist_ok=True)
    files = [open(p, "w", encoding="utf-8") for p in paths]
    written, n = 0, 0
    try:
        while written < sizes[-1]:
            words = vocab[np.searchsorted(zipf, rng.random(max(8, int(rng.lognormal(5.8, 1.0)))))]
            sentences = np.array_split(words, max(1, len(words) // 12))
            text = "\n\n".join(" ".join(s).capitalize() + "." for s in sentences)
            line = json.dumps({"id": n, "text": text}) + "\n"
            for size, f in zip(sizes, files):
                if written < size:
                    f.write(line)
            if written < sizes[0]:
                (txt / f"{n // 1000:04d}").mkdir(exist_ok=True)
                (txt / f"{n // 1000:04d}" / f"{n:07d}.txt").write_text(text, encoding="utf-8")
            written += len(line)
            n += 1
    finally:
        for f in files:
            f.close()
    return paths, txt


def write_one_line(folder: Path, size: int, seed: int = 0) -> tuple[Path, Path]:
    """``size`` bytes of words on one line as ``one-line.txt``, and the same words as ``.jsonl`` records."""
    rng = np.random.default_rng(seed)
    vocab = np.array("the king queen fool sword crown night day love war peace heart hand eye gold silver river "
                     "stone".split())
    folder.mkdir(parents=True, exist_ok=True)
    txt, jsonl = folder / "one-line.txt", folder / "one-line.jsonl"
    with open(txt, "w", encoding="utf-8") as t, open(jsonl, "w", encoding="utf-8") as j:
        written = 0
        while written < size:
            words = " ".join(vocab[rng.integers(0, len(vocab), 10_000)])
            t.write(("" if written == 0 else " ") + words)
            j.write(json.dumps({"text": words}) + "\n")
            written += len(words) + 1
    return txt, jsonl


def run_measured(cmd: list[str], cwd: Path) -> dict:
    """Wall time and peak RSS of the process tree of ``cmd``."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak, stop = [0], threading.Event()

    def tree_rss(pid: int) -> int:
        total, todo = 0, [pid]
        while todo:
            p = todo.pop()
            try:
                with open(f"/proc/{p}/status") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
                with open(f"/proc/{p}/task/{p}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except (OSError, StopIteration):
                continue
        return total

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    start = time.perf_counter()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak[0] / 2**20, "output": out}


MINIPT = """
import sys
from minipt.data import prepare_data
prepare_data(model="gpt", data=sys.argv[1], tokenizer=sys.argv[2], cache_dir=sys.argv[3], log=lambda m: None)
"""

DATASETS = """
import sys
from datasets import load_dataset
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
def encode(batch):
    return {"ids": [e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}
ds = load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])
ds.map(encode, batched=True, num_proc=int(sys.argv[4]), remove_columns=ds.column_names)
"""


def one_line(folder: Path, size: int) -> dict:
    """The row of a one-line text of ``size`` bytes: minipt's time and peak memory on it, and the peak on the
    same words as jsonl records; each with a BPE tokenizer trained on it, as ``--data`` alone would."""
    txt, jsonl = write_one_line(folder, size)
    measured = {path.suffix: run_measured([sys.executable, "-c", MINIPT, str(path), "bpe", str(folder / f"cache{i}")],
                                          folder) for i, path in enumerate((txt, jsonl))}
    mb = txt.stat().st_size / 2**20
    return {"name": "one-line text", "provider": "minipt-txt", "corpus_mb": round(mb),
            "wall_s": measured[".txt"]["wall_s"], "mb_per_s": mb / measured[".txt"]["wall_s"],
            "peak_rss_mb": measured[".txt"]["peak_rss_mb"], "jsonl_peak_rss_mb": measured[".jsonl"]["peak_rss_mb"]}


def run(device: str, quick: bool) -> list[dict]:
    if device != "cpu":
        raise SystemExit("the data preparation benchmark runs on the CPU")
    from minipt.tokenizer import train_tokenizer

    sizes = (2 * 2**20,) if quick else (2**28, 2**29, 2**30)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minipt-data-bench-") as tmp:
        tmp = Path(tmp)
        corpora, txt = write_corpus(tmp / "corpus", sizes)
        tok_path = tmp / "tokenizer.json"  # one tokenizer for every size and provider
        with open(corpora[0]) as f:
            sample = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
        train_tokenizer("bpe", sample, 8192, "gpt").save(str(tok_path))
        for size, jsonl in zip(sizes, corpora):
            nbytes = jsonl.stat().st_size
            results = {}
            providers = [("minipt-jsonl", MINIPT, jsonl), ("datasets.map", DATASETS, jsonl)]
            if size == sizes[0]:  # many small files cost file opens, not tokenization: one size shows it
                providers.insert(1, ("minipt-txt", MINIPT, txt))
            for provider, script, data in providers:
                cache = tmp / f"cache-{provider}-{size}"
                m = run_measured([sys.executable, "-c", script, str(data), str(tok_path), str(cache), str(CORES)],
                                 tmp)
                results[provider] = m
                rows.append({"name": "tokenize", "provider": provider, "corpus_mb": round(nbytes / 2**20),
                             "wall_s": m["wall_s"], "mb_per_s": nbytes / 2**20 / m["wall_s"],
                             "peak_rss_mb": m["peak_rss_mb"]})
                shutil.rmtree(cache, ignore_errors=True)
            base = results["datasets.map"]["wall_s"]
            for r in rows[-len(providers):]:
                r["ratio"] = base / r["wall_s"]
        rows.append(one_line(tmp / "one-line", 2 * 2**20 if quick else 50 * 2**20))
        first = run_measured([sys.executable, "-m", "minipt.train", f"--data={jsonl}", f"--cache_dir={tmp / 'tc'}",
                              f"--out_dir={tmp / 'run'}", "--max_iters=1", "--eval_iters=1", "--eval_interval=1",
                              "--sample_tokens=0", "--progress=false"], tmp)
        rows.append({"name": "first step", "provider": "minipt.train", "corpus_mb": round(nbytes / 2**20),
                     "first_step_s": first["wall_s"], "peak_rss_mb": first["peak_rss_mb"]})
    return rows


if __name__ == "__main__":
    cli("data_prep", run)
