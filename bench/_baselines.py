"""Baselines measured in the same run as epcomm, on the same data.

* :class:`BareAllToAll` -- the transport ceiling: bare ``dist.all_to_all_single``
  calls moving the same rows (same split sizes) as epcomm, from a pre-filled
  buffer, with no packing, no index work and no count exchange.
* :class:`BareCountExchange` -- the count-exchange ceiling: one bare ``all_gather`` of as many int64
  words as epcomm's agreement header (what a dispatch must learn before rows can move).
* :class:`PerExpertDispatcher` -- the dispatcher most MoE code writes by hand
  (Megatron-LM's alltoall dispatcher has this shape): a token is sent once per
  selected *expert*. Dispatch = permute rows by expert, exchange per-expert
  counts (all_to_all + host sync for the split sizes), all_to_all_single the
  rows, regroup the received chunks by local expert. Combine = undo the
  regrouping, all_to_all_single back, unpermute (fp32 scatter-add per token,
  cast once; like epcomm's combine it is a plain sum, the caller weights).
  Byte counts are recorded per link class the way epcomm records its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from epcomm.topology import LinkClass, Topology

# what epcomm's agreement calls (epcomm/_comm.py): torch 2.14 renamed all_gather_into_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _classify(topo: Topology, counts: list[int], row_bytes: int, into: dict) -> None:
    for peer, rows in enumerate(counts):
        if rows:
            link = topo.link_to(peer).value
            into[link]["rows"] += rows
            into[link]["payload_bytes"] += rows * row_bytes


def empty_record() -> dict:
    return {link.value: {"rows": 0, "payload_bytes": 0} for link in LinkClass}


class BareAllToAll:
    """A sequence of bare all_to_all_single steps ``(send_counts, recv_counts, row_bytes)``.

    :meth:`run` reads every step's send rows from one pre-filled ``scratch``
    buffer (prepared outside the timed region; the content does not matter to
    the transport, but it is real data, not untouched pages). Each step receives
    into a fresh tensor, as a hand-written exchange does and as epcomm's results
    are (they belong to the caller); with ``reuse_output`` into one buffer kept
    across calls instead (warm pages: the transport alone, without the page
    faults of a new output).
    """

    def __init__(self, topo: Topology, steps: list[tuple[list[int], list[int], int]], reuse_output: bool = False):
        self.topo = topo
        self.steps = steps
        self.scratch_bytes = max(sum(s) * rb for s, _, rb in steps)
        self.recv_bytes = max(sum(r) * rb for _, r, rb in steps)
        self.reuse_output = reuse_output
        self.recv: torch.Tensor | None = None
        self.record = empty_record()
        for send, _, rb in steps:
            _classify(topo, send, rb, self.record)

    def run(self, scratch: torch.Tensor) -> None:
        if self.reuse_output and (self.recv is None or self.recv.device != scratch.device):
            self.recv = torch.empty(max(self.recv_bytes, 1), dtype=torch.uint8, device=scratch.device)
        for send_counts, recv_counts, rb in self.steps:
            send = scratch[: sum(send_counts) * rb].view(-1, rb)
            if self.reuse_output:
                out = self.recv[: sum(recv_counts) * rb].view(-1, rb)
            else:
                out = torch.empty((sum(recv_counts), rb), dtype=torch.uint8, device=send.device)
            dist.all_to_all_single(out, send, output_split_sizes=recv_counts, input_split_sizes=send_counts)


class BareCountExchange:
    """One bare ``all_gather_into_tensor`` of ``words`` int64 per rank (plus the host read a count exchange
    needs: the gathered counts as Python ints)."""

    def __init__(self, words: int, device: torch.device) -> None:
        self.send = torch.arange(words, dtype=torch.int64, device=device)
        self.out = torch.empty(dist.get_world_size() * words, dtype=torch.int64, device=device)

    def run(self) -> list[int]:
        _all_gather_single(self.out, self.send)
        return self.out.tolist()


_CHUNK_ROWS = 2048  # rows converted to fp32 at once in combine


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


class PerExpertDispatcher:
    """Send each token once per selected expert (permute / all_to_all / unpermute)."""

    def __init__(self, topo: Topology, num_experts: int) -> None:
        self.topo = topo
        self.num_experts = num_experts
        self.experts_per_rank = num_experts // topo.world_size
        self.record = {"dispatch": empty_record(), "combine": empty_record()}

    def dispatch(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], topk_idx: torch.Tensor):
        """Returns ``(rows grouped by local expert, state for combine)``.

        ``x``: bf16 ``[N, H]`` or an FP8 tuple (data and scales travel packed in one uint8 row).
        """
        world, epr = self.topo.world_size, self.experts_per_rank
        num_topk = topk_idx.size(1)
        flat = topk_idx.reshape(-1)
        key = torch.where(flat >= 0, flat, torch.full_like(flat, self.num_experts))
        order = torch.argsort(key, stable=True)  # (token, k) entries grouped by expert, hence by rank
        per_expert = torch.bincount(key, minlength=self.num_experts + 1)[: self.num_experts]
        order = order[: int(per_expert.sum())]  # drop -1 entries (sorted last)
        token_of = torch.div(order, num_topk, rounding_mode="floor")
        # permute: one row per (token, expert)
        if isinstance(x, tuple):
            data, scales = x
            permuted = torch.cat([data.index_select(0, token_of).view(torch.uint8),
                                  scales.index_select(0, token_of).view(torch.uint8)], dim=1)
        else:
            permuted = x.index_select(0, token_of)
        # exchange per-expert counts; split sizes need a host sync
        recv_per_expert = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_per_expert, per_expert)
        send_splits = per_expert.view(world, epr).sum(1).tolist()
        recv_chunks = recv_per_expert.view(world, epr)  # [source rank, local expert]
        recv_splits = recv_chunks.sum(1).tolist()
        recv = permuted.new_empty((sum(recv_splits), permuted.size(1)))
        dist.all_to_all_single(recv, permuted, output_split_sizes=recv_splits, input_split_sizes=send_splits)
        row_bytes = permuted.size(1) * permuted.element_size()
        del permuted  # sent: free it before the regrouped copy (peak: two row buffers, not three)
        _classify(self.topo, send_splits, row_bytes, self.record["dispatch"])
        # regroup (source, expert) chunks into (expert, source) order for a grouped GEMM
        regroup = None
        if epr > 1:
            sizes = recv_chunks.flatten()
            starts = _exclusive_cumsum(sizes).view(world, epr).t().flatten()
            lens = recv_chunks.t().flatten()
            within = torch.arange(int(lens.sum()), device=lens.device) - _exclusive_cumsum(lens).repeat_interleave(lens)
            regroup = starts.repeat_interleave(lens) + within
            recv = recv.index_select(0, regroup)
        return recv, (token_of, send_splits, recv_splits, regroup, x[0].size(0) if isinstance(x, tuple) else x.size(0))

    def combine(self, y: torch.Tensor, state) -> torch.Tensor:
        """``y``: bf16 rows in dispatch's output order; returns ``[N, H]`` per-token sums."""
        token_of, send_splits, recv_splits, regroup, num_tokens = state
        unsorted = None
        if regroup is not None:  # back to (source, expert) order
            unsorted = torch.empty_like(y)
            unsorted[regroup] = y
            y = unsorted
        back = y.new_empty((sum(send_splits), y.size(1)))
        dist.all_to_all_single(back, y, output_split_sizes=send_splits, input_split_sizes=recv_splits)
        _classify(self.topo, recv_splits, y.size(1) * y.element_size(), self.record["combine"])
        del y, unsorted  # sent
        out = torch.zeros((num_tokens, back.size(1)), dtype=torch.float32, device=back.device)
        # fp32 a chunk of rows at a time: no float32 copy of every received row (as epcomm's combine)
        for lo in range(0, back.size(0), _CHUNK_ROWS):
            out.index_add_(0, token_of[lo : lo + _CHUNK_ROWS], back[lo : lo + _CHUNK_ROWS].float())
        return out.to(back.dtype)

    def reset_record(self) -> None:
        self.record = {"dispatch": empty_record(), "combine": empty_record()}
