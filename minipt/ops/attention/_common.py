"""What attention's modules share and none of them owns: the op's name in its errors,
the document spans that both backends' kernels read instead of document ids, and the
window bounds that the public function and the tile mirror both resolve."""

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


def window_bounds(window_size, is_causal: bool, T: int) -> tuple[int, int]:
    """The (left, right) bounds the kernels apply, -1 for a side they leave unbounded.

    A side of T - 1 or more reaches every key, and with ``is_causal`` the diagonal
    j <= i is at least as tight as any right bound (which is >= 0), so both become
    -1: a window that hides nothing the other masks do not costs nothing, and
    (-1, -1) is no window at all. ``window_size`` is checked already.
    """
    if window_size is None:
        return -1, -1
    left, right = (int(x) for x in window_size)
    left = -1 if left >= T - 1 else left
    right = -1 if right >= T - 1 or is_causal else right
    return left, right
