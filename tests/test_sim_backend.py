"""backend="sim": epcomm's intranode kernels on the CPU, through Buffer, against the reference.

The reference (epcomm.reference) is what the torch backend is checked against bit for bit, so
passing here means sim == torch bit for bit; one test also compares the two backends' digests.
"""

from __future__ import annotations

import pytest
import torch

import epcomm
from cases import Case, check_case, make_input

TOPOLOGIES = [2, 4, 8]  # one node of this many ranks


def uneven_tokens(world: int) -> tuple[int, ...]:
    """Uneven counts, with rank 1 dispatching nothing."""
    return tuple(0 if r == 1 else 9 + 7 * r for r in range(world))


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("nvl", TOPOLOGIES, ids=[f"1x{n}" for n in TOPOLOGIES])
def test_sim_matches_reference(pools, nvl, kind):
    case = Case(num_nodes=1, nvl=nvl, tokens=uneven_tokens(nvl), kind=kind, alignment=4, seed=nvl + 17)
    reports = pools(nvl).run(check_case, case, "flat", 2, "sim")
    torch_reports = pools(nvl).run(check_case, case, "flat", 2, "torch")
    assert all(r.backend == "sim" and r.kernel_epochs == 6 for r in reports)  # 3 notifies per round
    assert all(r.backend == "torch" for r in torch_reports)
    assert [r.digest for r in reports] == [r.digest for r in torch_reports]


def test_sim_without_weights_and_explicit_buffer(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(5, 17, 0, 11), kind="bf16", with_weights=False, alignment=8, seed=3,
                hidden=384, num_experts=16, topk=3)
    pools(4).run(check_case, case, "flat", 1, "sim", 64 << 20)


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_sim_combines_fp32_and_fp16_rows(pools, kind):
    """Rows of every combine dtype are summed in fp32 and rounded once, as the torch backend does."""
    case = Case(num_nodes=1, nvl=4, tokens=(6, 0, 13, 9), kind=kind, hidden=130, seed=9)
    reports = pools(4).run(check_case, case, "flat", 1, "sim")
    torch_reports = pools(4).run(check_case, case, "flat", 1, "torch")
    assert [r.digest for r in reports] == [r.digest for r in torch_reports]


def too_small(rank, world):
    buf = epcomm.Buffer(None, 4096, backend="sim", num_nvl_ranks=world, timeout_s=60)
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    topk_idx = torch.zeros(4, 2, dtype=torch.int64)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, 4)
    try:
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=topk_idx)
    except epcomm.EpcommInputError as err:
        return str(err)
    return None


def test_sim_too_small_buffer_says_how_big(pools):
    for message in pools(2).run(too_small):
        assert message is not None and "raise num_nvl_bytes to at least" in message, message


def multi_node(rank, world):
    try:
        epcomm.Buffer(None, backend="sim", num_nvl_ranks=2)
    except epcomm.EpcommBackendUnavailable as err:
        return str(err)
    return None


def test_sim_is_intranode_only(pools):
    for message in pools(4).run(multi_node):
        assert message is not None and "intranode-only" in message and "backend='torch'" in message, message


def test_auto_does_not_pick_sim():
    from epcomm.backends import resolve_backend

    assert resolve_backend("auto") == "torch"
    assert resolve_backend("sim") == "sim"


def growing_rounds(rank, world):
    """One sim Buffer through calls of growing and shrinking shape: the NVL buffer grows, layouts change."""
    from cases import check_round

    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=world, timeout_s=60)
    sizes = []
    for hidden, kind, topk in ((128, "bf16", 2), (512, "fp8", 6), (256, "bf16", 4), (512, "fp8", 6)):
        case = Case(num_nodes=1, nvl=world, tokens=(7, 0, 12, 5)[:world], kind=kind, hidden=hidden, topk=topk,
                    seed=hidden + topk)
        check_round(buf, case, rank, world)
        sizes.append(buf._impl._sim.num_nvl_bytes)
    return sizes


def test_sim_buffer_grows_and_layout_changes(pools):
    for sizes in pools(4).run(growing_rounds):
        assert sizes[0] < sizes[1] == sizes[2] == sizes[3], sizes


def wrong_weight_width(rank, world):
    case = Case(num_nodes=1, nvl=world, tokens=(6,) * world, seed=4)
    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=world, timeout_s=60)
    mine = make_input(case, rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(mine.topk_idx, case.num_experts)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(
        mine.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx, topk_weights=mine.topk_weights)
    try:
        buf.combine(recv_x, handle, topk_weights=recv_w[:, :2].contiguous())
    except epcomm.EpcommInputError as err:
        return str(err)
    return None


def test_sim_combine_weights_need_dispatch_topk(pools):
    for message in pools(2).run(wrong_weight_width):
        assert message is not None and "dispatch's num_topk=4 columns, got 2" in message, message
