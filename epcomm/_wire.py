"""Rows on the wire: several per-token tensors packed side by side as bytes.

A collective moves one ``uint8 [num_rows, row_bytes]`` tensor per exchange,
so a token's data, FP8 scales and routing metadata travel together (one
message per peer instead of one per tensor) and byte counts are exact.
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
    """Byte layout of a row: the fields in order, payload fields first."""

    def __init__(self, fields: list[Field]) -> None:
        self.fields = fields
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for f in fields:
            self.offsets[f.name] = (offset, offset + f.nbytes)
            offset += f.nbytes
        self.row_bytes = offset
        self.payload_bytes = sum(f.nbytes for f in fields if f.payload)
        self.meta_bytes = self.row_bytes - self.payload_bytes

    def pack(self, tensors: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pack ``[N, width]`` tensors (optionally only ``rows`` of them) into ``uint8 [N, row_bytes]``."""
        parts = []
        for f in self.fields:
            t = tensors[f.name]
            if rows is not None:
                t = t.index_select(0, rows)
            parts.append(t.reshape(t.size(0), f.width).contiguous().view(torch.uint8))
        if not parts:
            raise ValueError("a row format needs at least one field")
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def unpack(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        """The ``[N, width]`` tensor of field ``name`` from packed rows ``buf``."""
        lo, hi = self.offsets[name]
        f = next(f for f in self.fields if f.name == name)
        # a fresh tensor: a column slice (even an empty one) keeps a storage offset
        # that need not be aligned for f.dtype
        out = torch.empty((buf.size(0), hi - lo), dtype=torch.uint8, device=buf.device)
        return out.copy_(buf[:, lo:hi]).view(f.dtype)

    def has(self, name: str) -> bool:
        return name in self.offsets
