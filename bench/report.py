"""A run's Markdown section, its plots, and the ratios between two runs (`--compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interactive_features.bench.judge import conformance_text
from interactive_features.runtime.buckets import format_size

PEER_LABELS = {
    "reference": "autograd reference",
    "naive": "naive per-layer autograd",
    "captum": "Captum LayerGradientXActivation",
    "torch-forward": "torch eager forward-only",
}


def label(case: dict[str, Any]) -> str:
    if case["kind"] == "peer":
        return PEER_LABELS[case["peer"]]
    if case["variant"] == "forward":
        return f"{case['target']} forward-only"
    if case["variant"] == "direct":
        return f"{case['target']} direct-conv"
    return case["target"]


def bucket_text(case: dict[str, Any]) -> str:
    return format_size((case["bucket"][0], case["bucket"][1]))


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(case: dict[str, Any], name: str) -> str:
    value = case.get("ratios", {}).get(name)
    return "-" if value is None else f"{value:.2f}x"


def markdown(run: dict[str, Any], json_path: Path | None = None) -> str:
    m, s = run["machine"], run["settings"]
    rates = ", ".join(f"{k} {v:.0f}" for k, v in run["matmul"].get("gflops", {}).items())
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    e = run["engine"]["export"]
    lines = [
        f"## {run['settings'].get('title') or 'interactive bench'}, {run['created']}",
        "",
        f"Machine: {m['cpu']}{gpu}, {s['threads']} threads of {m['cores']} usable cores, flags "
        f"{', '.join(m['flags']) or 'none'}; {versions}. Measured matmul GFLOP/s "
        f"({run['matmul']['device']}): {rates or 'n/a'}.",
        "",
        f"Command: `{run['command']}`" + (f" (JSON: `{json_path}`)" if json_path else "") + ".",
        f"Engine: {e['arch']} width 1/{e['width_div']}, `{e['config']}`, p = {e['p']}, "
        f"{len(e['layers'])} layers, weights {e['weights']}. {s['reps']} timed calls per case "
        f"after {s['warmup']} warm-up call(s), each case in a fresh process.",
        "",
        "| mode | case | bucket | batch | prec | ms/image p50 | ms/batch p50 / p90 / p99 / max "
        "| images/s | GFLOP/s | of matmul | vs reference | vs torch fwd | bwd eff. "
        "| conformance | peak RSS MB | load s | first call s |",
        "|" + "---|" * 17,
    ]
    shown = set()
    for case in run["cases"]:
        # A skipped backend's forward-only twin is skipped for the same reason: one row for both.
        key = (case["mode"], case["target"], bucket_text(case), case["batch"], case["precision"])
        if case.get("status") == "skipped" and key in shown:
            continue
        shown.add(key)
        lines.append(_row(case))
    lines += ["", *_conformance_lines(run), *_cost_lines(run), *_direct_lines(run)]
    lines += _target_lines(run)
    lines += _profile_lines(run)
    return "\n".join(lines) + "\n"


def _conformance_lines(run: dict[str, Any]) -> list[str]:
    lines = [
        "Conformance: each case's last outputs against the fp32 reference peer case of the same "
        "inputs in this run (`reference` for InterActive outputs, `torch-forward` for "
        "forward-only ones), judged by runtime/conformance.py at the case's precision "
        "(export/ALGORITHM.md section 6); the figure is the worst relative L2 error over its "
        'outputs. "not judged": the run has no such reference case.',
        "",
    ]
    for case in run["cases"]:
        verdict = case.get("conformance", {})
        if verdict.get("ok") is False:
            lines.append(f"- {label(case)} {case['mode']} {bucket_text(case)} batch "
                         f"{case['batch']} {case['precision']}: {verdict['summary']}")  # fmt: skip
    return lines if lines[-1] == "" else [*lines, ""]


def _row(case: dict[str, Any]) -> str:
    head = (
        f"| {case['mode']} | {label(case)} | {bucket_text(case)} | {case['batch']} "
        f"| {case['precision']} "
    )
    if case.get("status") != "ok":
        return head + f"| {case.get('status', '?')}: {case.get('reason', '')} |" + " |" * 11
    st = case["stats"]
    b = st["batch_s"]
    batch_ms = " / ".join(f"{b[k] * 1000:.0f}" for k in ("p50", "p90", "p99", "max"))
    fraction = st["matmul_fraction"]
    return head + (
        f"| {st['image_s']['p50'] * 1000:.1f} | {batch_ms} | {st['images_per_s']:.3g} "
        f"| {st['gflops']:.1f} | {_num(fraction and fraction * 100, '.0f')}% "
        f"| {_ratio(case, 'vs_reference')} | {_ratio(case, 'vs_torch_forward')} "
        f"| {_num(case['ratios'].get('backward_efficiency'), '.2f')} | {conformance_text(case)} "
        f"| {case['peak_rss_mb']:.0f} | {case['load_s']:.2f} | {case['first_call_s']:.2f} |"
    )


def _direct_lines(run: dict[str, Any]) -> list[str]:
    """The Winograd engine against its direct-convolution twin (`engine-direct`), same run."""
    lines = [
        f"- {label(c)} {c['mode']} {bucket_text(c)} batch {c['batch']} {c['precision']}: "
        f"{c['ratios']['vs_direct']:.2f}x the direct-convolution engine"
        for c in run["cases"]
        if "vs_direct" in c.get("ratios", {})
    ]
    if not lines:
        return []
    layers = run["engine"].get("winograd") or {}
    head = f"Winograd steps ({len(layers)} units: {', '.join(layers)}) against direct convolutions:"
    return [head, "", *lines, ""]


def _cost_lines(run: dict[str, Any]) -> list[str]:
    parts = []
    for bucket, c in run["cost"].items():
        i, f = c["interactive"], c["forward"]
        parts.append(
            f"{bucket}: {i['forward_gmac']:.1f} GMAC forward + {i['backward_gmac']:.1f} backward "
            f"= {i['gflop']:.1f} GFLOP (forward-only ORIG {f['gflop']:.1f} GFLOP)"
        )
    return ["Cost model per image (export/ALGORITHM.md section 7): " + "; ".join(parts) + ".", ""]


def _target_lines(run: dict[str, Any]) -> list[str]:
    if not run.get("targets"):
        return []
    by_id = {c["id"]: c for c in run["cases"]}
    lines = ["Targets (ratios from this run only):", ""]
    for t in run["targets"]:
        c = by_id[t["case"]]
        verdict = "met" if t["met"] else "MISSED"
        lines.append(
            f"- {label(c)} {c['mode']} {bucket_text(c)} batch {c['batch']} {c['precision']}: "
            f"{t['target']}: {t['value']:.2f} (limit {t['limit']}) {verdict}"
        )
    return [*lines, ""]


def _profile_lines(run: dict[str, Any], top: int = 8) -> list[str]:
    lines = []
    for p in run.get("profiles", []):
        if p.get("status") != "ok":
            lines += [
                f"Profile {label(p)} {bucket_text(p)}: {p.get('status')}: {p.get('reason')}",
                "",
            ]
            continue
        lines += [
            f"ONNX Runtime profile, {label(p)} {bucket_text(p)} batch {p['batch']} ({p['runs']} "
            f"runs, {p['run_ms']:.0f} ms per run, kernels {p['kernel_ms_per_run']:.0f} ms). "
            + conv_split(p, run["cost"][bucket_text(p)][p["variant"]]["gflop"]),
            "",
            "| op type | ms/run | share |",
            "|---|---|---|",
            *(
                f"| {r['name']} | {r['ms_per_run']:.1f} | {r['share'] * 100:.1f}% |"
                for r in p["by_op_type"][:top]
            ),
            "",
            "| node | op | ms/run | share |",
            "|---|---|---|---|",
            *(
                f"| {r['name']} | {r.get('op', '')} | {r['ms_per_run']:.1f} "
                f"| {r['share'] * 100:.1f}% |"
                for r in p["by_node"][:top]
            ),
            "",
        ]
    return lines


CONV_OPS = ("Conv", "FusedConv", "ConvTranspose")  # the ops that carry the cost model's FLOPs


def conv_split(profile: dict[str, Any], gflop_per_image: float) -> str:
    """Where the time goes: convolutions (and their rate over the model's FLOPs) vs the rest."""
    conv = sum(r["ms_per_run"] for r in profile["by_op_type"] if r["name"] in CONV_OPS)
    rest = profile["kernel_ms_per_run"] - conv
    rate = gflop_per_image * profile["batch"] / (conv / 1000) if conv else 0.0
    share = rest / profile["kernel_ms_per_run"] if profile["kernel_ms_per_run"] else 0.0
    return (
        f"Convolutions {conv:.0f} ms ({rate:.1f} GFLOP/s over the cost model's FLOPs); all other "
        f"ops {rest:.0f} ms ({share * 100:.0f}% of kernel time)."
    )


def append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("\n" + text)


# Which latency percentiles a case's bar chart shows, by its sample count n: a percentile q is
# drawn only when some sample lies above its rank (numpy's linear rank q/100 * (n - 1) is below
# n - 2), i.e. n >= 100 / (100 - q) + 1: p90 from 11 samples, p99 from 101. With fewer samples it
# is an interpolation between the two largest samples and says nothing that max does not. p50 is
# always drawn, max from 2 samples (with one it is p50).
LATENCY_BARS = ("p50", "p90", "p99", "max")


def shown_percentiles(n: int) -> list[str]:
    """The latency bars (of LATENCY_BARS) that differ from one another with `n` samples."""
    shown = ["p50"] if n >= 1 else []
    for q in (90, 99):
        if n >= 100 / (100 - q) + 1:
            shown.append(f"p{q}")
    return shown + (["max"] if n >= 2 else [])


def plots(run: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Throughput vs batch size (a colour per case, a line style and marker per bucket, each
    with its own legend) and latency per image (the bars of `shown_percentiles`, n per case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in run["cases"] if c.get("status") == "ok"]
    throughput = out / f"{stem}-throughput.png"
    _throughput_plot(plt, ok, throughput)
    latency = out / f"{stem}-latency.png"
    _latency_plot(plt, ok, latency)
    return [throughput, latency]


def _throughput_plot(plt: Any, ok: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.lines import Line2D

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for c in ok:
        key = (f"{label(c)} {c['mode']} {c['precision']}", bucket_text(c))
        series.setdefault(key, []).append((c["batch"], c["stats"]["images_per_s"]))
    # One colour per case, one line style + marker per bucket (20 distinct pairs): 16+ series
    # stay tellable apart, and the bucket legend says which style is which bucket.
    cases = sorted({case for case, _ in series})
    buckets = sorted({bucket for _, bucket in series})
    colours = plt.get_cmap("tab10" if len(cases) <= 10 else "tab20").colors
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v"]

    def colour(case: str) -> Any:
        return colours[cases.index(case) % len(colours)]

    def style(bucket: str) -> dict[str, str]:
        k = buckets.index(bucket)
        return {"linestyle": styles[k % len(styles)], "marker": markers[k % len(markers)]}

    fig, ax = plt.subplots(figsize=(10, 5))
    for (case, bucket), points in sorted(series.items()):
        points.sort()
        xs, ys = [b for b, _ in points], [v for _, v in points]
        ax.plot(xs, ys, color=colour(case), **style(bucket))
    ax.set(xlabel="batch size", ylabel="images/s", title="Throughput vs batch size")
    ax.set_xticks(sorted({b for points in series.values() for b, _ in points}))
    case_handles = [Line2D([], [], color=colour(c), linewidth=3) for c in cases]
    legend = ax.legend(case_handles, cases, title="case (colour)", fontsize=7,
                       loc="upper left", bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    ax.add_artist(legend)
    bucket_handles = [Line2D([], [], color="0.3", **style(b)) for b in buckets]
    second = ax.legend(bucket_handles, buckets, title="bucket (line, marker)", fontsize=7,
                       handlelength=4, loc="lower left", bbox_to_anchor=(1.01, 0.0))  # fmt: skip
    # Both legends inside the saved area (the first, re-added by hand, is not counted otherwise).
    fig.savefig(path, dpi=100, bbox_inches="tight", bbox_extra_artists=[legend, second])
    plt.close(fig)


def _latency_plot(plt: Any, ok: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(9, max(3, 0.35 * len(ok) + 1)))
    colours = dict(zip(LATENCY_BARS, plt.get_cmap("tab10").colors, strict=False))
    names, ticks, drawn = [], [], set()
    for i, c in enumerate(ok):
        n = len(c.get("samples_s") or [])
        names.append(
            f"{label(c)} {c['mode']} {bucket_text(c)} b{c['batch']} {c['precision']} (n={n})"
        )
        shown = shown_percentiles(n)
        height = 0.8 / max(1, len(shown))
        for j, percentile in enumerate(shown):
            ms = c["stats"]["image_s"][percentile] * 1000
            ax.barh(i + j * height, ms, height=height, color=colours[percentile])
        ticks.append(i + (len(shown) - 1) * height / 2)
        drawn.update(shown)
    ax.set_yticks(ticks, names, fontsize=7)
    ax.set(
        xlabel="ms per image",
        title="Latency per image (p90 drawn from 11 samples, p99 from 101; n per case)",
    )
    order = [p for p in LATENCY_BARS if p in drawn]
    if order:
        ax.legend([Patch(color=colours[p]) for p in order], order, title="percentile")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def case_key(case: dict[str, Any]) -> tuple[Any, ...]:
    return (case["mode"], label(case), bucket_text(case), case["batch"], case["precision"],
            case["device"])  # fmt: skip


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Per matching case, B / A of images/s and A / B of per-image p50 (> 1: B is faster)."""
    cases_a = {case_key(c): c for c in a["cases"] if c.get("status") == "ok"}
    lines = [
        f"A: {a['created']} on {a['machine']['cpu']} (`{a['command']}`)",
        f"B: {b['created']} on {b['machine']['cpu']} (`{b['command']}`)",
        "Different machines or days: compare the within-run ratios, not the times.",
        "",
        "| mode | case | bucket | batch | prec | A ms/image | B ms/image | B speed-up | "
        "A vs reference | B vs reference |",
        "|" + "---|" * 10,
    ]
    matched = 0
    for c in b["cases"]:
        other = cases_a.get(case_key(c))
        if c.get("status") != "ok" or other is None:
            continue
        matched += 1
        ta, tb = other["stats"]["image_s"]["p50"], c["stats"]["image_s"]["p50"]
        lines.append(
            f"| {c['mode']} | {label(c)} | {bucket_text(c)} | {c['batch']} | {c['precision']} "
            f"| {ta * 1000:.1f} | {tb * 1000:.1f} | {ta / tb:.2f}x "
            f"| {_ratio(other, 'vs_reference')} | {_ratio(c, 'vs_reference')} |"
        )
    if not matched:
        lines.append("| (no case in both runs) |" + " |" * 9)
    return "\n".join(lines)
