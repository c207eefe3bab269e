"""The engine's batch state: the rows decoding together, their masks and positions, and one KV cache.

Rows are left-padded so every row's next token sits in the same (last) column and one forward serves
all of them. Everything here lives on the model's device: the engine builds prompts there once, and a
step adds, drops and left-pads rows without a round trip to the host.
"""

from __future__ import annotations

import functools


def left_pad_rows(rows: list[list[int]], pad_id: int, device):
    """Token id lists as a left-padded [rows, longest] id tensor and its 0/1 mask, built on `device`."""
    import torch

    longest = max(len(r) for r in rows)
    ids = [[pad_id] * (longest - len(r)) + r for r in rows]
    mask = [[0] * (longest - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device)


class DecodeBatch:
    """The rows being decoded together and their KV cache.

    `mask` marks real tokens (1) and padding (0), `positions` is each row's next position id,
    `next_ids` the token each row feeds next. Joining rows are left-padded (or the batch is) to a
    common length; columns that are padding in every row are cut when rows leave.
    """

    def __init__(self):
        self.rows: list = []
        self.cache = None
        self.mask = self.positions = self.next_ids = None

    def add(self, rows: list, cache, mask, next_ids) -> None:
        import torch

        positions = mask.sum(1)
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.next_ids = (
                list(rows),
                cache,
                mask,
                positions,
                next_ids,
            )
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.set(
                torch.cat([_left_pad(old.keys, length, 2), _left_pad(new.keys, length, 2)]),
                torch.cat([_left_pad(old.values, length, 2), _left_pad(new.values, length, 2)]),
            )
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.next_ids = torch.cat([self.next_ids, next_ids])
        self.rows += rows

    def keep(self, keep: list[int]) -> None:
        """Only the rows at `keep` stay; padding columns no row needs any more are cut."""
        import torch

        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__()
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]
        lead = int(torch.argmax(self.mask.any(0).to(torch.int8)))  # first column some row still uses
        for layer in self.cache.layers:
            layer.set(layer.keys[index, :, lead:], layer.values[index, :, lead:])
        self.mask = self.mask[:, lead:]

    def advance(self, next_ids) -> None:
        """After a decode step: every row has one more real token and feeds `next_ids` [rows, 1] next."""
        self.mask = self.decode_mask()
        self.positions = self.positions + 1
        self.next_ids = next_ids

    def decode_mask(self):
        """The attention mask of the next decode step: the batch's mask plus the column being fed."""
        import torch

        return torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)


def new_kv_cache():
    """A KV cache whose layers keep spare room after the last token (see `_roomy_layer`)."""
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=_roomy_layer())


@functools.cache
def _roomy_layer():
    """A DynamicLayer that writes each new token into spare room at the end of its tensors.

    DynamicLayer grows by torch.cat, which copies the whole cache at every step: a third of a decode
    step's time at 32 rows x 250 tokens (SmolLM2, profiled). Here the cache is copied only when the
    room runs out (every 64+ tokens) and when rows join or leave (`set`). Rows and positions are
    plain tensors, so the batch can add, drop and left-pad rows.
    """
    import torch
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def set(self, keys, values) -> None:
            """Install keys/values [rows, heads, tokens, dim] with room for more tokens."""
            b, h, t, d = keys.shape
            room = max(64, t // 4)
            self._keys, self._values = keys.new_empty((b, h, t + room, d)), values.new_empty((b, h, t + room, d))
            self._keys[:, :, :t], self._values[:, :, :t] = keys, values
            self.keys, self.values = self._keys[:, :, :t], self._values[:, :, :t]
            self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.set(key_states, value_states)
                return self.keys, self.values
            t, n = self.keys.shape[2], key_states.shape[2]
            if t + n > self._keys.shape[2]:
                self.set(torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2))
                return self.keys, self.values
            self._keys[:, :, t : t + n], self._values[:, :, t : t + n] = key_states, value_states
            self.keys, self.values = self._keys[:, :, : t + n], self._values[:, :, : t + n]
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized:
                self.set(self.keys[indices], self.values[indices])

    return RoomyLayer


def _left_pad(t, length: int, dim: int):
    """`t` padded with zeros at the start of `dim` to `length` (same device and dtype)."""
    import torch

    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
