"""Rows on the wire: the per-token tensors one exchange moves.

A row is one *bulk* field (the token data ``x``, moved as it is: no packing
copy on either side) plus small *side* fields (FP8 scales, routing metadata)
packed side by side into one ``uint8`` row, so they cost one extra message
per peer instead of one per tensor. Byte counts are exact either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Field", "RowFormat"]


@dataclass(frozen=True)
class Field:
    """One tensor of a row: ``width`` elements of ``dtype``; payload or metadata."""

    name: str
    dtype: torch.dtype
    width: int
    payload: bool = False

    @property
    def nbytes(self) -> int:
        return self.width * self.dtype.itemsize


class RowFormat:
    """The fields of a row; the first is the bulk field, the rest are packed side fields."""

    def __init__(self, fields: list[Field]) -> None:
        if not fields:
            raise ValueError("a row format needs at least one field")
        self.fields = fields
        self.bulk = fields[0]
        self.side = fields[1:]
        self.side_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for f in self.side:
            self.side_offsets[f.name] = (offset, offset + f.nbytes)
            offset += f.nbytes
        self.side_bytes = offset
        self.row_bytes = self.bulk.nbytes + self.side_bytes
        self.payload_bytes = sum(f.nbytes for f in fields if f.payload)
        self.meta_bytes = self.row_bytes - self.payload_bytes

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    def with_field(self, field: Field) -> "RowFormat":
        return RowFormat(self.fields + [field])

    def without(self, name: str) -> "RowFormat":
        return RowFormat([f for f in self.fields if f.name != name])

    def pack_side(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The side fields of ``[N, width]`` tensors as ``uint8 [N, side_bytes]`` (None if there are none)."""
        if not self.side:
            return None
        parts = [tensors[f.name].reshape(-1, f.width).contiguous().view(torch.uint8) for f in self.side]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def unpack_side(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[N, width]`` tensors of every side field from packed ``buf``."""
        out = {}
        for f in self.side:
            lo, hi = self.side_offsets[f.name]
            # a fresh tensor: a column slice (even an empty one) keeps a storage offset
            # that need not be aligned for f.dtype
            col = torch.empty((buf.size(0), hi - lo), dtype=torch.uint8, device=buf.device)
            out[f.name] = col.copy_(buf[:, lo:hi]).view(f.dtype)
        return out
