"""python -m minipt.export writes a folder that transformers loads, tokenizer included, for GPT and BERT runs."""

import pytest
import torch

from minipt import export as X
from minipt import train as T
from minipt.load import load_run

from hf_folders import transformers
from test_train import tiny_args


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_an_exported_run_loads_in_transformers_with_its_tokenizer(tmp_path, capsys, kind):
    extra = dict(model="bert", tokenizer="wordpiece", vocab_size=200, block_size=48) if kind == "bert" else dict(
        block_size=48)
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2, sample_tokens=0, **extra)) == 0
    folder = tmp_path / "hf"
    assert X.main([f"--out_dir={tmp_path / 'run'}", f"--to={folder}"]) == 0
    ours, tok, _ = load_run(tmp_path / "run")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Shall I compare thee to a summer's day?"
    batch = hf_tok(text, return_tensors="pt")
    expected_ids = tok.encode(text) if kind == "gpt" else [tok.cls_id, *tok.encode(text), tok.sep_id]
    assert batch["input_ids"][0].tolist() == expected_ids
    cls = transformers.AutoModelForCausalLM if kind == "gpt" else transformers.BertForPreTraining
    theirs = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        mine = ours(batch["input_ids"], return_logits=True).logits if kind == "gpt" else ours(
            batch["input_ids"], token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"],
            return_logits=True).logits
        logits = theirs(**batch).logits if kind == "gpt" else theirs(**batch).prediction_logits
    torch.testing.assert_close(mine[..., :logits.shape[-1]], logits, rtol=0, atol=1e-4)
    assert f"written to {folder}" in capsys.readouterr().out


def test_export_refuses_to_write_over_a_folder_and_names_a_missing_run(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert X.main([f"--out_dir={tmp_path / 'missing'}", f"--to={tmp_path / 'new'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert X.main(["--out_dir=.", f"--to={tmp_path / 'taken'}"]) == 2
    assert X.main(["--out_dir=out"]) == 2
    assert "--to is required" in capsys.readouterr().err


def test_a_softcapped_run_is_refused_by_name_and_nothing_is_written(tmp_path, capsys):
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2, sample_tokens=0, logit_softcap=30)) == 0
    assert X.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"]) == 2
    assert "caps its LM logits (logit_softcap=30.0)" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
