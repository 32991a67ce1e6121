"""The KV cache of a decode batch: rows of different lengths, left-padded to one length.

A request is prefilled alone into its own `DynamicCache` (one row) and then merged here. Every
layer holds keys/values [B, H, T, D]; a row shorter than T has zeros on the left, and the
attention mask [B, T] (1 = a real token) keeps attention off them. Positions are per row, so
padding never shifts a row's rotary positions. Rows leave by index; columns that have become
padding for every remaining row are trimmed, so a long request that left stops costing.

Imports torch at module level: only the batching scheduler imports this, in its thread.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def batchable(cache: Any) -> bool:
    """Whether rows of `cache` can be padded and stacked: every layer a plain (full) DynamicLayer.

    Sliding-window layers keep a rolling window whose offsets differ per row; those models decode
    one request at a time.
    """
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """x: [B, H, T, D] -> [B, H, n + T, D] with zeros in front."""
    if n == 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3]), x], dim=2)


class BatchCache:
    """A `DynamicCache` over B rows plus its padding mask. Empty until the first `add`."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T] int64, 1 = real token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, cache: Any, length: int) -> None:
        """Append a prefilled one-row cache of `length` tokens as the last row."""
        row_mask = torch.ones(1, length, dtype=torch.long, device=_device(cache))  # [1, L]
        if self.cache is None:
            self.cache, self.mask = cache, row_mask
            return
        assert self.mask is not None  # set together with the cache
        width = max(self.length, length)
        pad_batch, pad_row = width - self.length, width - length
        for batch_layer, row_layer in zip(self.cache.layers, cache.layers):
            batch_layer.keys = torch.cat(
                [_pad_left(batch_layer.keys, pad_batch), _pad_left(row_layer.keys, pad_row)]
            )
            batch_layer.values = torch.cat(
                [_pad_left(batch_layer.values, pad_batch), _pad_left(row_layer.values, pad_row)]
            )
        self.mask = torch.cat(
            [_pad_mask(self.mask, pad_batch), _pad_mask(row_mask, pad_row)]
        )  # [B + 1, width]

    def step_mask(self) -> torch.Tensor:
        """The mask for one decode step (one new real token per row): [B, T + 1]."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows at `indices` (in that order); then trim all-padding columns."""
        if not indices:
            self.cache = self.mask = None
            return
        if list(indices) == list(range(self.rows)):
            return
        assert self.mask is not None
        index = torch.tensor(list(indices), dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        # Columns where no remaining row has a real token are padding for everyone: drop them.
        first = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]


def _pad_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """mask: [B, T] -> [B, n + T] with zeros in front."""
    return mask if n == 0 else torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)


def _device(cache: Any) -> torch.device:
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            return layer.keys.device
    return torch.device("cpu")
