"""Bar charts of benchmark result files: throughputs, ratios to `cp` or to native, stage times,
store ratios.

One or more result files (``bench/results/*.json``) go into one PNG; several files show side
by side (one colour each), to compare commits or machines. matplotlib is a bench-only
dependency: ``pip install -e '.[bench]'``.

    /tmp/venv/bin/python bench/plot.py bench/results/ingest-*.json -o ingest.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after matplotlib.use: the backend must be chosen first

MB = 1_000_000
CP_NAME = "cp + fsync"


def load(paths: list[Path]) -> list[dict[str, Any]]:
    docs = []
    for path in paths:
        doc = json.loads(path.read_text())
        doc["_label"] = (f"{doc.get('timestamp', path.stem)} "
                         f"({doc.get('machine', {}).get('hubfs_commit', '?')})")
        docs.append(doc)
    return docs


def _names(docs: list[dict[str, Any]], stages: bool) -> list[str]:
    names: list[str] = []
    for doc in docs:
        for m in doc["measurements"]:
            if m["name"].startswith("stage ") == stages and m["name"] not in names:
                names.append(m["name"])
    return names


def _by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in doc["measurements"]}


def _grouped_barh(ax: Any, names: list[str], series: list[tuple[str, list[float | None]]],
                  errors: list[list[float | None]] | None = None, room: float = 1.12) -> None:
    """Horizontal bars, one group per name, one bar per series; first name at the top.

    ``room``: the x axis reaches this times the longest bar, leaving space for labels.
    """
    n = len(series)
    longest = max((v + (e or 0.0) for k, (_, values) in enumerate(series)
                   for v, e in zip((v or 0.0 for v in values),
                                   errors[k] if errors else [0.0] * len(values))), default=1.0)
    ax.set_xlim(0, max(longest, 1e-9) * room)
    height = 0.8 / n
    for k, (label, values) in enumerate(series):
        ys = [i + (k - (n - 1) / 2) * height for i in range(len(names))]
        vals = [v if v is not None else 0.0 for v in values]
        bars = ax.barh(ys, vals, height=height * 0.95, label=label)
        if errors is not None:
            xerr = [e if e is not None else 0.0 for e in errors[k]]
            ax.errorbar([v + e for v, e in zip(vals, xerr)], ys, fmt="|", color="black",
                        markersize=6, linestyle="none")
        ends = ([v + (e or 0.0) for v, e in zip(vals, errors[k])] if errors is not None
                else vals)
        for bar, v, end in zip(bars, values, ends):
            if v is not None:
                ax.text(end, bar.get_y() + bar.get_height() / 2, f" {v:,.0f}"
                        if v >= 10 else f" {v:.2f}", va="center", fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def plot_versus_native(docs: list[dict[str, Any]], out: Path) -> None:
    """Result files with ``versus_native`` rows (untar, fsstress, inplace): operations a
    second on each side, and the hubfs/native time ratio against its target."""
    names: list[str] = []
    for doc in docs:
        for row in doc["versus_native"]:
            if row["name"] not in names:
                names.append(row["name"])
    rows = [{r["name"]: r for r in doc["versus_native"]} for doc in docs]
    height = 0.45 * len(names) * len(docs) ** 0.5 + 1.5
    fig, axes = plt.subplots(2, 1, figsize=(11, 2 * height + 1.5))
    first = docs[0]
    facts = first.get("machine", {})
    fig.suptitle(f"hubfs {first.get('benchmark', '')}: {facts.get('cpu_count')} cpus, "
                 f"kernel {facts.get('kernel')}, native on "
                 f"{first.get('native_filesystem', '?')}", fontsize=11)

    ax = axes[0]
    series: list[tuple[str, list[float | None]]] = []
    for doc, by in zip(docs, rows):
        suffix = f" {doc['_label']}" if len(docs) > 1 else ""
        for side in ("native", "hubfs"):
            series.append((side + suffix, [by[n].get(f"{side}_per_s") if n in by else None
                                           for n in names]))
    _grouped_barh(ax, [f"{n} ({rows[0][n]['unit']}/s)" if n in rows[0] else n for n in names],
                  series, room=1.25)
    values = [v for _, vs in series for v in vs if v]
    ax.set_xscale("log")
    if values:
        ax.set_xlim(min(values) / 2, max(values) * 4)
    ax.set_xlabel("operations a second (median run; log scale; missing bar: did not finish)")
    ax.set_title("rate", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[1]
    series = [(doc["_label"], [by[n].get("ratio") if n in by else None for n in names])
              for doc, by in zip(docs, rows)]
    _grouped_barh(ax, names, series, room=1.2)
    ratios = [v for _, vs in series for v in vs if v]
    if ratios and max(ratios) / min(ratios) > 50:  # orders of magnitude apart: log scale
        ax.set_xscale("log")
        ax.set_xlim(min(min(ratios), 1.0) / 2, max(ratios) * 4)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    for i, name in enumerate(names):
        target = rows[0].get(name, {}).get("target_ratio")
        if target:
            ax.plot([target, target], [i - 0.45, i + 0.45], color="red", linewidth=2)
            ax.text(target, i - 0.45, f"target {target:g}x", color="red", fontsize=7,
                    ha="center", va="bottom")
    ax.set_xlabel("hubfs time / native time (median; red line: target)")
    ax.set_title("ratio to the same work on the native filesystem", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot(docs: list[dict[str, Any]], out: Path) -> None:
    if any("versus_native" in doc for doc in docs):
        plot_versus_native([doc for doc in docs if "versus_native" in doc], out)
        return
    names = _names(docs, stages=False)
    stage_names = _names(docs, stages=True)
    has_stats = any(doc.get("store_stats") for doc in docs)
    kinds = {n.split(":")[0] for n in stage_names}
    n_stores = len({name for doc in docs for name in doc.get("store_stats", {})})
    panels = 2 + bool(stage_names) + has_stats
    heights = [float(len(names)) * len(docs) ** 0.5] * 2
    if stage_names:
        heights.append(1.2 * len(kinds) * len(docs) + 1.5)
    if has_stats:
        heights.append(0.6 * n_stores * len(docs) + 1.0)
    fig, axes = plt.subplots(panels, 1, figsize=(11, 2 + 0.32 * sum(heights) + 1.2 * panels),
                             gridspec_kw={"height_ratios": heights})
    first = docs[0]
    facts = first.get("machine", {})
    fig.suptitle(f"hubfs {first.get('benchmark', '')}: {facts.get('cpu_count')} cpus, "
                 f"kernel {facts.get('kernel')}, python {facts.get('python')}", fontsize=11)

    # throughput (median; the tick marks the best run)
    ax = axes[0]
    series, errors = [], []
    for doc in docs:
        by = _by_name(doc)
        series.append((doc["_label"], [by[n]["mbps_median"] if n in by else None for n in names]))
        errors.append([by[n]["mbps_best"] - by[n]["mbps_median"] if n in by else None
                       for n in names])
    _grouped_barh(ax, names, series, errors)
    for name, target in first.get("targets_mbps", {}).items():
        if name in names:
            i = names.index(name)
            ax.plot([target, target], [i - 0.45, i + 0.45], color="red", linewidth=2)
            ax.text(target, i - 0.45, f"target {target:,.0f}", color="red", fontsize=7,
                    ha="center", va="bottom")
    ax.set_xlabel("MB/s (bar: median run, tick: best run, red line: target)")
    ax.set_title("throughput", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")

    # ratio to cp + fsync of the same file
    ax = axes[1]
    series = []
    for doc in docs:
        by = _by_name(doc)
        cp = by.get(CP_NAME, {}).get("mbps_median")
        series.append((doc["_label"], [by[n]["mbps_median"] / cp if n in by and cp else None
                                       for n in names]))
    _grouped_barh(ax, names, series)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(f"throughput / '{CP_NAME}' throughput (median)")
    ax.set_title("ratio to cp on the same disk", fontsize=10)

    panel = 2
    if stage_names:
        # seconds per stage, stacked, per file kind and result file
        ax = axes[panel]
        panel += 1
        rows, labels = [], []
        for doc in docs:
            by = _by_name(doc)
            for kind in sorted({n.split(":")[0] for n in stage_names}):
                stages = [n for n in stage_names if n.startswith(kind + ":")
                          and not n.endswith("xxh3 sums")]
                total = sum(by[n]["median_s"] for n in stages if n in by)
                mb = by[stages[0]]["bytes"] / MB if stages and stages[0] in by else 0
                rows.append([(n.split(": ", 1)[1], by[n]["median_s"]) for n in stages if n in by])
                labels.append(f"{kind.removeprefix('stage ')} {mb:.0f} MB: {total:.2f} s"
                              + (f"\n{doc['_label']}" if len(docs) > 1 else ""))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        stage_order: list[str] = []
        for row in rows:
            for stage, _ in row:
                if stage not in stage_order:
                    stage_order.append(stage)
        for i, row in enumerate(rows):
            total = sum(s for _, s in row) or 1.0
            left = 0.0
            for stage, seconds in row:
                color = colors[stage_order.index(stage) % len(colors)]
                share = seconds / total
                ax.barh(i, share, left=left, color=color,
                        label=stage if i == 0 else None)
                if share > 0.06:
                    ax.text(left + share / 2, i, f"{stage}\n{seconds:.2f}s", ha="center",
                            va="center", fontsize=7)
                left += share
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the summed stage times (stages run one after another)")
        ax.set_title("where an import's time goes", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    if has_stats:
        ax = axes[panel]
        stores: list[str] = []
        for doc in docs:
            for name in doc.get("store_stats", {}):
                if name not in stores:
                    stores.append(name)
        series = []
        for doc in docs:
            st = doc.get("store_stats", {})
            for key, title in (("dedup_ratio", "dedup"), ("compression_ratio", "compression")):
                series.append((f"{title}" + (f" {doc['_label']}" if len(docs) > 1 else ""),
                               [st[s][key] if s in st else None for s in stores]))
        _grouped_barh(ax, stores, series, room=1.35)
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("ratio (logical / unique bytes; unique / stored chunk bytes)")
        ax.set_title("store: dedup and compression", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="result JSON files")
    parser.add_argument("-o", "--out", type=Path,
                        help="PNG to write (default: the first result file with .png)")
    args = parser.parse_args(argv)
    out = args.out or args.results[0].with_suffix(".png")
    plot(load(args.results), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
