"""minipt's ops. Each takes ``backend="auto" | "torch" | "triton" | "native"``.

One op, one file: ``cross_entropy.py``, ``linear_cross_entropy.py`` and
``mlm_mask.py`` each hold, in this order, a header on the algorithm and its
memory traffic, the PyTorch reference, the Triton kernels, their launchers, the
autograd, the native (pybind11) wrapper and the public function. ``attention``
outgrew one file and is a folder of that name, ``attention/``: its ``__init__``
holds the header, the reference and the public function, ``triton.py`` and
``native.py`` its two kernel backends. The private modules beside them hold
plumbing that several ops share and import no op:
``_backend`` (which backend runs a call), ``_checks`` (argument checks),
``_loss`` (``IGNORE_INDEX``, loss reduction, ``softcap_logits``, which the
models apply to the logits they hand out), ``_native`` (the call into
``minipt._C``) and ``_triton`` (Triton, or stand-ins where it is not installed).

How kernels meet torch, the same way in every op:

* every kernel launch is a ``torch.library`` operator, so ``torch.compile`` keeps
  it whole instead of breaking the graph. Native kernels are ``custom_op``\\ s with
  a ``register_fake`` that only describes the outputs. Triton launchers are
  ``triton_op``\\ s that launch through ``torch.library.wrap_triton``, so the
  compiler can see into them, except cross-entropy's and the linear
  cross-entropy chunk loop's: those are ``custom_op``\\ s too, because the
  compiler traces a ``triton_op``'s launcher with fake tensors, which the
  interpreter's kernels cannot take, and their ``torch.compile`` tests must run
  on machines without a GPU (see cross_entropy.py);
* a differentiable op attaches its backward with ``register_autograd``;
* names are ``minipt::<backend>_<op>_fwd`` and ``_bwd``, or
  ``minipt::<backend>_<op>`` for an op without a backward.
"""

import torch

from minipt.ops._backend import BackendUnavailableError, resolve_backend
from minipt.ops._loss import IGNORE_INDEX, softcap_logits
from minipt.ops.attention import attention, attention_ref
from minipt.ops.cross_entropy import cross_entropy, cross_entropy_ref
from minipt.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from minipt.ops.mlm_mask import masked_capacity, masked_positions, mlm_mask, mlm_mask_ref

OPS = ("attention", "mlm_mask", "cross_entropy", "linear_cross_entropy")


def resolve_backends(backend: str, device: torch.device | str) -> dict[str, str]:
    """The backend each op runs on ``device`` when asked for ``backend`` (``MINIPT_BACKEND`` applied).

    A run calls this before any work, so that a backend which cannot serve one
    of its ops is refused at once, by a BackendUnavailableError that names the
    op, the backend and why, rather than after its data is tokenized.
    """
    return {op: resolve_backend(backend, torch.device(device), op) for op in OPS}


__all__ = [
    "IGNORE_INDEX",
    "OPS",
    "BackendUnavailableError",
    "resolve_backends",
    "attention",
    "attention_ref",
    "cross_entropy",
    "cross_entropy_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "masked_capacity",
    "masked_positions",
    "mlm_mask",
    "mlm_mask_ref",
    "softcap_logits",
]
