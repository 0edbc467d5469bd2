"""CUDA graph capture, and :class:`SimGraph`: the same capture and replay on the CPU backends.

What a captured epcomm call may do: no host read of a tensor value, no collective on the host, no
kernel the host waits for. LL calls and, on the kernel backends, cached dispatch and combine and (one
node) a dispatch with ``num_worst_tokens`` qualify (their call check is judged on the device, their
epochs and generations are counted there, so a replay with the captured arguments is a new call); a
dispatch without a handle and without ``num_worst_tokens`` reads its counts on the host and is refused,
as are the torch backend's normal-mode calls (their agreement is a host collective). Growth, and a new
layout after normal-mode kernels were captured, are refused (README "Graph capture").

:class:`SimGraph` stands in for ``torch.cuda.CUDAGraph`` where there is no GPU, so graph-captured code
(a decode step, a cached dispatch + combine) can be tested on the CPU with the ``sim`` backend: the
same Python paths, the same kernels. Capturing runs the block once, as eager code would, and records
in order every torch operation and every kernel the sim runtime issues; :meth:`SimGraph.replay` runs
them again with the arguments they were recorded with (the tensors, addresses and kernel parameters
of the capture), writing each operation's result into the tensor it produced then, as a CUDA graph
replays into its static outputs. Host reads of tensor values through the dispatcher (``Tensor.item``,
``int(t)``, ``bool(t)``, ``torch.equal``) raise inside the capture, as they would under CUDA capture; a
value read otherwise (``tolist``) is baked into the capture, which a replay with new inputs shows. Every
rank captures and replays alike (the kernels are collective).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import EpcommError

__all__ = ["SimGraph", "is_capturing", "sim_graph"]

_capturing_graph: contextvars.ContextVar["SimGraph | None"] = contextvars.ContextVar("epcomm_sim_graph", default=None)


def is_capturing() -> bool:
    """Whether work issued now is being captured into a graph: the current CUDA stream is capturing, or a
    :class:`SimGraph` capture is open on this thread."""
    if _capturing_graph.get() is not None:
        return True
    # (not initialized: nothing can be capturing, and asking would create a CUDA context in a CPU process)
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def capturing_sim_graph() -> "SimGraph | None":
    """The :class:`SimGraph` capturing on this thread, if one is."""
    return _capturing_graph.get()


# Operations that allocate without defining values: nothing to redo on replay.
_ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default}
# Operations that read a tensor value into the host (Tensor.item, int(t), bool(t), torch.equal). Tensor.tolist
# and Tensor.numpy do not pass the dispatcher, and on the CPU they cannot be told from the host's own
# bookkeeping tensors: a value read from them at capture time shows as a replay that differs from eager calls.
_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default}


def _host_read(name: str) -> EpcommError:
    return EpcommError(f"a host read of a tensor value ({name}) while a SimGraph captures: under CUDA graph "
                       "capture it would fail or read a value of capture time; keep host reads out of the graph")


class _OpStep:
    """A torch operation as captured: redone with the same arguments, its results copied into the tensors
    it returned then."""

    def __init__(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        self.func, self.args, self.kwargs, self.out = func, args, kwargs, out

    def replay(self) -> None:
        again = self.func(*self.args, **self.kwargs)
        for old, new in zip(tree_leaves(self.out), tree_leaves(again)):
            if not isinstance(old, torch.Tensor) or old is new:
                continue
            if old.data_ptr() == new.data_ptr() and old.shape == new.shape and old.stride() == new.stride():
                continue  # an alias of the same memory (a view, an in-place result)
            old.copy_(new)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: "SimGraph") -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            raise _host_read(str(func))
        out = func(*args, **kwargs)
        if func not in _ALLOCATIONS:
            self.graph._steps.append(_OpStep(func, args, kwargs, out))
        else:
            self.graph._kept.append(out)  # as a graph's memory pool: alive as long as the graph
        return out


class SimGraph:
    """A graph of CPU work for the ``sim`` backend, captured with :func:`sim_graph` (see the module docs)."""

    def __init__(self) -> None:
        self._steps: list[_OpStep | Callable[[], None]] = []
        self._kept: list[Any] = []
        self._captured = False

    def add_kernel(self, issue: Callable[[], None]) -> None:
        """Record a kernel launch (the sim runtime calls it while this graph captures): ``issue`` launches it
        again."""
        self._steps.append(issue)

    def keep(self, *uses: Any) -> None:
        """Keep ``uses`` (tensors a captured kernel reads or writes) alive as long as the graph (for CUDA graphs
        the Buffer keeps them: ``SimDispatchBackend._keep_for_graphs``)."""
        self._kept.extend(uses)

    @property
    def num_kernels(self) -> int:
        """Kernel launches captured."""
        return sum(1 for step in self._steps if not isinstance(step, _OpStep))

    def replay(self) -> None:
        """Run the captured work again, in capture order; a kernel's error raises as it would in an eager call."""
        if not self._captured:
            raise EpcommError("SimGraph.replay: nothing was captured (use `with epcomm.graphs.sim_graph(graph):`)")
        for step in self._steps:
            step.replay() if isinstance(step, _OpStep) else step()


@contextlib.contextmanager
def sim_graph(graph: SimGraph) -> Iterator[SimGraph]:
    """Capture into ``graph`` what the block issues on this thread (as ``torch.cuda.graph`` does)."""
    if graph._captured:
        raise EpcommError("this SimGraph has captured already; make a new one")
    if _capturing_graph.get() is not None:
        raise EpcommError("a SimGraph is capturing already on this thread")
    token = _capturing_graph.set(graph)
    try:
        with _Recorder(graph):
            yield graph
    finally:
        _capturing_graph.reset(token)
    graph._captured = True
