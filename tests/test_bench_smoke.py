"""Smoke test of the benchmark suite: tiny sizes under mpiexec, JSON keys and byte identities.

Timings are never asserted (they are noise at these sizes); bytes are exact
and stable, so the identities are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpi4py mpich)")

H, TOKENS, EXPERTS, TOPK, RANKS, NVL = 256, 64, 32, 8, 4, 2
LINKS = ("self", "nvlink", "network")


def _run(tmp_path: Path, *extra: str, ranks: int = RANKS) -> subprocess.CompletedProcess:
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, str(BENCH / "bandwidth.py"), "--backend", "torch",
           "--nvl-ranks", str(NVL), "--tokens", str(TOKENS), "--hidden", str(H), "--topk", str(TOPK),
           "--experts", str(EXPERTS), "--reps", "2", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bf16_result(tmp_path_factory):
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    tmp = tmp_path_factory.mktemp("bench")
    out = _run(tmp, "--routing", "gate", "--json", str(tmp / "out.json"), "--plot", str(tmp / "out.png"),
               "--sweep", "32,64", "--sweep-reps", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((tmp / "out.json").read_text()), out.stdout, tmp


@needs_mpi
def test_json_has_every_figure(bf16_result):
    result, stdout, tmp = bf16_result
    assert {"config", "environment", "accounting", "main", "targets", "sweep", "gpu"} <= set(result)
    assert result["config"]["tokens"] == TOKENS and result["environment"]["world_size"] == RANKS
    ops = result["main"]["ops"]
    expected_ops = {"layout"} | {f"{a} {o}" for a in ("flat", "two_hop") for o in ("dispatch", "cached dispatch", "combine")} \
        | {"ceiling dispatch", "ceiling combine", "ceiling two_hop dispatch", "ceiling two_hop combine",
           "per_expert dispatch", "per_expert combine"}
    assert set(ops) == expected_ops
    for name, e in ops.items():
        assert {"median_s", "p10_s", "p90_s", "times_s"} <= set(e), name
        assert len(e["times_s"]) == 2 and e["p10_s"] <= e["median_s"] <= e["p90_s"]
        if name != "layout":
            assert {"traffic", "expected", "bytes_match", "deepep_rdma_GBps", "deepep_nvl_GBps"} <= set(e), name
    for name in ("flat dispatch", "flat combine", "two_hop dispatch", "per_expert combine"):
        assert "x_ceiling" in ops[name] and "fraction_of_ceiling" in ops[name]
    assert [c["tokens"] for c in result["sweep"]] == [32, 64]
    peaks = result["main"]["memory"]["peak_rss_MiB_max_over_ranks"]
    assert set(peaks) == {"flat", "two_hop", "ceiling", "per_expert"} and all(v > 0 for v in peaks.values()), peaks
    assert "peak RSS per rank" in stdout
    assert (tmp / "out.png").stat().st_size > 0
    assert "PASS" in stdout or "MISS" in stdout


@needs_mpi
def test_byte_identities(bf16_result):
    result, _, _ = bf16_result
    main = result["main"]
    ops, pairs, rb = main["ops"], main["pairs"], main["row_bytes"]["dispatch"]
    assert rb == 2 * H
    # every op moved exactly what the routing implies, per link class
    for name, e in ops.items():
        if "bytes_match" in e:
            assert e["bytes_match"], (name, e["traffic"], e["expected"])
    # two-hop: one network row per (token, remote node) pair
    assert ops["two_hop dispatch"]["traffic"]["network"]["payload_bytes"] == pairs["token_remote_node_pairs"] * rb
    # flat: one row per (token, rank) pair; the ceiling moves the same rows
    flat = ops["flat dispatch"]["traffic"]
    assert sum(flat[link]["rows"] for link in LINKS) == pairs["token_rank_pairs"]
    ceiling = ops["ceiling dispatch"]["traffic"]
    for link in LINKS:
        assert (ceiling[link]["rows"], ceiling[link]["payload_bytes"]) == (flat[link]["rows"], flat[link]["payload_bytes"])
    # per-expert baseline: one row per (token, expert); network factor as the routing implies
    pe = ops["per_expert dispatch"]["traffic"]
    assert sum(pe[link]["rows"] for link in LINKS) == pairs["token_expert_pairs"] == RANKS * TOKENS * TOPK
    assert Fraction(pe["network"]["payload_bytes"], ops["two_hop dispatch"]["traffic"]["network"]["payload_bytes"]) == \
        Fraction(pairs["token_expert_remote_node_pairs"], pairs["token_remote_node_pairs"])
    # two-hop combine sends bf16 node partials across nodes (the default): dispatch's network bytes
    assert ops["two_hop combine"]["traffic"]["network"]["payload_bytes"] == pairs["token_remote_node_pairs"] * 2 * H \
        == ops["two_hop dispatch"]["traffic"]["network"]["payload_bytes"]
    assert all(main["verified"].values()) and set(main["verified"]) == {"flat", "two_hop", "per_expert"}
    byte_targets = [t for t in result["targets"] if "within" not in t["name"]]  # timing lines are never asserted
    assert byte_targets and all(t["pass"] for t in byte_targets), byte_targets


@needs_mpi
def test_fp8_bytes_and_stability(tmp_path):
    out = _run(tmp_path, "--fp8", "--routing", "zipf", "--json", "a.json", "--no-baselines", "--algorithms", "two_hop")
    assert out.returncode == 0, out.stdout + out.stderr
    again = _run(tmp_path, "--fp8", "--routing", "zipf", "--json", "b.json", "--no-baselines", "--algorithms", "two_hop")
    assert again.returncode == 0, again.stdout + again.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    fp8 = [t for t in a["targets"] if t["name"].startswith("FP8")]
    assert fp8 and fp8[0]["pass"], fp8
    assert a["main"]["row_bytes"]["dispatch"] == H + 4 * H // 128
    for name, e in a["main"]["ops"].items():  # bytes are stable run to run
        if "traffic" in e:
            assert e["traffic"] == b["main"]["ops"][name]["traffic"], name


@needs_mpi
def test_unavailable_backend_exits_nonzero(tmp_path):
    out = _run(tmp_path, "--backend", "cuda", ranks=2)  # no GPU here
    assert out.returncode != 0
    assert "EpcommBackendUnavailable" in out.stderr and "backend 'cuda' is unavailable on 2 of 2 ranks" in out.stderr, out.stderr


def test_cluster_model_traffic_matches_closed_forms():
    """Single process: the model's matrices agree with direct per-token counting."""
    import torch
    from _routing import global_topk_idx
    from cluster_model import expected_traffic, predict, traffic_matrices

    world, nvl, tokens, experts = 8, 2, 32, 32
    topk_all = global_topk_idx("uniform", world=world, nvl=nvl, tokens=tokens, experts=experts, topk=4)
    tm = traffic_matrices(topk_all, experts, nvl)
    per_rank = experts // world
    node_pairs = remote = 0
    for s in range(world):
        for t in range(tokens):
            ranks = {int(e) // per_rank for e in topk_all[s, t] if e >= 0}
            nodes = {r // nvl for r in ranks}
            node_pairs += len(nodes)
            remote += len(nodes - {s // nvl})
            for d in ranks:
                assert tm.count[s, d] > 0
    assert tm.pairs()["token_node_pairs"] == node_pairs
    exp = expected_traffic(tm, 256, fp8=False)
    assert exp["two_hop"]["dispatch"]["network"]["rows"] == remote
    # hop 2 delivers every (token, rank) row exactly once
    assert int(tm.hop2.sum()) == int(tm.count.sum())
    pred = predict(tm, hidden=256, tokens=tokens, fp8_dispatch=False, combine_partial_bytes=2, nvl_GBps=160, net_GBps=50)
    assert pred["two_hop"]["dispatch"]["t_us"] > 0


@needs_mpi
def test_sim_backend_runs_the_suite(tmp_path):
    """--backend sim: epcomm's kernels on the CPU (one node), same byte accounting, verified bit-exact."""
    out = _run(tmp_path, "--backend", "sim", "--nvl-ranks", str(RANKS), "--algorithms", "flat", "--json", "s.json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "s.json").read_text())
    ops = result["main"]["ops"]
    assert result["config"]["backend"] == "sim" and result["main"]["verified"]["flat"]
    assert all(e["bytes_match"] for e in ops.values() if "bytes_match" in e)
    flat = ops["flat dispatch"]["traffic"]
    assert flat["network"]["rows"] == 0 and flat["nvlink"]["rows"] > 0


@needs_mpi
def test_targets_table(tmp_path):
    """--targets-table: every (tokens, hidden) point gets the six ratios of issue 14, the bare count exchange
    has the agreement header's size, and the collectives per call are the torch backend's small-call counts."""
    from epcomm._agree import SIGNATURE_FIELDS

    out = _run(tmp_path, "--targets-table", "--sweep", "16,64", "--sweep-hidden", f"128,{H}", "--sweep-reps", "1",
               "--no-baselines", "--json", "t.json")
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads((tmp_path / "t.json").read_text())
    table = r["targets_table"]
    assert table["count_exchange_int64_words"] == 1 + len(SIGNATURE_FIELDS) + 2 * RANKS
    assert [(row["tokens"], row["hidden"]) for row in table["rows"]] == [(16, 128), (64, 128), (16, H), (64, H)]
    trips = {"flat dispatch": 2, "flat cached": 2, "flat combine": 2,  # tests/test_round_trips.py, packed calls
             "2hop dispatch": 3, "2hop cached": 3, "2hop combine": 3}
    for row in table["rows"]:
        assert set(row["columns"]) == set(trips), row
        for col, e in row["columns"].items():
            assert e["ratio"] > 0 and e["pass"] == (e["ratio"] <= e["limit"]), (col, e)
            assert e["round_trips_per_call"] == {"collectives": trips[col], "kernels": 0}, (col, e)
    assert "ceiling count exchange" in r["main"]["ops"]
    assert all(e["bytes_match"] for e in r["main"]["ops"].values() if "bytes_match" in e)
    assert "targets (issue 14)" in out.stdout and ("PASS" in out.stdout or "MISS" in out.stdout)


# ----------------------------------------------------------------------------- low-latency mode (bench/latency.py)
LL_TOKENS, LL_TOPK = 8, 4


def _run_latency(tmp_path: Path, *extra: str, ranks: int = RANKS) -> subprocess.CompletedProcess:
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, str(BENCH / "latency.py"), "--nvl-ranks", str(NVL),
           "--tokens", str(LL_TOKENS), "--hidden", str(H), "--topk", str(LL_TOPK), "--experts", str(EXPERTS // 2),
           "--reps", "2", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@needs_mpi
def test_latency_bench_bytes_and_checks(tmp_path):
    """Tiny LL run: every op's bytes equal the routing's, the checks pass, the baselines move what they claim."""
    out = _run_latency(tmp_path, "--backend", "torch", "--sync-free", "--json", "ll.json")
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads((tmp_path / "ll.json").read_text())
    ops, main = r["main"]["ops"], r["main"]
    assert set(ops) == {"ll dispatch", "ll combine", "ll dispatch (host_sync_free)", "ll combine (host_sync_free)",
                        "bare dispatch (fixed slots)", "bare combine (fixed slots)",
                        "bare dispatch (valid messages)", "bare combine (valid messages)"}
    for name, e in ops.items():
        assert len(e["times_s"]) == 2 and e["p10_s"] <= e["median_s"] <= e["p90_s"], name
        assert e["bytes_match"], (name, e["traffic"], e.get("expected"))
        if name.startswith("ll "):
            assert e["x_bare"] > 0 and e["x_bare_valid"] > 0
    assert main["verified_all_ranks"] and all(main["verified"].values())
    # closed forms: the torch reference sends a fixed array to every rank; kernels one message per (token, expert)
    e_loc, p = EXPERTS // 2 // RANKS, H + 4 * H // 128
    pairs = RANKS * LL_TOKENS * LL_TOPK  # gate routing: no -1 entries
    disp, comb = ops["ll dispatch"]["traffic"], ops["ll combine"]["traffic"]
    assert sum(disp[k]["payload_bytes"] + disp[k]["meta_bytes"] for k in LINKS) == \
        RANKS * RANKS * (4 * e_loc + e_loc * LL_TOKENS * (4 + p))
    assert sum(comb[k]["payload_bytes"] + comb[k]["meta_bytes"] for k in LINKS) == RANKS * RANKS * e_loc * LL_TOKENS * 2 * H
    assert sum(disp[k]["rows"] for k in LINKS) == sum(comb[k]["rows"] for k in LINKS) == pairs
    kernel = main["expected_bytes"]["kernel"]
    assert sum(v["bytes"] for v in kernel["dispatch"].values()) == pairs * (16 + p)
    assert ops["bare dispatch (valid messages)"]["bytes_by_link"] == {k: v["bytes"] for k, v in kernel["dispatch"].items()}
    assert "torch/kernel" in out.stdout and "bytes == computed from the routing: all 8 ops" in out.stdout


@needs_mpi
def test_latency_bench_backend_without_ll_exits_cleanly(tmp_path):
    """--backend sim: runs if the backend has LL mode, else one clear message and a non-zero exit (no traceback)."""
    out = _run_latency(tmp_path, "--backend", "sim", "--nvl-ranks", str(RANKS))
    if out.returncode != 0:
        assert out.returncode == 3 and "bench: " in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_ll_model_against_deepep_table():
    """Single process: the LL model's constants, message bytes and comparison with DeepEP's published table."""
    import argparse

    import torch
    from cluster_model import (DEEPEP_LL_H800, add_model_args, ll_port_messages, run_ll_model, traffic_matrices)
    from _routing import add_routing_args, global_topk_idx
    from latency import ll_expected_bytes

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    add_routing_args(parser)
    result = run_ll_model(parser.parse_args(["--ll", "--ep", "8,16"]))
    assert result["constants"]["message_bytes"] == {"dispatch": 16 + 7168 + 4 * 56, "combine": 2 * 7168}
    assert 0 < result["constants"]["fixed_us"][0] < 100  # one fitted constant for all rows
    for row in result["rows"]:
        for op, k in (("dispatch", 0), ("combine", 2)):
            e = row[op]
            assert e["published_us"] == DEEPEP_LL_H800[row["ep"]][k] and abs(e["error_pct"]) < 50
            # DeepEP's GB/s is 128 x 8 messages per rank x message bytes / time (to the anchors' rounding)
            msg = result["constants"]["message_bytes"][op]
            assert abs(e["published_bytes_per_rank_implied"] / (128 * 8 * msg) - 1) < 0.03
    assert result["rows"][0]["dispatch"]["bound"] == "NVLink" and result["rows"][1]["dispatch"]["bound"] == "network"
    # the bench's byte formula and the model's message counts agree with direct counting on a small routing
    world, nvl, experts = 4, 2, 16
    topk_all = global_topk_idx("uniform", world=world, nvl=nvl, tokens=6, experts=experts, topk=3)
    tm = traffic_matrices(topk_all, experts, nvl)
    exp = ll_expected_bytes(tm.expert_count, tm.link, hidden=256, num_local_experts=experts // world, num_max=6, fp8=True)
    remote = sum(int((topk_all[s] // (experts // world) == d).sum()) for s in range(world) for d in range(world)
                 if s // nvl != d // nvl)
    assert exp["kernel"]["dispatch"]["network"] == {"messages": remote, "bytes": remote * (16 + 256 + 8)}
    sent = torch.tensor([[int((topk_all[s] // (experts // world) == d).sum()) if s // nvl != d // nvl else 0
                          for d in range(world)] for s in range(world)])
    assert ll_port_messages(tm)["dispatch"]["network"] == int(torch.maximum(sent.sum(1), sent.sum(0)).max())
