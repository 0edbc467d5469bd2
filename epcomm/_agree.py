"""Collective agreement: every rank learns whether any rank rejected its inputs.

Before data moves, each rank contributes a fixed-length int64 header: its
local verdict, a signature of the call (operation, sizes, dtypes, handle) and
its send counts. One ``all_gather`` then gives every rank the same view, so
all ranks raise the same :class:`EpcommInputError` or all proceed, and the
counts double as the notify step that sizes every receive buffer.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import torch

from ._comm import GroupComm
from .errors import EpcommInputError

__all__ = ["SIGNATURE_FIELDS", "X_KINDS", "FP8_KIND", "agree", "signature_digest"]

# Call properties every rank must share (-1 = not applicable to this call).
SIGNATURE_FIELDS = (
    "operation",
    "handle",
    "num_experts",
    "hidden",
    "x_kind",
    "num_topk",
    "has_topk_weights",
    "num_nvl_ranks",
    "max_nodes_per_token",
    "algorithm",
    "config_num_sms",
    "config_nvl_send_tokens",
    "config_nvl_recv_tokens",
    "config_rdma_send_tokens",
    "config_rdma_recv_tokens",
    "num_max_dispatch_tokens",
    "low_latency_flags",
    "num_worst_tokens",
    "combine_node_partials",
    "async_finish",
)
_MESSAGE_BYTES = 480

OPERATION_NAMES = {1: "dispatch", 2: "cached dispatch", 3: "combine", 4: "low_latency_dispatch",
                   5: "low_latency_combine", 6: "clean_low_latency_buffer"}
# x's kind in the call signature; 1-3 are also the kernels' ElementKind codes (csrc/kernels/elements.cuh)
X_KINDS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
FP8_KIND = 4
X_KIND_NAMES = {1: "bfloat16", 2: "float16", 3: "float32", FP8_KIND: "FP8 tuple (float8_e4m3fn, float32 scales)",
                FP8_KIND + 1: "FP8 tuple (float8_e4m3fn, int32 UE8M0-packed scales)",
                FP8_KIND + 2: "FP8 tuple (float8_e4m3fn, float32 per-token scales [N])"}
ALGORITHM_NAMES = {0: "flat", 1: "two_hop"}
NODE_PARTIAL_NAMES = {0: "rows_dtype", 1: "float32"}
_DESCRIBE = {
    "operation": ("the operation", OPERATION_NAMES),
    "handle": ("the handle (dispatch call number)", {}),
    "x_kind": ("x's dtype", X_KIND_NAMES),
    "algorithm": ("the algorithm", ALGORITHM_NAMES),
    "combine_node_partials": ("Buffer(combine_node_partials=...)", NODE_PARTIAL_NAMES),
    "async_finish": ("async_finish", {0: "False", 1: "True"}),
    "config_num_sms": ("config.num_sms (-1: no config)", {}),
    "config_nvl_send_tokens": ("config.num_max_nvl_chunked_send_tokens (-1: no config)", {}),
    "config_nvl_recv_tokens": ("config.num_max_nvl_chunked_recv_tokens (-1: no config)", {}),
    "config_rdma_send_tokens": ("config.num_max_rdma_chunked_send_tokens (-1: no config)", {}),
    "config_rdma_recv_tokens": ("config.num_max_rdma_chunked_recv_tokens (-1: no config)", {}),
    "num_max_dispatch_tokens": ("num_max_dispatch_tokens_per_rank", {}),
    "num_worst_tokens": ("num_worst_tokens", {}),
    "low_latency_flags": ("the LL flags (bits: 1 use_fp8, 2 round_scale, 4 use_ue8m0, 8 return_recv_hook, "
                          "16 zero_copy, 32 out given)", {}),
}


def _ranks_text(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def _disagreements(headers: list[list[int]]) -> dict[int, str]:
    problems: dict[int, str] = {}
    for i, name in enumerate(SIGNATURE_FIELDS):
        values = [h[i] for h in headers]
        if len(set(values)) == 1:
            continue
        majority, _ = Counter(values).most_common(1)[0]
        what, names = _DESCRIBE.get(name, (name, {}))
        majority_ranks = [r for r, v in enumerate(values) if v == majority]
        for rank, value in enumerate(values):
            if value != majority:
                problems.setdefault(rank, "")
                problems[rank] += (
                    ("; " if problems[rank] else "")
                    + f"ranks disagree on {what}: this rank has {names.get(value, value)}, "
                    f"{_ranks_text(majority_ranks)} have {names.get(majority, majority)}"
                )
    return problems


def signature_digest(signature: dict[str, int]) -> int:
    """A 63-bit hash of the call ``signature`` (the values of :data:`SIGNATURE_FIELDS`, -1 when absent).

    Equal signatures give equal digests on every rank and in every process (no salted ``hash()``); the
    kernel backends compare digests inside their barrier instead of gathering the signatures
    (kernels/call_check.cuh), and fall back to :func:`agree` when they differ."""
    values = torch.tensor([int(signature.get(f, -1)) for f in SIGNATURE_FIELDS], dtype=torch.int64)
    raw = hashlib.blake2b(values.numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(raw, "little") >> 1


def agree(
    comm: GroupComm,
    op: str,
    problem: str | None,
    signature: dict[str, int],
    counts: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Agree on the call across ranks and exchange per-rank counts.

    Args:
        problem: this rank's validation failure, or None.
        signature: values of :data:`SIGNATURE_FIELDS` for this call.
        counts: ``[C]`` int64 counts to share (``C`` is the same on every rank), or None.
    Returns:
        ``[world_size, C]`` int64: every rank's counts.
    Raises:
        EpcommInputError: on every rank, if any rank had a problem or the ranks disagree.
    """
    world = comm.topo.world_size
    num_counts = 2 * world  # fixed length, so a disagreement cannot break the gather itself
    header = torch.zeros(1 + len(SIGNATURE_FIELDS) + num_counts, dtype=torch.int64)
    header[0] = 0 if problem is None else 1
    header[1 : 1 + len(SIGNATURE_FIELDS)] = torch.tensor([int(signature.get(f, -1)) for f in SIGNATURE_FIELDS])
    if counts is not None and problem is None:
        header[1 + len(SIGNATURE_FIELDS) : 1 + len(SIGNATURE_FIELDS) + counts.numel()] = counts
    gathered = comm.all_gather(op, "agree", header.to(device)).cpu()

    failed = gathered[:, 0].nonzero().flatten().tolist()
    problems: dict[int, str] = {}
    if failed:
        messages = comm.all_gather_bytes(op, "report errors", (problem or "").encode("utf-8"), _MESSAGE_BYTES)
        for r in failed:
            problems[r] = messages[r].rstrip(b"\0").decode("utf-8", "replace")
    else:
        headers = gathered[:, 1 : 1 + len(SIGNATURE_FIELDS)].tolist()
        problems = _disagreements(headers)
    if problems:
        raise EpcommInputError(op, problems, world)
    return gathered[:, 1 + len(SIGNATURE_FIELDS) :]
