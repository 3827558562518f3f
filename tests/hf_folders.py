"""Small random Hugging Face checkpoints saved as a user's local copy of gpt2 or bert-base-uncased would be.

Each folder is written by ``save_pretrained`` beside a tokenizer trained here with
HF ``tokenizers``: BERT's WordPiece as a bare ``vocab.txt``, GPT-2's byte-level
BPE as ``vocab.json`` + ``merges.txt``. The weights are drawn with a wide
initializer so that the output distributions are sharp: top-k candidates and
greedy tokens then differ by far more than float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

TEXTS = [
    "The cat sits on the mat. The dog lies on the rug.",
    "I like cats. They are cute. The sky is blue and the sea is green.",
    "Good morrow, my lord. How fares your grace this day?",
    "A cat and a dog sat on the warm mat by the door.",
]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SIZES = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)


def save_weights(model, folder: Path, weights: str) -> None:
    """``safetensors`` (save_pretrained's default) or ``bin``: the pickled state dict older checkpoints ship."""
    model.save_pretrained(folder)
    if weights == "bin":
        (folder / "model.safetensors").unlink()
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")


def bert_folder(folder: Path, *, architecture: str = "BertForPreTraining", weights: str = "safetensors",
                seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(TEXTS * 4, vocab_size=150, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.save_model(str(folder))  # vocab.txt
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=tok.get_vocab_size() + 3, hidden_size=SIZES["n_embd"], num_hidden_layers=SIZES["n_layer"],
        num_attention_heads=SIZES["n_head"], intermediate_size=4 * SIZES["n_embd"],
        max_position_embeddings=SIZES["block_size"], initializer_range=0.3, architectures=[architecture],
    )
    model = getattr(transformers, architecture)(config).eval()
    save_weights(model, folder, weights)
    return folder


def gpt2_folder(folder: Path, *, weights: str = "safetensors", seed: int = 0, positions: int | None = None,
                **sizes) -> Path:
    """``sizes`` replace those of SIZES (n_layer, n_head, n_embd, block_size); ``positions`` is block_size."""
    sizes = {**SIZES, **sizes, **({"block_size": positions} if positions else {})}
    folder.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(TEXTS * 4, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save_model(str(folder))  # vocab.json, merges.txt
    torch.manual_seed(seed)
    eot = tok.token_to_id("<|endoftext|>")
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot, n_positions=sizes["block_size"],
        n_embd=sizes["n_embd"],
        n_layer=sizes["n_layer"], n_head=sizes["n_head"], initializer_range=0.3, architectures=["GPT2LMHeadModel"],
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    save_weights(model, folder, weights)
    return folder


def hf_tokenizer(folder: Path):
    """transformers' own reading of the folder's tokenizer: the reference minipt's must match."""
    return transformers.AutoTokenizer.from_pretrained(folder)
