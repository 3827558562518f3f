"""What attention's modules share and none of them owns: the op's name in its errors,
and the document spans that both backends' kernels read instead of document ids."""

from __future__ import annotations

import torch

OP = "attention"


def document_spans(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 2, T) int32: for each position, the first position of its document and the one past its last.

    Ids never decrease along a row, so a binary search finds both ends. The kernels
    read these spans instead of the ids: one compare per score, whatever the id dtype.
    """
    ids = document_ids.contiguous()
    start = torch.searchsorted(ids, ids, side="left", out_int32=True)
    end = torch.searchsorted(ids, ids, side="right", out_int32=True)
    return torch.stack((start, end), 1)
