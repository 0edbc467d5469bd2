"""DeepEP's public normal-mode surface, checked against the frozen list in tests/data/deepep_normal_api.json.

Code written for DeepEP calls epcomm with DeepEP's names, positional orders and defaults; this module
fails when any of them drifts. epcomm may add parameters only after DeepEP's, with defaults (its own
constructor options are keyword-only).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

import epcomm

API = json.loads((Path(__file__).parent / "data" / "deepep_normal_api.json").read_text())
_REQUIRED = "<required>"


def _check_signature(owner: str, fn, frozen: list) -> None:
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    names = [p.name for p in params]
    want = [name for name, _ in frozen]
    assert names[: len(want)] == want, f"{owner}: DeepEP's parameters {want}, epcomm has {names}"
    for p, (name, default) in zip(params, frozen):
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY), f"{owner}({name}) must be positional"
        if default != _REQUIRED:  # (a parameter DeepEP requires may have a default here: callers pass it anyway)
            assert p.default is not p.empty and p.default == default, \
                f"{owner}({name}): DeepEP's default {default!r}, epcomm's {p.default!r}"
    for p in params[len(want):]:  # epcomm's own, after DeepEP's
        assert p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD), \
            f"{owner}: epcomm's extra parameter {p.name} needs a default"


def test_module_names():
    for name in API["module"]:
        assert hasattr(epcomm, name), f"epcomm.{name} (deep_ep.{name}) is missing"
    assert epcomm.topk_idx_t is torch.int64
    for name in API["utils"]:
        assert hasattr(epcomm.utils, name), f"epcomm.utils.{name} (deep_ep.utils.{name}) is missing"


@pytest.mark.parametrize("method", sorted(API["buffer"]["methods"]))
def test_buffer_signatures(method):
    fn = getattr(epcomm.Buffer, method, None)
    assert fn is not None, f"Buffer.{method} is missing"
    _check_signature(f"Buffer.{method}", fn, API["buffer"]["methods"][method])


def test_buffer_static_and_class_attributes():
    for name in API["buffer"]["staticmethods"]:
        assert isinstance(inspect.getattr_static(epcomm.Buffer, name), staticmethod), f"Buffer.{name} must be static"
    for name, value in API["buffer"]["class_attributes"].items():
        assert getattr(epcomm.Buffer, name) == value


def test_constructor_options_of_epcomm_are_keyword_only():
    params = list(inspect.signature(epcomm.Buffer.__init__).parameters.values())[1:]
    deepep = len(API["buffer"]["methods"]["__init__"])
    assert all(p.kind is p.KEYWORD_ONLY for p in params[deepep:])


@pytest.mark.parametrize("method", sorted(API["config"]["methods"]))
def test_config_signatures(method):
    _check_signature(f"Config.{method}", getattr(epcomm.Config, method), API["config"]["methods"][method])


def test_config_is_built_positionally():
    values = (24, 6, 256, 6, 128)
    config = epcomm.Config(*values)
    assert tuple(getattr(config, f) for f in API["config"]["positional"]) == values


@pytest.mark.parametrize("method", sorted(API["event_overlap"]["methods"]))
def test_event_overlap_signatures(method):
    _check_signature(f"EventOverlap.{method}", getattr(epcomm.utils.EventOverlap, method),
                     API["event_overlap"]["methods"][method])


@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_tuned_configs_are_deepeps(op):
    getter = getattr(epcomm.Buffer, f"get_{op}_config")
    for ranks, values in API["tuned_configs"][op].items():
        config = getter(int(ranks))
        assert (config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
                config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens) == \
            (epcomm.Buffer.num_sms, *values), (op, ranks)


def test_import_as_deep_ep(monkeypatch):
    """``import epcomm as deep_ep`` plus the two-line alias frameworks need for ``deep_ep.utils``."""
    monkeypatch.setitem(sys.modules, "deep_ep", epcomm)
    monkeypatch.setitem(sys.modules, "deep_ep.utils", epcomm.utils)
    import deep_ep
    from deep_ep import Buffer, Config  # noqa: F401
    from deep_ep.utils import EventHandle, EventOverlap

    assert deep_ep.Buffer is epcomm.Buffer and EventOverlap is epcomm.EventOverlap
    with EventOverlap(EventHandle(), extra_tensors=(torch.zeros(1),)) as event:
        assert event.extra_tensors is not None


def api_on_a_live_buffer(rank, world):
    buf = epcomm.Buffer(None, 0, 0, False, 24, True, False, False, False, False, None, backend="torch")
    attributes = {name: hasattr(buf, name) for name in API["buffer"]["instance_attributes"]}
    return attributes, buf.rank, buf.group_size


def test_instance_attributes(pools):
    for rank, (attributes, buf_rank, size) in enumerate(pools(2).run(api_on_a_live_buffer)):
        assert all(attributes.values()), attributes
        assert (buf_rank, size) == (rank, 2)


def test_as_deep_ep_makes_deep_ep_imports_work():
    import sys
    import types

    saved = {name: sys.modules.pop(name) for name in ("deep_ep", "deep_ep.utils") if name in sys.modules}
    try:
        assert epcomm.as_deep_ep() is epcomm
        import deep_ep  # noqa: F401
        from deep_ep.utils import EventOverlap

        assert deep_ep is epcomm and EventOverlap is epcomm.utils.EventOverlap
        assert epcomm.as_deep_ep() is epcomm  # idempotent
        sys.modules["deep_ep"] = types.ModuleType("deep_ep")  # "the real one"
        with pytest.raises(RuntimeError, match="a different deep_ep"):
            epcomm.as_deep_ep()
    finally:
        for name in ("deep_ep", "deep_ep.utils"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)
