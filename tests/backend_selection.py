"""Which backends the multi-process suite runs: ``EPCOMM_TEST_BACKENDS``.

Unset (CI, ``make test``): every test runs the backends it lists (``torch`` and ``sim``). Set to a
comma-separated list (``EPCOMM_TEST_BACKENDS=cuda``, what ``make gpu-check`` does on two GPUs or more),
only the tests parametrized over one of those backends run (conftest.py deselects the rest), and
``cases.backends_for`` adds ``cuda`` to the one-node topologies. With ``cuda`` every rank of a pool
gets its own GPU (``torch.cuda.set_device(rank)``; rankpool.py), so a pool needs as many GPUs as ranks.
"""

from __future__ import annotations

import os

KNOWN_BACKENDS = ("torch", "sim", "cuda")


def selected_backends() -> tuple[str, ...]:
    """The backends EPCOMM_TEST_BACKENDS names; () when unset (every test's own list)."""
    names = tuple(name.strip() for name in os.environ.get("EPCOMM_TEST_BACKENDS", "").split(",") if name.strip())
    unknown = [name for name in names if name not in KNOWN_BACKENDS]
    if unknown:
        raise ValueError(f"EPCOMM_TEST_BACKENDS names unknown backend(s) {unknown}; known: {list(KNOWN_BACKENDS)}")
    return names


def one_gpu_per_rank() -> bool:
    """Whether pool ranks run on GPUs (one each): the cuda backend is selected."""
    return "cuda" in selected_backends()
