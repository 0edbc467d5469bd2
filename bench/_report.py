"""The benchmark's stdout table, PASS/MISS lines and plot."""

from __future__ import annotations

import sys


def _fmt(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}{spec}}"


def print_report(result: dict, file=sys.stdout) -> None:
    cfg, env, main = result["config"], result["environment"], result["main"]
    print(f"epcomm {env['epcomm']} bandwidth: backend {cfg['backend']}, {env['world_size']} ranks = "
          f"{env['num_nodes']} nodes x {env['nvl_ranks']}, {env['process_group']} on {env['device']} "
          f"({env['cpu_count']} CPUs), torch {env['torch']}", file=file)
    print(f"{main['tokens']} tokens/rank, hidden {cfg['hidden']}, top-{cfg['topk']} of {cfg['experts']} experts, "
          f"<= {cfg['max_nodes']} nodes/token, routing {cfg['routing']}, {'FP8' if cfg['fp8'] else 'BF16'} dispatch, "
          f"BF16 combine; {main['reps']} reps after {main['warmup']} warm-up; timer: {env['timer']}", file=file)
    p = main["pairs"]
    tok = env["world_size"] * main["tokens"]
    print(f"routing: per token {p['token_rank_pairs'] / tok:.2f} ranks, {p['token_node_pairs'] / tok:.2f} nodes "
          f"({p['token_remote_node_pairs'] / tok:.2f} remote), {p['token_expert_pairs'] / tok:.2f} experts; "
          f"received rows per rank {main['recv_rows_per_rank']['min']}..{main['recv_rows_per_rank']['max']}; "
          f"row bytes dispatch {main['row_bytes']['dispatch']}, combine {main['row_bytes']['combine']}", file=file)
    print(file=file)
    hdr = (f"{'operation':<26} {'median ms':>10} {'p10':>8} {'p90':>8} "
           f"{'network MB':>10} {'nvlink MB':>9} {'self MB':>8} {'meta MB':>8} {'RDMA GB/s':>9} {'NVL GB/s':>9} {'x ceil':>7} {'bytes':>5}")
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for name, e in main["ops"].items():
        t = e.get("traffic")
        mb = (lambda link: t[link]["payload_bytes"] / 1e6) if t else (lambda link: None)
        meta = sum(t[link].get("meta_bytes", 0) for link in t) / 1e6 if t else None
        match = {True: "ok", False: "DIFF", None: ""}[e.get("bytes_match")]
        print(f"{name:<26} {e['median_s'] * 1e3:10.1f} {e['p10_s'] * 1e3:8.1f} {e['p90_s'] * 1e3:8.1f} "
              f"{_fmt(mb('network'), '.1f', 10)} {_fmt(mb('nvlink'), '.1f', 9)} {_fmt(mb('self'), '.1f', 8)} "
              f"{_fmt(meta, '.1f', 8)} {_fmt(e.get('deepep_rdma_GBps'), '.3f', 9)} "
              f"{_fmt(e.get('deepep_nvl_GBps'), '.3f', 9)} {_fmt(e.get('x_ceiling'), '.2f', 7)} {match:>5}", file=file)
    print("MB: payload bytes sent, summed over ranks (meta: routing metadata, all links); GB/s: DeepEP accounting "
          "per rank (RDMA = (token, node) pairs incl. own node, NVL = received rows) x row bytes / median; "
          "x ceil: median / bare all_to_all_single of the same rows", file=file)
    if main.get("verified"):
        print(f"verified bit-exact: {', '.join(k for k, v in main['verified'].items() if v) or 'none'}", file=file)
    peaks = main.get("memory", {}).get("peak_rss_MiB_max_over_ranks")
    if peaks:
        print("peak RSS per rank while each group ran (max over ranks): "
              + ", ".join(f"{group} {mib} MiB" for group, mib in peaks.items()), file=file)
    if result.get("sweep"):
        print("\nsweep (DeepEP NVL-accounting GB/s per rank):", file=file)
        names = [n for n in result["sweep"][0]["ops"] if n not in ("layout", "ceiling count exchange")]
        short = {n: n.replace("dispatch", "disp").replace("combine", "comb").replace("ceiling", "ceil")
                 .replace("per_expert", "per-exp").replace("two_hop", "2hop") for n in names}
        print(f"{'tokens':>7} " + " ".join(f"{short[n]:>12}" for n in names), file=file)
        for case in result["sweep"]:
            print(f"{case['tokens']:>7} " + " ".join(
                _fmt((case["ops"].get(n) or {}).get("deepep_nvl_GBps"), ".3f", 12) for n in names), file=file)
    if result.get("gpu"):
        print(f"\nNVLink ceiling (measured once): {result['gpu']}", file=file)
    print(file=file)
    for t in result["targets"]:
        v = t["value"]
        vs = f"{v:.3f}" if isinstance(v, float) else str(v)
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['name']}: {vs} ({t['detail']})", file=file)


def print_targets_table(result: dict, file=sys.stdout) -> None:
    """Issue 14's targets over the sizes measured: ratio and PASS/MISS per column, then the times."""
    table, env = result["targets_table"], result["environment"]
    cols = list(table["definition"])
    print(f"targets (issue 14), {env['world_size']} ranks = {env['num_nodes']} x {env['nvl_ranks']}: "
          f"{table['ratio']}", file=file)
    for col, d in table["definition"].items():
        print(f"  {col:<14} {d['op']} / ({d['ceiling']}) <= {d['limit']}", file=file)
    print(f"  count exchange: one all_gather of {table['count_exchange_int64_words']} int64 per rank "
          f"(the agreement header's size)", file=file)
    def ratio_cell(e):
        return f"{'-':>14}" if e is None else f"{e['ratio']:>9.2f} {'PASS' if e['pass'] else 'MISS'}"

    def times_cell(e):
        if e is None:
            return f"{'-':>20}"
        trips = e.get("round_trips_per_call") or {}
        return f"{e['median_s'] * 1e3:.1f}/{e['ceiling_s'] * 1e3:.1f} ({trips.get('collectives', '?')})".rjust(20)

    def row_ratios(row):
        return f"{row['reps']:>4} {'yes' if row['paired'] else 'no':>4}"

    def row_count(row):
        count = row.get("count_exchange_s")
        return f"{'-' if count is None else f'{count * 1e3:.1f}':>6}"

    _print_size_table(table["rows"], cols, f"{'reps':>4} {'pair':>4}", row_ratios, ratio_cell, 14, file)
    print("\nmedian ms: epcomm op / its bare ops (collectives per call of the epcomm op); count: the bare count "
          "exchange", file=file)
    _print_size_table(table["rows"], cols, f"{'count':>6}", row_count, times_cell, 20, file)


def _print_size_table(rows: list[dict], cols: list[str], lead_head: str, lead, cell, width: int, file) -> None:
    """One line per (tokens x hidden) row: ``lead(row)`` then ``cell(entry)`` for each column (None: absent)."""
    head = f"{'tokens x hidden':<16} {lead_head} " + " ".join(f"{c:>{width}}" for c in cols)
    print(head, file=file)
    print("-" * len(head), file=file)
    for row in rows:
        print(f"{row['tokens']:>6} x {row['hidden']:<7} {lead(row)} " + " ".join(cell(row["columns"].get(c)) for c in cols),
              file=file)

def write_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["sweep"]
    if not sweep:
        return
    names = [n for n in sweep[0]["ops"] if n != "layout" and "cached" not in n]
    multi_node = result["environment"]["num_nodes"] > 1
    fig, axes = plt.subplots(1, 2 if multi_node else 1, figsize=(13 if multi_node else 7, 4.8), squeeze=False)
    panels = [("deepep_nvl_GBps", "NVLink accounting: received rows x row bytes / time")]
    if multi_node:
        panels.append(("deepep_rdma_GBps", "network accounting: (token, node) pairs x row bytes / time"))
    for ax, (key, title) in zip(axes[0], panels):
        for n in names:
            xs = [c["tokens"] for c in sweep if n in c["ops"] and c["ops"][n].get(key)]
            ys = [c["ops"][n][key] for c in sweep if n in c["ops"] and c["ops"][n].get(key)]
            if xs:
                style = "--" if n.startswith("ceiling") else (":" if n.startswith("per_expert") else "-")
                ax.plot(xs, ys, style, marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("GB/s per rank")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    env, cfg = result["environment"], result["config"]
    fig.suptitle(f"epcomm {cfg['backend']} backend, {env['world_size']} ranks = {env['num_nodes']}x{env['nvl_ranks']}, "
                 f"hidden {cfg['hidden']}, top-{cfg['topk']}/{cfg['experts']}, routing {cfg['routing']}, "
                 f"{'FP8' if cfg['fp8'] else 'BF16'} dispatch ({env['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
