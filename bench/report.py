"""Render ``nova-fast bench`` results: the console table, the Markdown report and the PNG chart."""
from __future__ import annotations

from pathlib import Path

from nova_fast.bench.case import format_seconds

STAGE_COLUMNS = ("temporal", "spatial", "head", "other", "total")


def _fmt_ratio(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _fmt_ops(entry: dict) -> str:
    if entry.get("ops_per_call") is not None:
        ops = str(entry["ops_per_call"])
        if entry.get("ops_ratio") not in (None, 1.0):
            ops += f" ({entry['ops_ratio']:.2f}x fewer)" if entry["ops_ratio"] > 1 else f" ({1 / entry['ops_ratio']:.2f}x more)"
    elif entry.get("compiled_graph_calls") is not None:
        ops = f"{entry['compiled_graph_calls']} graphs"   # compiled: graph calls, not ATen ops
    else:
        ops = "-"
    if entry.get("kernels_per_call") is not None:
        ops += f" / {entry['kernels_per_call']}"
    return ops


def _fmt_metrics(metrics: dict) -> str:
    parts = []
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def rows(results: dict) -> list[dict]:
    """One row per (case, implementation), unavailable ones included."""
    out = []
    for case in results["cases"]:
        if case.get("error") and not case["impls"]:
            out.append({"case": case["id"], "impl": "-", "median": "-", "ratio": "-", "ops": "-",
                        "metrics": f"ERROR {case['error']}"})
            continue
        for i, (label, entry) in enumerate(case["impls"].items()):
            metrics = dict(case.get("metrics") or {}) if i == 0 else {}   # case metrics once per case
            metrics.update({k: v for k, v in (entry.get("metrics") or {}).items() if not isinstance(v, dict)})
            out.append({"case": case["id"], "impl": label + (" (baseline)" if label == case["baseline"] else ""),
                        "median": format_seconds(entry.get("median_s")), "ratio": _fmt_ratio(entry.get("speedup")),
                        "ops": _fmt_ops(entry),
                        "metrics": _fmt_metrics(metrics)})
        for label, reason in case["unavailable"].items():
            out.append({"case": case["id"], "impl": label, "median": "n/a", "ratio": "n/a", "ops": "n/a",
                        "metrics": f"unavailable: {reason}"})
    return out


HEADERS = {"case": "case", "impl": "implementation", "median": "median", "ratio": "speed-up vs baseline",
           "ops": "ATen ops/call", "metrics": "metrics"}
HEADERS_GPU = {**HEADERS, "ops": "ATen ops / GPU kernels per call"}


def _headers(results: dict) -> dict:
    return HEADERS_GPU if results.get("environment", {}).get("gpu") else HEADERS


def table(results: dict) -> str:
    """Fixed-width console table (metrics column last, not padded)."""
    data = rows(results)
    headers = _headers(results)
    keys = list(headers)
    widths = {k: max([len(headers[k])] + [len(r[k]) for r in data]) for k in keys[:-1]}
    line = lambda r: "  ".join(r[k].ljust(widths[k]) if k in ("case", "impl") else r[k].rjust(widths[k])  # noqa: E731
                               for k in keys[:-1]) + "  " + r["metrics"]
    out = [line(headers), "  ".join("-" * widths[k] for k in keys[:-1]) + "  " + "-" * 7]
    out += [line(r) for r in data]
    return "\n".join(out)


def stage_splits(results: dict, key: str = "per_frame_s") -> list[tuple[str, str, dict]]:
    """(case id, implementation, per-frame split per stage) for every case that reports ``key``
    (``per_frame_s``: seconds; ``ops_per_frame``: ATen ops)."""
    out = []
    for case in results["cases"]:
        for label, entry in case["impls"].items():
            split = (entry.get("metrics") or {}).get(key)
            if split:
                out.append((case["id"], label, split))
    return out


def stage_table(results: dict, markdown: bool = False, key: str = "per_frame_s") -> str:
    """Per-frame split temporal / spatial encoder / diffusion head (the paper's table shape) of
    latency (``per_frame_s``) or of ATen ops (``ops_per_frame``)."""
    splits = stage_splits(results, key)
    if not splits:
        return ""
    fmt_value = format_seconds if key == "per_frame_s" else (lambda v: "n/a" if v is None else f"{v:.0f}")
    header = ["case", "implementation", *[f"{c} / frame" for c in STAGE_COLUMNS]]
    body = []
    for case_id, label, split in splits:
        total = split.get("total") or sum(split.get(c, 0.0) for c in STAGE_COLUMNS[:-1]) or float("nan")
        cells = []
        for col in STAGE_COLUMNS:
            value = split.get(col)
            share = "" if col == "total" or value is None else f" ({100 * value / total:.0f}%)"
            cells.append(fmt_value(value) + share)
        body.append([case_id, label, *cells])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * len(STAGE_COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in body]])


def summary(results: dict) -> str:
    env = results["environment"]
    opts = results["options"]
    device = env["gpu"] or f"CPU ({env['cpu']}, {env['cpu_count']} cores, {env['torch_threads']} torch threads)"
    return (f"device: {device}; torch {env['torch']}, triton {env['triton'] or 'absent'}; "
            f"{'quick' if opts['quick'] else 'full'} run, budget {opts['budget_s']:g} s per implementation, "
            f"at least {opts['min_runs']} runs; total {results['total_s']:.0f} s")


def console(results: dict) -> str:
    parts = [summary(results), "", table(results)]
    split = stage_table(results)
    if split:
        parts += ["", "Per-frame split of generation (temporal encoder / spatial encoder / diffusion head):", split]
    ops = stage_table(results, key="ops_per_frame")
    if ops:
        parts += ["", "ATen ops per frame, same split:", ops]
    bad = {op: s for op, s in results["suites"].items() if s != "ok"}
    if bad:
        parts += ["", *[f"suite {op}: {s}" for op, s in bad.items()]]
    return "\n".join(parts)


def markdown(results: dict) -> str:
    data = rows(results)
    lines = [f"# nova-fast bench ({results['device']}, {results['created']})", "", summary(results), "",
             "Speed-up = baseline median / implementation median (2.00x: twice as fast). "
             "ATen ops/call: ops one call dispatches (each one or more kernel launches on a GPU).", "",
             "| " + " | ".join(_headers(results).values()) + " |", "|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(r[k].replace("|", "/") for k in HEADERS) + " |" for r in data]
    split = stage_table(results, markdown=True)
    if split:
        lines += ["", "## Per-frame split of generation", "",
                  "Stage times from forward hooks on `video_encoder`, `image_encoder`, `image_decoder` "
                  "(nova_fast.profiling); other = the rest of the generation loop.", "", split]
    ops = stage_table(results, markdown=True, key="ops_per_frame")
    if ops:
        lines += ["", "## ATen ops per frame, same split", "", ops]
    lines += ["", "## Sizes", "", "| case | baseline | sizes |", "|---|---|---|"]
    for case in results["cases"]:
        sizes = ", ".join(f"{k}={v}" for k, v in case["sizes"].items())
        lines.append(f"| {case['id']} | {case['baseline']} | {sizes} |")
    notes = [f"- suite `{op}`: {s}" for op, s in results["suites"].items() if s != "ok"]
    notes += [f"- {c['id']}: {c['error']}" for c in results["cases"] if c.get("error")]
    for case in results["cases"]:
        for label, entry in case["impls"].items():
            for key in ("compile_s", "compile_warning", "ops_error", "kernels_error"):
                value = entry.get(key, (entry.get("metrics") or {}).get(key))
                if value is not None:
                    notes.append(f"- {case['id']} {label}: {key} = {value}")
    if notes:
        lines += ["", "## Notes", "", *notes]
    env = results["environment"]
    lines += ["", "## Environment", "", *[f"- {k}: {v}" for k, v in env.items()], ""]
    return "\n".join(lines)


def chart(results: dict, path: Path | str) -> None:
    """Bar chart of speed-ups (log scale, 1x marked); a second panel with the per-frame split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 -- makes matplotlib.ticker an attribute

    bars = [(f"{c['id']}\n{label}", e["speedup"]) for c in results["cases"] for label, e in c["impls"].items()
            if label != c["baseline"] and e.get("speedup")]
    splits = stage_splits(results)
    panels = 1 + bool(splits)
    height = max(3.0, 0.45 * max(len(bars), 1) + 1.5) + (0.4 * len(splits) + 1.5 if splits else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(10, height), squeeze=False,
                             gridspec_kw={"height_ratios": [max(len(bars), 1), max(len(splits), 1)][:panels]})
    ax = axes[0][0]
    if bars:
        labels, values = zip(*bars)
        colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(min(min(values), 1.0) / 1.6, max(max(values), 1.0) * 1.6)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no implementation to compare with its baseline", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"nova-fast bench ({results['device']}): speed-up vs baseline (higher is faster)", fontsize=9)
    if splits:
        ax2 = axes[1][0]
        left = [0.0] * len(splits)
        for stage, color in zip(STAGE_COLUMNS[:-1], ("tab:blue", "tab:orange", "tab:purple", "tab:gray")):
            widths = [s.get(stage, 0.0) * 1e3 for _, _, s in splits]
            ax2.barh(range(len(splits)), widths, left=left, color=color, label=stage)
            left = [a + b for a, b in zip(left, widths)]
        ax2.set_yticks(range(len(splits)), [f"{c}\n{label}" for c, label, _ in splits], fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlabel("ms per latent frame")
        ax2.legend(fontsize=7, loc="lower right")
        ax2.set_title("generation: per-frame split", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
