"""Key/value storage of the decoder: one request's cache (`KVCache`, grown by doubling) and a decoding batch's
ragged cache (`RaggedKVCache`, rows of different lengths, allocated once, joined and compacted in place)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Devices = torch.device | str | Sequence[torch.device]  # one device, or one per layer (a model split in stages)


def per_layer(device: Devices, num_layers: int) -> list[torch.device]:
    """One device per layer: a split model's caches keep each layer's K/V on that layer's device."""
    if isinstance(device, (torch.device, str)):
        return [torch.device(device)] * num_layers
    if len(device) != num_layers:
        raise ValueError(f"{len(device)} devices for {num_layers} layers")
    return list(device)


@dataclass
class LayerKV:
    """The text keys/values of one layer for a batch: [B, Hkv, capacity, D], first `length` valid."""

    k: torch.Tensor
    v: torch.Tensor


class KVCache:
    """Pre-allocated per-layer key/value storage for one batch of sequences (all the same length)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: Devices) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.layers = [LayerKV(torch.empty(shape, dtype=dtype, device=d), torch.empty(shape, dtype=dtype, device=d))
                       for d in per_layer(device, num_layers)]
        self.length = 0
        self.capacity = capacity

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] after the current length; return all valid keys/values."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        entry = self.layers[layer]
        entry.k[:, :, start:end] = k
        entry.v[:, :, start:end] = v
        return entry.k[:, :, :end], entry.v[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def load_row(self, ragged: RaggedKVCache, row: int) -> None:
        """This (one-sequence) cache takes the keys/values of `row` of a decoding batch's ragged cache."""
        n = ragged.host_lengths[row]
        if n > self.capacity:
            self._grow(n)
        for entry, source in zip(self.layers, ragged.layers):
            entry.k[0, :, :n] = source.k[row, :, :n]
            entry.v[0, :, :n] = source.v[row, :, :n]
        self.length = n

    def _grow(self, capacity: int) -> None:
        for entry in self.layers:
            for name in ("k", "v"):
                old = getattr(entry, name)
                new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(entry, name, new)
        self.capacity = capacity


class RaggedKVCache:
    """Key/value storage for a decoding batch whose sequences have different lengths, allocated once.

    Storage is [rows, Hkv, capacity, D] per layer for up to `rows` requests; the batch's B requests are
    its first B rows, row b holding `lengths[b]` valid entries. `append` writes one new token per row at
    its own length, in place, and `valid_mask()` hides the padding from attention. Requests join into the
    next free rows and leaving rows are compacted in place, so the storage is reallocated only when the
    batch outgrows it (capacity doubles). The lengths are mirrored on the host: no step reads them back
    from the device (on a GPU every such read is a synchronisation). A split model's layers keep their rows on
    their own devices, each of which gets a copy of `lengths` once per change of the batch's rows.
    """

    def __init__(self, layers: list[LayerKV], lengths: list[int], device: torch.device | str) -> None:
        self.layers = layers  # [rows, Hkv, capacity, D] each; only the first len(host_lengths) rows in use
        self.host_lengths = list(lengths)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=device)  # [B] on the device
        self._copies: dict[torch.device, torch.Tensor] = {}  # `lengths` on the other layers' devices

    def lengths_on(self, device: torch.device) -> torch.Tensor:
        """`lengths` on `device` (copied once per change of rows, then advanced there in place)."""
        if device == self.lengths.device:
            return self.lengths
        if device not in self._copies:
            self._copies[device] = self.lengths.to(device)
        return self._copies[device]

    @classmethod
    def from_caches(cls, caches: list[KVCache], rows: int | None = None, extra: int = 64) -> RaggedKVCache:
        """A batch of these prefilled requests, with room for `rows` requests (default: just these)."""
        ref = caches[0].layers[0].k
        cache = cls.allocate(len(caches[0].layers), max(rows or 0, len(caches)), ref.shape[1],
                             max(c.length for c in caches) + extra, ref.shape[3], ref.dtype,
                             [entry.k.device for entry in caches[0].layers])
        cache.add(caches)
        return cache

    @classmethod
    def allocate(cls, num_layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: Devices) -> RaggedKVCache:
        """Empty storage (`device`: one, or one per layer). Zeros, not `empty`: padding is masked, but a NaN
        there would still reach the output through 0 * NaN in the attention's weighted sum."""
        shape = (rows, kv_heads, capacity, head_dim)
        devices = per_layer(device, num_layers)
        return cls([LayerKV(torch.zeros(shape, dtype=dtype, device=d), torch.zeros(shape, dtype=dtype, device=d))
                    for d in devices], [], devices[0])

    @property
    def batch_size(self) -> int:
        return len(self.host_lengths)

    @property
    def rows(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]

    def add(self, caches: list[KVCache]) -> None:
        """Prefilled requests join the batch: their keys/values are copied into the next free rows."""
        start, end = self.batch_size, self.batch_size + len(caches)
        longest = max([c.length for c in caches] + self.host_lengths)
        self._reserve(end, longest + 1)
        for i, entry in enumerate(self.layers):
            for b, c in enumerate(caches, start):
                entry.k[b, :, : c.length] = c.layers[i].k[0, :, : c.length]
                entry.v[b, :, : c.length] = c.layers[i].v[0, :, : c.length]
        self.host_lengths += [c.length for c in caches]
        self.lengths = torch.cat([self.lengths, torch.tensor([c.length for c in caches], dtype=torch.long,
                                                             device=self.lengths.device)])
        self._copies.clear()

    def keep(self, rows: list[int]) -> None:
        """Only these rows (ascending) stay: each moves down into the first free row, in place."""
        for i, r in enumerate(rows):
            if r != i:
                n = self.host_lengths[r]
                for entry in self.layers:
                    entry.k[i, :, :n] = entry.k[r, :, :n]
                    entry.v[i, :, :n] = entry.v[r, :, :n]
        self.host_lengths = [self.host_lengths[r] for r in rows]
        self.lengths = self.lengths[torch.tensor(rows, dtype=torch.long, device=self.lengths.device)]
        self._copies.clear()

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new token per row (k/v [B, Hkv, 1, D]) at each row's length; all keys/values up to the
        longest row (the padding is hidden by `valid_mask`)."""
        end = self.end
        if end > self.capacity:
            self._reserve(self.batch_size, end)
        entry, b = self.layers[layer], k.shape[0]
        rows, lengths = torch.arange(b, device=k.device), self.lengths_on(k.device)
        entry.k[rows, :, lengths] = k[:, :, 0]
        entry.v[rows, :, lengths] = v[:, :, 0]
        return entry.k[:b, :, :end], entry.v[:b, :, :end]

    @property
    def end(self) -> int:
        """Keys visible to this step: the longest row plus its new token."""
        return max(self.host_lengths) + 1

    def valid_mask(self) -> torch.Tensor:
        """Bool [B, 1, 1, S] over the keys after this step's append."""
        return (torch.arange(self.end, device=self.lengths.device)[None, :] <= self.lengths[:, None])[:, None, None]

    def advance(self, n: int = 1) -> None:
        self.lengths += n
        for copy in self._copies.values():
            copy += n
        self.host_lengths = [length + n for length in self.host_lengths]

    def _reserve(self, rows: int, capacity: int) -> None:
        """Grow the storage (doubling) to at least `rows` rows of `capacity` keys, keeping the contents."""
        if rows <= self.rows and capacity <= self.capacity:
            return
        new_rows = self.rows if rows <= self.rows else max(rows, 2 * self.rows)
        new_capacity = self.capacity if capacity <= self.capacity else max(capacity, 2 * self.capacity)
        used = self.batch_size
        for entry in self.layers:
            for name in ("k", "v"):
                old = getattr(entry, name)
                new = old.new_zeros((new_rows, old.shape[1], new_capacity, old.shape[3]))
                new[:used, :, : old.shape[2]] = old[:used]
                setattr(entry, name, new)
