"""One report per run: every model × every measure, in the shape of the paper's Table 1.

Rows are models (pivot, sources, targets, merges), columns the MT-Bench
categories and their average, then the offline measures (held-out NLL per
data source, exact match per task). Written as ``report.md``, ``report.json``
and PNG plots (matplotlib's Agg backend: no display needed).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fusechat_core.evaluate.mt_bench import CATEGORIES

FIGSIZE = (10.0, 5.0)  # inches
DPI = 100  # so every plot is exactly 1000 × 500 pixels
RESULTS_FILE = "results.json"
_LABELS = {"stem": "STEM"}  # as the paper's Table 1 writes it


def _fmt(x: Any, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def columns(results: Mapping[str, dict]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(group, header, path into a model's results) for every measure any model has."""
    cols: list[tuple[str, str, tuple[str, ...]]] = []
    cats: list[str] = []
    nll_src: list[str] = []
    em_src: list[str] = []
    for r in results.values():
        mt = r.get("mt_bench") or {}
        for c in mt.get("categories", {}):
            if c not in cats:
                cats.append(c)
        for s in (r.get("heldout_nll") or {}).get("sources", {}):
            if s not in nll_src:
                nll_src.append(s)
        for s in (r.get("exact_match") or {}).get("sources", {}):
            if s not in em_src:
                em_src.append(s)
    if cats:
        order = [c for c in CATEGORIES if c in cats] + sorted(c for c in cats if c not in CATEGORIES)
        cols += [("MT-Bench", _LABELS.get(c, c.capitalize()), ("mt_bench", "categories", c)) for c in order]
        cols.append(("MT-Bench", "Avg.", ("mt_bench", "average")))
        cols.append(("MT-Bench", "unparsable", ("mt_bench", "unparsable")))
    if nll_src:
        cols += [("held-out NLL", f"NLL {s}", ("heldout_nll", "sources", s, "nll")) for s in sorted(nll_src)]
        cols.append(("held-out NLL", "NLL all", ("heldout_nll", "all", "nll")))
        # comparable across tokenizers, unlike per-token NLL
        cols.append(("bits per byte", "BPB all", ("heldout_nll", "all", "bits_per_byte")))
    if em_src:
        cols += [("exact match", f"EM {s}", ("exact_match", "sources", s, "accuracy")) for s in sorted(em_src)]
        cols.append(("exact match", "EM all", ("exact_match", "all", "accuracy")))
    return cols


def _get(d: Any, path: Sequence[str]) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def markdown_table(results: Mapping[str, dict]) -> str:
    cols = columns(results)
    lines = ["| " + " | ".join(["model"] + [h for _, h, _ in cols]) + " |",
             "|" + "|".join(["---"] + ["---:" for _ in cols]) + "|"]
    for name, r in results.items():
        cells = [name]
        for _, h, path in cols:
            v = _get(r, path)
            digits = 3 if "NLL" in h or "BPB" in h else 2
            cells.append(str(v) if h == "unparsable" and v is not None else _fmt(v, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _grouped_bars(ax: Any, groups: list[str], series: Mapping[str, list[float | None]], ylabel: str) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, vals) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=min(n, 4))


def _figure() -> tuple[Any, Any]:
    # A bare Figure renders PNGs with the Agg canvas and never touches pyplot's global
    # backend or figure list: no display needed, safe in worker threads.
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches: the size stays FIGSIZE × DPI
    return path


def plot_results(results: Mapping[str, dict], loss_histories: Mapping[str, Sequence[dict]] | None,
                 out_dir: str | Path) -> list[Path]:
    """PNG plots of whichever measures the results hold; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    cols = columns(results)
    for group, fname, ylabel in (("MT-Bench", "mt_bench_categories.png", "score (1-10)"),
                                 ("held-out NLL", "heldout_nll.png", "NLL per supervised token"),
                                 ("exact match", "exact_match.png", "accuracy")):
        gcols = [(h, p) for g, h, p in cols if g == group and h != "unparsable"]
        if not gcols:
            continue
        fig, ax = _figure()
        series = {name: [_get(r, p) for _, p in gcols] for name, r in results.items()}
        series = {name: vals for name, vals in series.items() if any(v is not None for v in vals)}
        _grouped_bars(ax, [h.replace("NLL ", "").replace("EM ", "") for h, _ in gcols], series, ylabel)
        if group == "MT-Bench":
            ax.set_ylim(0, 10)
        elif group == "exact match":
            ax.set_ylim(0, 1)
        ax.set_title(f"{group} per {'category' if group == 'MT-Bench' else 'data source'}")
        paths.append(_save(fig, out / fname))
    if loss_histories:
        fig, ax = _figure()
        for name, hist in loss_histories.items():
            pts = [(h["step"], h["loss"]) for h in hist if h.get("loss") is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        paths.append(_save(fig, out / "training_loss.png"))
    return paths


def per_domain(results: Mapping[str, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """model -> data source -> {"nll", and "exact_match" where the source has one right answer}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, r in results.items():
        rows: dict[str, dict[str, float]] = {}
        for src, m in ((r.get("heldout_nll") or {}).get("sources") or {}).items():
            if m.get("nll") is not None:
                rows.setdefault(src, {})["nll"] = m["nll"]
        for src, m in ((r.get("exact_match") or {}).get("sources") or {}).items():
            if m.get("accuracy") is not None:
                rows.setdefault(src, {})["exact_match"] = m["accuracy"]
        out[name] = {k: rows[k] for k in sorted(rows)}
    return out


def _nll(domains: Mapping[str, Mapping[str, dict]], model: str, src: str) -> float | None:
    return (domains.get(model) or {}).get(src, {}).get("nll")


def fusion_vs_clm(domains: Mapping[str, Mapping[str, dict]], roles: Mapping[str, Any]) -> dict[str, Any] | None:
    """Did fusion beat plain fine-tuning? Held-out NLL margins over the CLM baseline.

    ``roles`` (``RunPlan.report_roles``): the baseline's name, each target's source and
    that source's expert data sources (None when the run does not say), the merges.
    A margin is ``NLL(clm) - NLL(model)``: positive when the fused model is better. A
    target is compared on the mean NLL over its source's expert data sources (over all
    of them when they are not known), a merge over all data sources; each data source
    weighs the same, and the per-source margins are kept too.
    """
    clm = roles.get("clm")
    if not clm or clm not in domains:
        return None
    shared = sorted(domains[clm])

    def compare(model: str, over: Sequence[str]) -> dict[str, Any] | None:
        nll = {d: _nll(domains, model, d) for d in over}
        if not over or any(v is None for v in nll.values()):
            return None
        mine = sum(nll.values()) / len(over)  # type: ignore[arg-type]
        base = sum(_nll(domains, clm, d) for d in over) / len(over)  # type: ignore[misc]
        return {"domains": list(over), "mean_nll": mine, "clm_mean_nll": base, "margin": base - mine,
                "margins": {d: _nll(domains, clm, d) - v for d, v in nll.items()},  # type: ignore[operator]
                "beats_clm": base - mine > 0}

    targets = {}
    for label, t in (roles.get("targets") or {}).items():
        experts = [d for d in (t.get("expert_domains") or shared) if d in shared]
        row = compare(label, experts) if label in domains else None
        if row is not None:
            targets[label] = {"source": t.get("source"), **row}
    merges = {}
    for label in roles.get("merges") or []:
        row = compare(label, shared) if label in domains else None
        if row is not None:
            merges[label] = row
    return {"clm": clm, "domains": shared, "targets": targets, "merges": merges}


def fusion_markdown(fusion: Mapping[str, Any] | None) -> list[str]:
    if not fusion:
        return []
    clm = fusion["clm"]
    lines = ["## Did fusion beat plain fine-tuning?", "",
             f"Margin = held-out NLL of `{clm}` (λ = 1: same data, same steps, no fusion term) minus the "
             "model's, as a mean over data sources (each weighted equally); positive means fusion helped.", ""]

    def line(label: str, what: str, r: Mapping[str, Any]) -> str:
        parts = ", ".join(f"{d} {m:+.4f}" for d, m in r["margins"].items())
        return (f"- **{label}** on {what}: {'yes' if r['beats_clm'] else 'no'}, {r['mean_nll']:.4f} vs "
                f"{r['clm_mean_nll']:.4f}, margin {r['margin']:+.4f} (per data source: {parts})")

    for label, t in fusion["targets"].items():
        lines.append(line(label, f"{t['source']}'s expert data ({', '.join(t['domains'])})", t))
    for label, m in fusion["merges"].items():
        lines.append(line(label, "all data sources", m))
    return lines + [""]


def plot_fusion(domains: Mapping[str, Mapping[str, dict]], fusion: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Held-out NLL margin over the CLM baseline, per data source, for every target and merge:
    the differences are a few thousandths of a nat, invisible on the absolute NLL plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clm, groups = fusion["clm"], list(fusion["domains"])
    series = {m: [_nll(domains, clm, d) - _nll(domains, m, d) for d in groups]  # type: ignore[operator]
              for m in [*fusion["targets"], *fusion["merges"]]}
    fig, ax = _figure()
    _grouped_bars(ax, groups, series, f"NLL({clm}) - NLL(model)")
    ax.axhline(0.0, color="black", linewidth=0.8)
    # The scale is the targets' and the run's own merge method's: a baseline far off it
    # (TIES at tiny scale) would flatten every other bar to nothing. Its bars are cut at
    # the edge and labelled with their value.
    main = [*fusion["targets"], *list(fusion["merges"])[:1]]
    ref = max((abs(v) for m in main for v in series[m] if v is not None), default=0.0)
    lim = 1.3 * ref
    if lim > 0 and any(abs(v) > lim for vals in series.values() for v in vals if v is not None):
        ax.set_ylim(-lim, lim)
        n, width = len(series), 0.8 / max(len(series), 1)
        for k, vals in enumerate(series.values()):
            for i, v in enumerate(vals):
                if v is not None and abs(v) > lim:
                    x = i + (k - (n - 1) / 2) * width
                    ax.text(x, 0.92 * lim if v > 0 else -0.92 * lim, f"{v:+.2f}", ha="center", va="center",
                            fontsize="x-small", rotation=90)
    ax.set_title(f"Fusion vs plain fine-tuning: held-out NLL margin over {clm} (above 0: fusion helped)")
    return _save(fig, out / "fusion_margin.png")


def render_markdown(title: str, results: Mapping[str, dict], plots: Sequence[str] = (),
                    notes: Sequence[str] = (), fusion: Mapping[str, Any] | None = None) -> str:
    lines = [f"# {title}", "", markdown_table(results), ""]
    lines += fusion_markdown(fusion)
    mt = {n: r["mt_bench"] for n, r in results.items() if r.get("mt_bench")}
    if mt:
        lines.append("MT-Bench: mean judge score (1-10) over both turns; unparsable verdicts are counted, "
                     "not scored.")
        for n, m in mt.items():
            lines.append(f"- {n}: turn 1 {_fmt(m.get('turn_1'))}, turn 2 {_fmt(m.get('turn_2'))}, "
                         f"{m.get('scored')} scored, {m.get('unparsable')} unparsable, {m.get('failed')} failed "
                         f"(judge {m.get('judge_model')})")
        lines.append("")
    if any(r.get("heldout_nll") for r in results.values()):
        lines.append("Held-out NLL: mean negative log-likelihood per supervised (assistant) token; lower is "
                     "better. Per-token NLL compares models sharing a tokenizer; BPB (bits per UTF-8 byte of "
                     "the same text) compares across tokenizers.")
        lines.append("")
    lines += [f"- {n}" for n in notes]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


_IMAGE = re.compile(r"!\[([^\]]*)\]\((plots/[^)\s]+\.png)\)")


def inline_images(markdown: str, read: Callable[[str], bytes]) -> str:
    """``markdown`` with every ``![alt](plots/x.png)`` made a ``data:image/png;base64`` URI, so a
    viewer that cannot reach the store (the Prefect dashboard) shows the plot itself.
    ``read(rel)``: the PNG's bytes. A plot is 1000 × 500 pixels, some 20-60 kB."""
    def sub(m: re.Match) -> str:
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(read(m.group(2))).decode()})"

    return _IMAGE.sub(sub, markdown)


def build_report(title: str, results: Mapping[str, dict], out_dir: str | Path,
                 loss_histories: Mapping[str, Sequence[dict]] | None = None,
                 notes: Sequence[str] = (), roles: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write report.md, report.json and plots/*.png into ``out_dir``; returns the report object.

    ``report.json`` holds ``domains`` (model -> data source -> ``nll`` and, where the source
    has one right answer, ``exact_match``), ``fusion`` (margins over the CLM baseline, when
    ``roles`` names one) and every model's full ``results``.
    """
    out = Path(out_dir)
    plots = plot_results(results, loss_histories, out / "plots")
    domains = per_domain(results)
    fusion = fusion_vs_clm(domains, roles) if roles else None
    if fusion and (fusion["targets"] or fusion["merges"]):
        plots.insert(0, plot_fusion(domains, fusion, out / "plots"))
    rel = [p.relative_to(out).as_posix() for p in plots]
    md = render_markdown(title, results, rel, notes, fusion)
    (out / "report.md").write_text(md)
    report = {"title": title, "models": list(results), "domains": domains, "fusion": fusion,
              "results": dict(results),
              "columns": [h for _, h, _ in columns(results)], "plots": rel,
              "loss_histories": {k: list(v) for k, v in (loss_histories or {}).items()}}
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
    return {"markdown": md, "plots": rel, "report": report}
