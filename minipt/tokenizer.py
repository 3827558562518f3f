"""Tokenizers for pretraining, all backed by Hugging Face ``tokenizers``.

Three kinds are trained on the training split of the corpus (never on validation
text), plus any ``tokenizer.json`` the user brings:

* ``bpe``: GPT-2's byte-level BPE. Every byte sequence encodes, so there is no
  unknown token, and decoding restores the text exactly.
* ``wordpiece``: BERT's lowercased WordPiece, with the BERT pre-tokenizer
  (whitespace and punctuation splits) and ``##`` continuations.
* ``char``: one token per character seen in training, for a like-for-like
  comparison with character-level baselines (nanoGPT's ``shakespeare_char``).
  It is a BPE model with no merges: the fastest way through ``tokenizers``
  to a character vocabulary (about 5M characters a second here), and decoding
  joins the characters back without spaces.

Special tokens depend on the model: GPT gets ``<|endoftext|>``, placed between
documents; BERT gets ``[PAD] [UNK] [CLS] [SEP] [MASK]``. WordPiece and char
also carry ``[UNK]`` for GPT, since text outside their vocabulary can occur.

A Hugging Face model folder brings its own tokenizer (:func:`load_hf_tokenizer`):
its ``tokenizer.json``, else BERT's ``vocab.txt`` or GPT-2's ``vocab.json`` +
``merges.txt``, rebuilt as ``BertTokenizerFast`` and ``GPT2TokenizerFast`` build them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from minipt.errors import MiniptError

KINDS = ("bpe", "wordpiece", "char")
DEFAULT_VOCAB_SIZE = 8192  # of a trained bpe or wordpiece tokenizer, when no --vocab_size is given
EOT = "<|endoftext|>"
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
BERT_SPECIALS = (PAD, UNK, CLS, SEP, MASK)


class TokenizerError(MiniptError, ValueError):
    """A tokenizer that cannot serve this model (missing special tokens, bad file)."""


def special_tokens(kind: str, model: str) -> list[str]:
    if model == "bert":
        return list(BERT_SPECIALS)
    return [EOT] if kind == "bpe" else [EOT, UNK]


def train_tokenizer(kind: str, texts: list[str], vocab_size: int, model: str) -> Tokenizer:
    """Train a ``kind`` tokenizer for ``model`` ("gpt" or "bert") on ``texts``."""
    if kind not in KINDS:
        raise TokenizerError(f"tokenizer must be one of {KINDS} or a path to a tokenizer.json, got {kind!r}")
    specials = special_tokens(kind, model)
    if kind == "char":
        chars = sorted(set().union(*map(set, texts)))
        # unk covers characters that occur only in validation text (or in a prompt)
        return char_tokenizer({tok: i for i, tok in enumerate(specials + chars)}, specials)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def char_tokenizer(vocab: dict[str, int], specials: list[str] = ()) -> Tokenizer:
    """One token per character, with the ids ``vocab`` gives: BPE without merges is a character vocabulary.

    ``[UNK]``, when among ``specials``, stands for a character outside the vocabulary; without it such a
    character has no id (see :meth:`TextTokenizer.unknown_characters`), as in nanoGPT's ``stoi``."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK if UNK in specials else None))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(specials))
    return tok


GPT2_VOCAB_SIZE, GPT2_EOT_ID = 50257, 50256  # GPT-2's BPE, which llm.c's and nanoGPT's GPT-2 token files hold


def id_tokenizer(vocab_size: int) -> Tokenizer:
    """A stand-in for token files that come without their tokenizer: id i reads as ``<i>``.

    GPT-2's vocabulary size says the ids are GPT-2's BPE, whose last id is
    ``<|endoftext|>``: it is named so, and a run on such files can start a sample
    at a document's start as a run on text does."""
    vocab = {f"<{i}>": i for i in range(vocab_size)}
    if vocab_size == GPT2_VOCAB_SIZE:
        del vocab[f"<{GPT2_EOT_ID}>"]
        vocab[EOT] = GPT2_EOT_ID
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.decoder = decoders.Fuse()
    return tok


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids of the special tokens minipt uses."""

    tokenizer: Tokenizer
    eot_id: int | None  # GPT's document separator, when the vocabulary has one
    pad_id: int | None
    cls_id: int | None
    sep_id: int | None
    mask_id: int | None

    @classmethod
    def wrap(cls, tokenizer: Tokenizer, model: str, source: str = "tokenizer") -> "TextTokenizer":
        ids = {name: tokenizer.token_to_id(name) for name in (EOT, *BERT_SPECIALS)}
        if model == "bert":
            missing = [name for name in (PAD, CLS, SEP, MASK) if ids[name] is None]
            if missing:
                raise TokenizerError(
                    f"{source} lacks the special tokens BERT needs: {' '.join(missing)} "
                    f"(expected {' '.join(BERT_SPECIALS)})"
                )
        return cls(tokenizer, ids[EOT], ids[PAD], ids[CLS], ids[SEP], ids[MASK])

    @classmethod
    def from_file(cls, path: str | Path, model: str) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc}") from exc
        return cls.wrap(tok, model, source=str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which
        # nothing here reads: the same ids, 1.4x faster and lighter on memory.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def unknown_characters(self, text: str) -> list[str]:
        """The characters of ``text`` that encode to nothing: a vocabulary without [UNK] drops them silently.

        Whitespace that a pre-tokenizer splits words on is left out: no token is meant to hold it."""
        splits = self.tokenizer.pre_tokenizer is not None
        chars = sorted({c for c in text if not (splits and c.isspace())})
        return [c for c, ids in zip(chars, self.encode_batch(chars)) if not ids]

    def decode(self, ids) -> str:
        # Ids past the tokenizer's vocabulary exist only as padding rows of the
        # model's embedding (rounded up for speed); they carry no text.
        return self.tokenizer.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        return self.tokenizer.id_to_token(i) or f"<{i}>"

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")



def load_hf_tokenizer(folder: str | Path, model: str) -> TextTokenizer:
    """The tokenizer saved beside a Hugging Face model: tokenizer.json, vocab.txt or vocab.json + merges.txt."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return TextTokenizer.from_file(folder / "tokenizer.json", model)
    try:
        if (folder / "vocab.txt").is_file():
            settings = folder / "tokenizer_config.json"
            # bert-base-uncased and its kind lowercase; a cased model says do_lower_case=false here
            lowercase = json.loads(settings.read_text(encoding="utf-8")).get("do_lower_case", True) if (
                settings.is_file()) else True
            tok = Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token=UNK))
            tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tok.decoder = decoders.WordPiece()
            tok.add_special_tokens([t for t in BERT_SPECIALS if tok.token_to_id(t) is not None])
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            if tok.token_to_id(EOT) is not None:  # whole in a text, as GPT2TokenizerFast treats it
                tok.add_special_tokens([EOT])
        else:
            raise TokenizerError(
                f"{folder} holds no tokenizer: expected tokenizer.json, vocab.txt (BERT) or vocab.json and "
                "merges.txt (GPT-2)"
            )
    except TokenizerError:
        raise
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed vocabulary, json a ValueError
        raise TokenizerError(f"cannot read the tokenizer in {folder}: {exc}") from None
    return TextTokenizer.wrap(tok, model, source=str(folder))
