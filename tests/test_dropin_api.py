"""DeepEP drop-in, the Buffer's surface: the constructor in DeepEP's order, flags epcomm cannot honour,
an mpi4py-style ``comm``, ``destroy()``, ``set_num_sms`` feeding the tuned configs, ``capture``,
``get_comm_stream``, ``get_local_buffer_tensor``, size hints from the TOTAL rank count, and
``epcomm.utils`` (DeepEP's ``deep_ep.utils``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import epcomm
from cases import Case, check_round
from epcomm.backends.sim_backend import SIM_DEFAULT_CONFIG


class FakeComm:
    """What epcomm uses of an mpi4py communicator, over torch.distributed (mpi4py need not be installed)."""

    def __init__(self, order):
        self.order = order

    def Get_rank(self):  # noqa: N802 (mpi4py's names)
        return self.order.index(dist.get_rank())

    def Get_size(self):  # noqa: N802
        return len(self.order)

    def allgather(self, value):
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return [out[r] for r in self.order]


def constructor(rank, world):
    results = {}
    # DeepEP's positional order, then epcomm's keyword-only options
    buf = epcomm.Buffer(None, 0, 0, True, 12, False, False, False, True, False, None, backend="torch",
                        num_nvl_ranks=2)
    results["attributes"] = (buf.low_latency_mode, buf.num_qps_per_rank, buf.allow_nvlink_for_low_latency_mode,
                             buf.explicitly_destroy, buf.num_nvl_bytes, buf.runtime is not None)
    for flag in ("allow_mnnvl", "use_fabric", "enable_shrink"):
        try:
            epcomm.Buffer(None, backend="torch", **{flag: True})
            results[flag] = None
        except ValueError as err:
            results[flag] = str(err)
    try:
        epcomm.Buffer(None, 0, 0, False, 24, True, False, False, False, False, None, "torch")
        results["positional epcomm option"] = None
    except TypeError as err:
        results["positional epcomm option"] = str(err)
    # comm instead of group: the default group's ranks in order map to it; others are refused with the way out
    by_comm = epcomm.Buffer(comm=FakeComm(list(range(world))), backend="torch")
    results["comm group"] = by_comm.group is dist.group.WORLD and by_comm.rank == rank
    by_comm.destroy()  # destroy() without explicitly_destroy works too
    results["destroyed without flag"] = by_comm.runtime is None
    try:
        epcomm.Buffer(comm=FakeComm(list(reversed(range(world)))), backend="torch")
        results["comm reversed"] = None
    except ValueError as err:
        results["comm reversed"] = str(err)
    try:
        epcomm.Buffer(comm=object(), backend="torch")
    except TypeError as err:
        results["comm type"] = str(err)
    # destroy(): collective; later calls say what happened
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    in_rank = torch.zeros(2, world, dtype=torch.bool)
    in_rank[:, (rank + 1) % world] = True
    per_rank = in_rank.sum(0, dtype=torch.int32)
    recv = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank)[0]
    results["before destroy"] = recv.shape[0]
    buf.destroy()
    results["runtime after destroy"] = buf.runtime
    for call in (lambda: buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank), buf.destroy,
                 lambda: buf.get_comm_stream()):
        try:
            call()
            results.setdefault("after destroy", []).append(None)
        except epcomm.EpcommError as err:
            results.setdefault("after destroy", []).append(str(err))
    return results


def test_constructor_in_deepeps_order_and_destroy(pools):
    for rank, r in enumerate(pools(4).run(constructor)):
        assert r["attributes"] == (True, 12, False, True, 0, True)
        for flag in ("allow_mnnvl", "use_fabric", "enable_shrink"):
            assert r[flag] is not None and f"{flag}=True" in r[flag] and "no epcomm backend supports" in r[flag]
        assert r["positional epcomm option"] is not None  # backend & co. are keyword-only
        assert r["comm group"] is True and r["destroyed without flag"] is True
        assert r["comm reversed"] is not None and "dist.new_group([3, 2, 1, 0])" in r["comm reversed"]
        assert "mpi4py communicator" in r["comm type"]
        assert r["before destroy"] == 2 and r["runtime after destroy"] is None
        assert all(m is not None and "was destroyed" in m for m in r["after destroy"]), r["after destroy"]


def dropped_without_destroy(rank, world):
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        buf = epcomm.Buffer(None, explicitly_destroy=True, backend="sim", timeout_s=60)
        del buf
        gc.collect()
        kept = epcomm.Buffer(None, backend="sim", timeout_s=60)  # the group and a new Buffer still work
        case = Case(num_nodes=1, nvl=world, tokens=(5, 3), seed=4)
        check_round(kept, case, rank, world)
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_explicitly_destroy_without_destroy_warns_and_stays_safe(pools):
    for messages in pools(2).run(dropped_without_destroy):
        assert any("without destroy()" in m for m in messages), messages


def buffer_views_and_streams(rank, world, backend, sized):
    hint = SIM_DEFAULT_CONFIG.get_nvl_buffer_size_hint(512, world, 4)
    buf = epcomm.Buffer(None, hint if sized else 0, backend=backend, timeout_s=60)
    out = {"stream": type(buf.get_comm_stream()).__name__}
    event = buf.capture()
    event.current_stream_wait()
    with event:
        pass
    out["capture"] = isinstance(event, epcomm.EventOverlap) and event.query()
    try:
        whole = buf.get_local_buffer_tensor(torch.uint8)
        part = buf.get_local_buffer_tensor(torch.int32, torch.Size([4, 8]), offset=64)
        part.fill_(rank + 7)  # a view of the buffer itself: the bytes are there
        out["view"] = (whole.numel(), part.shape, int(whole[64:68].view(torch.int32)[0]), hint)
        try:
            buf.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True)
        except ValueError as err:
            out["rdma"] = str(err)
    except ValueError as err:
        out["view"] = str(err)
    return out


@pytest.mark.parametrize("backend,sized", [("torch", False), ("sim", True), ("sim", False)])
def test_local_buffer_tensor_and_comm_stream(pools, backend, sized):
    for rank, out in enumerate(pools(2).run(buffer_views_and_streams, backend, sized)):
        assert out["capture"] is True and out["stream"] == "Stream"
        if backend == "torch":
            assert "has no communication buffer" in out["view"]
        elif not sized:
            assert "allocates its buffer at the first dispatch" in out["view"]
        else:
            numel, shape, value, hint = out["view"]
            assert numel == hint and shape == (4, 8) and value == rank + 7
            assert "no network (RDMA) region" in out["rdma"]


def test_set_num_sms_feeds_the_tuned_configs():
    try:
        epcomm.Buffer.set_num_sms(24)
        assert epcomm.Buffer.num_sms == 24
        assert epcomm.Buffer.get_dispatch_config(8) == epcomm.Config(24, 6, 256, 6, 128)
        assert epcomm.Buffer.get_combine_config(16) == epcomm.Config(24, 4, 288, 12, 128)
        for bad in (7, 0, "8"):
            with pytest.raises(ValueError, match="even int"):
                epcomm.Buffer.set_num_sms(bad)
    finally:
        epcomm.Buffer.set_num_sms(20)
    # counts DeepEP does not tabulate take the next tabulated count up
    assert epcomm.Buffer.get_dispatch_config(12) == epcomm.Buffer.get_dispatch_config(16)
    assert epcomm.Buffer.get_dispatch_config(1) == epcomm.Buffer.get_dispatch_config(2)
    assert epcomm.Buffer.get_combine_config(512) == epcomm.Buffer.get_combine_config(160)
    assert epcomm.Buffer.is_sm90_compiled() in (True, False)


# ------------------------------------------------------------------ size hints from the total rank count
def test_size_hints_take_the_total_rank_count_and_match_deepeps_order():
    config = epcomm.Buffer.get_dispatch_config(16)
    hidden_bytes = 7168 * 2
    nvl = config.get_nvl_buffer_size_hint(hidden_bytes, 16)  # as Megatron calls it: group.size()
    assert nvl == config.get_nvl_buffer_size_hint_for_node(hidden_bytes, 8, 8, 1024 // 16)  # 1024 experts default
    # DeepEP's NVL buffer is one ring of num_max_nvl_chunked_recv_tokens rows per (channel, peer) plus metadata
    rings = config.num_channels * 8 * config.num_max_nvl_chunked_recv_tokens * hidden_bytes
    assert rings <= nvl <= 2 * rings
    rdma = config.get_rdma_buffer_size_hint(hidden_bytes, 16)
    assert rdma == config.get_rdma_buffer_size_hint_for_nodes(hidden_bytes, 2, 8, 8, 4, 1024 // 16)
    # DeepEP's RDMA buffer: a send and a receive ring of num_max_rdma_chunked_recv_tokens rows per (channel, node)
    deepep_rings = 2 * config.num_channels * 2 * config.num_max_rdma_chunked_recv_tokens * hidden_bytes
    assert deepep_rings / 2 <= rdma <= 4 * deepep_rings
    assert config.get_rdma_buffer_size_hint(hidden_bytes, 8) == 0  # one node of 8
    assert config.get_nvl_buffer_size_hint(hidden_bytes, 4) == config.get_nvl_buffer_size_hint_for_node(hidden_bytes, 4)
    with pytest.raises(ValueError, match="must divide num_ranks"):
        config.get_nvl_buffer_size_hint(hidden_bytes, 12, num_nvl_ranks=8)


def buffers_at_total_rank_hints(rank, world, slack):
    case = Case(num_nodes=2, nvl=2, tokens=(9, 4, 0, 13), hidden=256, topk=4, max_nodes=2, seed=5)
    nvl = SIM_DEFAULT_CONFIG.get_nvl_buffer_size_hint(2 * case.hidden, world, case.topk, num_nvl_ranks=2,
                                                      num_experts=case.num_experts)
    rdma = SIM_DEFAULT_CONFIG.get_rdma_buffer_size_hint(2 * case.hidden, world, case.topk, num_nvl_ranks=2,
                                                       max_nodes_per_token=2, num_experts=case.num_experts)
    buf = epcomm.Buffer(None, nvl, rdma + slack, backend="sim", num_nvl_ranks=2, max_nodes_per_token=2, timeout_s=60)
    try:
        check_round(buf, case, rank, world)
    except epcomm.EpcommInputError as err:
        return rdma, str(err)
    return rdma, None


def test_total_rank_hints_are_exact(pools):
    for rdma, problem in pools(4).run(buffers_at_total_rank_hints, 0):
        assert problem is None and rdma > 0
    for rdma, problem in pools(4).run(buffers_at_total_rank_hints, -1):
        assert problem is not None and f"raise num_rdma_bytes to at least {rdma}" in problem, problem


# ------------------------------------------------------------------ epcomm.utils (deep_ep.utils)
class OwnEvent:
    """A backend's own event: EventOverlap must call its current_stream_wait, not assume CUDA."""

    def __init__(self):
        self.waits = 0

    def current_stream_wait(self):
        self.waits += 1

    def query(self):
        return True


def test_event_overlap_calls_the_events_own_wait():
    from epcomm.utils import EventHandle, EventOverlap

    own = OwnEvent()
    overlap = EventOverlap(own, extra_tensors=(torch.zeros(3),))
    overlap.current_stream_wait()
    with overlap:
        pass
    assert own.waits == 2 and overlap.extra_tensors[0].shape == (3,)
    handle = EventHandle()  # on the CPU: complete at once
    assert handle.query() and (handle.event is None) == (not torch.cuda.is_available())
    handle.current_stream_wait()
    EventOverlap(handle).current_stream_wait()
    EventOverlap().current_stream_wait()  # no event: nothing to wait for
    assert EventOverlap(handle).query()


# ------------------------------------------------------------------ a DeepEP client, unchanged
def megatron_style_client(rank, world, backend, nvl):
    """The calls Megatron's DeepEP dispatcher makes, spelled as it spells them, through ``deep_ep``."""
    import epcomm as deep_ep
    from cases import expert_output, make_input, same_bits
    from epcomm.reference import reference_combine, reference_dispatch
    from epcomm.utils import EventHandle, EventOverlap

    case = Case(num_nodes=world // nvl, nvl=nvl, tokens=(13, 4, 0, 9), hidden=256, max_nodes=world // nvl, seed=17)
    group = dist.group.WORLD
    hidden_bytes = case.hidden * 2
    num_nvl_bytes = num_rdma_bytes = 0
    deep_ep.Buffer.set_num_sms(8)
    try:
        for config in (deep_ep.Buffer.get_dispatch_config(group.size()), deep_ep.Buffer.get_combine_config(group.size())):
            num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
            num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    finally:
        deep_ep.Buffer.set_num_sms(20)
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, backend=backend, num_nvl_ranks=nvl,
                            max_nodes_per_token=case.max_nodes, timeout_s=60)
    inputs = [make_input(case, r) for r in range(world)]
    refs = [reference_dispatch(inputs, case.num_experts, d) for d in range(world)]
    mine = inputs[rank]
    previous_event = EventOverlap(EventHandle())
    (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
     previous_event) = buffer.get_dispatch_layout(mine.topk_idx, case.num_experts, previous_event=previous_event,
                                                  async_finish=True, allocate_on_comm_stream=True)
    recv_x, recv_idx, recv_probs, tokens_per_expert, handle, event = buffer.dispatch(
        mine.x, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=True,
        allocate_on_comm_stream=True)
    event.current_stream_wait()
    ref = refs[rank]
    assert same_bits(recv_x, ref.recv_x) and torch.equal(recv_idx, ref.recv_topk_idx)
    assert tokens_per_expert == ref.num_recv_tokens_per_expert
    outputs = [expert_output(r.recv_x, d) for d, r in enumerate(refs)]
    combined, _, event = buffer.combine(outputs[rank], handle=handle, async_finish=True, previous_event=event,
                                        allocate_on_comm_stream=True)
    event.current_stream_wait()
    want = reference_combine([r.sources for r in refs], outputs, case.tokens[rank], rank, nvl)
    assert same_bits(combined, want)
    return num_nvl_bytes, num_rdma_bytes


@pytest.mark.parametrize("backend,nvl", [("sim", 4), ("torch", 2), ("torch", 4)])
def test_a_megatron_style_client_runs_unchanged(pools, backend, nvl):
    for nvl_bytes, rdma_bytes in pools(4).run(megatron_style_client, backend, nvl):
        assert nvl_bytes > 0 and rdma_bytes == 0  # Megatron's hints assume 8 ranks per node: 4 ranks are one node
