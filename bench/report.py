"""Benchmark reports: a terminal table, JSON, Markdown and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from bench.harness import Record


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows(summary: dict[str, dict]) -> list[list[str]]:
    """Table rows: method, category, new tokens, seconds, tok/s, speedup, MAT (mean accepted tokens
    per verify step), identical to baseline, max logit gap at a divergence from the baseline, mean
    verified tree size, drafting ms per step."""
    table = []
    for method, figures in summary.items():
        for category, cat in list(figures["per_category"].items()) + [("overall", figures)]:
            table.append([
                method,
                category,
                str(cat["new_tokens"]),
                _fmt(cat["seconds"], ".1f"),
                _fmt(cat["tok_per_s"], ".1f"),
                _fmt(cat["speedup"], ".2f") + ("x" if cat["speedup"] is not None else ""),
                _fmt(cat["mat"], ".2f"),
                _fmt(None if cat["identical_fraction"] is None else 100 * cat["identical_fraction"], ".0f")
                + ("%" if cat["identical_fraction"] is not None else ""),
                _fmt(cat["max_divergence_margin"], ".3f"),
                _fmt(cat["mean_tree_size"], ".1f"),
                _fmt(cat["draft_ms_per_step"], ".2f"),
            ])
    return table


HEADER = ["method", "category", "new tokens", "seconds", "tok/s", "speedup", "MAT", "identical", "max gap",
          "tree", "draft ms"]


def print_table(summary: dict[str, dict], title: str = "") -> None:
    """A readable table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for i, name in enumerate(HEADER):
        table.add_column(name, justify="left" if i < 2 else "right")
    previous = None
    for row in rows(summary):
        if previous is not None and row[0] != previous:
            table.add_section()
        previous = row[0]
        table.add_row(*row, style="bold" if row[1] == "overall" else None)
    Console(width=120).print(table)


def markdown(summary: dict[str, dict], config: dict) -> str:
    """A Markdown table with the run's configuration as a caption."""
    caption = ", ".join(f"{k}={v}" for k, v in config.items() if v is not None)
    lines = [f"_{caption}_", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(summary)]
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, config: dict, records: list[Record], summary: dict) -> None:
    """``{"config", "results", "summary"}`` as documented for ``specdec bench --json``."""
    payload = {"config": config, "results": [r.as_json() for r in records], "summary": summary}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def plot(path: str | Path, summary: dict[str, dict], title: str = "") -> None:
    """Bars of speedup over baseline per category and method, and of MAT per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(summary)
    categories = list(next(iter(summary.values()))["per_category"]) + ["overall"]
    fig, (ax_speed, ax_mat) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(categories))
    for i, method in enumerate(methods):
        per = summary[method]["per_category"]
        values = [(per[c] if c != "overall" else summary[method])["speedup"] or 0.0 for c in categories]
        ax_speed.bar(x + i * width - 0.4 + width / 2, values, width, label=method)
    ax_speed.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax_speed.set_xticks(x, categories, rotation=30, ha="right")
    ax_speed.set_ylabel("speedup over baseline (tok/s ratio)")
    ax_speed.legend(fontsize=8)
    mats = [summary[m]["mat"] or 0.0 for m in methods]
    ax_mat.bar(methods, mats, color="tab:green")
    ax_mat.set_ylabel("mean accepted tokens per step")
    ax_mat.tick_params(axis="x", rotation=30)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_explanation(methods, records: list[Record]) -> None:
    """Per specdec method: nodes proposed / accepted by each drafter and the scheduler's beliefs."""
    from rich.console import Console

    console = Console(width=120)
    for method in methods:
        if method.decoder is None:
            continue
        totals: dict[str, dict[str, int]] = {}
        for record in records:
            if record.method != method.name or not record.per_drafter:
                continue
            for drafter, counts in record.per_drafter.items():
                mine = totals.setdefault(drafter, {"proposed": 0, "accepted": 0})
                mine["proposed"] += counts["proposed"]
                mine["accepted"] += counts["accepted"]
        console.print(f"[bold]{method.name}[/bold]")
        for drafter, counts in totals.items():
            rate = counts["accepted"] / counts["proposed"] if counts["proposed"] else 0.0
            console.print(f"  {drafter}: {counts['accepted']} of {counts['proposed']} verified nodes accepted "
                          f"({100 * rate:.1f}%)")
        decoder = method.decoder
        beliefs = decoder.scheduler.explain(512, decoder.source_names)
        console.print(f"  scheduler: overhead {beliefs['overhead_ms']} ms/step, context slope "
                      f"{beliefs['ms_per_1k_context']} ms per 1k tokens, {beliefs['probes']} probes")
        console.print("  fitted verify ms by tree size (context 512, ± standard error): " + ", ".join(
            f"{size}: {ms}±{beliefs['verify_ms_error'].get(size, 0)}" for size, ms in beliefs["verify_ms"].items()
            if ms is not None))
        console.print(f"  measured sizes (steps kept): {beliefs['measured']}")
        for drafter, worth in beliefs["drafters"].items():
            console.print(f"  drafter {drafter}: {'running' if worth['running'] else 'skipped'}; per step it drafted "
                          f"({worth['steps']} steps): its own accepted tokens worth {worth['value_ms']} ms, drafting "
                          f"{worth['propose_ms']} ms, merging {worth['merge_ms']} ms, its own verified nodes "
                          f"{worth['verify_ms']} ms: net {worth['net_ms']} ms")
        if beliefs["drafters"]:
            console.print(f"  drafter steps skipped: {beliefs['drafter_skips']}")
        for drafter, cal in beliefs["calibration"].items():
            console.print(f"  calibration {drafter}: {cal['accepted_per_value']} accepted per unit of value; "
                          f"prediction error raw {100 * cal['error_raw']:.0f}% -> calibrated "
                          f"{100 * cal['error_calibrated']:.0f}%; depth factors {cal['by_depth']}")
