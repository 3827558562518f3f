"""minipt on a machine without Triton (macOS, Windows): it imports, the torch and
native backends run, and backend="triton" is refused with a clear error."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # any `import triton` now raises ImportError, as where it is not installed

    import torch
    import minipt.ops as ops
    from minipt.ops import BackendUnavailableError
    from minipt.models import BERT, GPT, BertConfig, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    gpt(x, labels=x).loss.backward()
    bert = BERT(BertConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    masked, labels = ops.mlm_mask(x, mask_token_id=3, vocab_size=64, mlm_probability=0.5, seed=1)
    out = bert(masked, attention_mask=torch.ones_like(x, dtype=torch.bool), labels=labels,
               next_sentence_label=torch.tensor([0, 1]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for call in (
        lambda: ops.cross_entropy(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), backend="triton"),
        lambda: ops.attention(*(torch.randn(1, 2, 8, 16),) * 3, backend="triton"),
        lambda: ops.mlm_mask(x, mask_token_id=3, vocab_size=64, seed=0, backend="triton"),
    ):
        try:
            call()
        except BackendUnavailableError as exc:
            assert "triton cannot be imported" in str(exc), exc
        else:
            raise AssertionError("backend='triton' ran without triton")
    print("ok")
    """
)


def test_minipt_works_without_triton():
    env_free = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert env_free.returncode == 0, env_free.stderr
    assert env_free.stdout.strip() == "ok"
    assert "Triton not available" not in env_free.stderr  # torch's warning when a triton_op has no kernels
