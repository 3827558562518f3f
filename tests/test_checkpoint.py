"""checkpoint.load_weights names what does not fit, and lets errors that are not about the file pass."""

import pytest
import torch

from minipt import checkpoint as ckpt
from minipt.errors import MiniptError


def saved(tmp_path, model) -> None:
    ckpt.save_checkpoint(tmp_path, model, {"iter": 3})


def test_weights_round_trip_with_their_iteration(tmp_path):
    model = torch.nn.Linear(4, 3)
    saved(tmp_path, model)
    fresh = torch.nn.Linear(4, 3)
    assert ckpt.load_weights(tmp_path, fresh) == 3
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"not a safetensors file at all"), "is corrupt: not a readable safetensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-8]), "is corrupt: not a readable safetensors file"),
])
def test_a_file_that_is_not_safetensors_is_named(tmp_path, damage, message):
    saved(tmp_path, torch.nn.Linear(4, 3))
    damage(tmp_path / ckpt.MODEL)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_weights(tmp_path, torch.nn.Linear(4, 3))


def test_a_tensor_of_another_shape_is_named_with_both_shapes(tmp_path):
    saved(tmp_path, torch.nn.Linear(4, 3))
    with pytest.raises(ckpt.CheckpointError, match=r"weight is \[3, 4\], the model's \[5, 4\]"):
        ckpt.load_weights(tmp_path, torch.nn.Linear(4, 5))


def test_missing_and_extra_tensors_are_named(tmp_path):
    saved(tmp_path, torch.nn.Linear(4, 3, bias=False))
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['bias'\]"):
        ckpt.load_weights(tmp_path, torch.nn.Linear(4, 3))
    saved(tmp_path, torch.nn.Linear(4, 3))
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected \['bias'\]"):
        ckpt.load_weights(tmp_path, torch.nn.Linear(4, 3, bias=False))


def test_out_of_memory_is_not_called_a_bad_checkpoint(tmp_path, monkeypatch):
    saved(tmp_path, torch.nn.Linear(4, 3))

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ckpt, "load_model", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        ckpt.load_weights(tmp_path, torch.nn.Linear(4, 3))


def test_minipts_errors_share_one_base_class():
    from minipt.config import ConfigError
    from minipt.data import DataError
    from minipt.errors import TrainingError
    from minipt.hf import MissingDependency
    from minipt.ops import BackendUnavailableError
    from minipt.tokenizer import TokenizerError

    for error in (ConfigError, DataError, TokenizerError, ckpt.CheckpointError, TrainingError, MissingDependency,
                  BackendUnavailableError):
        assert issubclass(error, MiniptError), error
