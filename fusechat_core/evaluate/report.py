"""One report per run: every model × every measure, in the shape of the paper's Table 1.

Rows are models (pivot, sources, targets, merges), columns the MT-Bench
categories and their average, then the offline measures (held-out NLL per
data source, exact match per task). Written as ``report.md``, ``report.json``
and PNG plots (matplotlib's Agg backend: no display needed).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusechat_core.evaluate.bootstrap import LEVEL, N_RESAMPLES, SEED, paired_bootstrap, verdict
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


def _grouped_bars(ax: Any, groups: list[str], series: Mapping[str, list[float | None]], ylabel: str,
                  intervals: Mapping[str, list[Sequence[float] | None]] | None = None) -> None:
    """Bars per group and series; ``intervals[name][i]``: (low, high) drawn as an error bar."""
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, vals) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in vals]
        ax.bar(xs, ys, width, label=name)
        ci = (intervals or {}).get(name)
        if ci:
            have = [i for i, c in enumerate(ci) if c is not None and vals[i] is not None]
            err = [[max(ys[i] - ci[i][0], 0.0) for i in have], [max(ci[i][1] - ys[i], 0.0) for i in have]]
            ax.errorbar([xs[i] for i in have], [ys[i] for i in have], yerr=err, fmt="none", ecolor="black",
                        elinewidth=0.8, capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # every value missing (no verdict scored): no bar, no legend
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


def sequence_columns(results: Mapping[str, dict], models: Sequence[str], *,
                     whole_only: bool = False) -> tuple[list[str], np.ndarray] | None:
    """The held-out sequences every one of ``models`` was measured on, paired by row id:
    ``(data source per row, [n, 3·M] columns)``, model k's summed NLL, tokens and bytes in
    columns 3k, 3k+1, 3k+2. None when a model has no per-sequence figures.
    ``whole_only``: only sequences no model had cut to ``evaluate.max_length`` (models with
    different tokenizers cut one row at different places: they measured different text)."""
    tables = []
    for m in models:
        seq = ((results.get(m) or {}).get("heldout_nll") or {}).get("sequences")
        if not seq:
            return None
        cut = seq.get("cut") or [False] * len(seq["id"])  # an evaluation before version 3 did not say
        tables.append({i: (s, n, t, b) for i, s, n, t, b, c in zip(seq["id"], seq["source"], seq["nll"],
                                                                    seq["tokens"], seq["bytes"], cut)
                       if not (whole_only and c)})
    return _paired(tables)


def _paired(tables: Sequence[Mapping[Any, tuple]]) -> tuple[list[str], np.ndarray] | None:
    """Rows every model's table has, paired by id: ``(stratum per row, [n, Σ columns])`` from
    tables ``{id: (stratum, *columns)}``, one per model, ids in sorted order; None if none."""
    common = sorted(set.intersection(*(set(t) for t in tables)), key=str)
    if not common:
        return None
    strata = [str(tables[0][i][0]) for i in common]
    return strata, np.array([[x for t in tables for x in t[i][1:]] for i in common], dtype=np.float64)


def _interval(lo: Any, hi: Any) -> list[float]:
    return [float(lo), float(hi)]


def _columns_over(results: Mapping[str, dict], models: Sequence[str], over: Sequence[str], *,
                  whole_only: bool = False) -> tuple | None:
    """``sequence_columns`` of ``models`` with the data sources' labels and the indices of
    ``over`` among them; None where a model lacks per-sequence figures or a data source."""
    table = sequence_columns(results, list(models), whole_only=whole_only)
    if table is None:
        return None
    strata, values = table
    labels = sorted(set(strata))
    if any(d not in labels for d in over):
        return None
    return strata, values, labels, [labels.index(d) for d in over]


def _margins(results: Mapping[str, dict], clm: str, model: str, over: Sequence[str],
             every: Sequence[str] = ()) -> dict[str, Any] | None:
    """Bootstrap intervals of the per-domain margins NLL(clm) − NLL(model) and of their mean
    over ``over``; ``intervals_all``: each of ``every`` data source's margin (for the plot)."""
    found = _columns_over(results, [clm, model], over)
    if found is None:
        return None
    strata, values, labels, idx = found
    rest = [d for d in every if d in labels]
    idx_all = [labels.index(d) for d in rest]

    def stat(sums: np.ndarray) -> np.ndarray:
        per = (sums[..., :, 0] / sums[..., :, 1]) - (sums[..., :, 3] / sums[..., :, 4])
        return np.concatenate([per[..., idx], per[..., idx].mean(axis=-1, keepdims=True), per[..., idx_all]],
                              axis=-1)

    _, lo, hi = paired_bootstrap(strata, values, stat, n_resamples=N_RESAMPLES, seed=SEED, level=LEVEL)
    n = len(over)
    return {"interval": _interval(lo[n], hi[n]),
            "intervals": {d: _interval(lo[k], hi[k]) for k, d in enumerate(over)},
            "intervals_all": {d: _interval(lo[n + 1 + k], hi[n + 1 + k]) for k, d in enumerate(rest)}}


def _share(est: float, lo: float, hi: float, gap: float, gap_lo: float, gap_hi: float) -> dict[str, Any]:
    """One share of the gap closed, read as far as the data allow. The ratio means something
    only where the expert is better than the baseline: with no gap (the baseline already as
    good as the source) it is ``None``; with a gap whose interval reaches 0 the ratio's interval
    is unbounded (a denominator that may be 0), so only the estimate is given."""
    out: dict[str, Any] = {"gap": {"bpb": float(gap), "interval": _interval(gap_lo, gap_hi)}}
    if not gap > 0:
        return {**out, "gap_closed": None, "interval": None, "status": "no gap"}
    if not gap_lo > 0:
        return {**out, "gap_closed": float(est), "interval": None, "status": "gap not distinguishable from 0"}
    return {**out, "gap_closed": float(est), "interval": _interval(lo, hi), "status": "closed"}


def gap_closed(results: Mapping[str, dict], clm: str, target: str, source: str,
               over: Sequence[str]) -> dict[str, Any] | None:
    """Share of the gap between plain fine-tuning and the expert that fusion closed, in bits per
    byte (the source speaks other tokens): ``(BPB_clm − BPB_target) / (BPB_clm − BPB_source)``
    per data source of ``over`` and over them (mean BPB, each data source weighted equally),
    each with a paired bootstrap interval (the three models resampled on the same sequences).

    The gap itself, ``BPB_clm − BPB_source``, comes with its interval; ``status`` says how far
    the share can be read (``_share``): ``closed``, ``gap not distinguishable from 0`` (estimate,
    no interval) or ``no gap`` (the baseline is already at least as good as the expert: no share).
    """
    # Whole sequences only: the source's tokenizer cuts a long row elsewhere than the pivot's.
    found = _columns_over(results, [clm, target, source], over, whole_only=True) if over else None
    if found is None:
        return _all_cut(results, [clm, target, source], over)
    strata, values, _, idx = found
    # of the compared data sources only: rows of the others were never part of the share
    measured = sum(s in over for s in sequence_columns(results, [clm, target, source])[0])  # type: ignore[index]
    whole = sum(s in over for s in strata)

    def bpb(sums: np.ndarray, k: int) -> np.ndarray:
        return sums[..., idx, 3 * k] / (sums[..., idx, 3 * k + 2] * math.log(2))

    def stat(sums: np.ndarray) -> np.ndarray:
        c, t, s = bpb(sums, 0), bpb(sums, 1), bpb(sums, 2)
        gap = np.concatenate([c - s, (c.mean(-1) - s.mean(-1))[..., None]], axis=-1)
        moved = np.concatenate([c - t, (c.mean(-1) - t.mean(-1))[..., None]], axis=-1)
        # a resample without a gap has no share: left out of the interval (NaN), which is
        # read only when the gap's own interval lies above 0
        share = np.where(gap > 0, moved / np.where(gap > 0, gap, 1.0), np.nan)
        return np.concatenate([share, gap, c, t, s], axis=-1)

    est, lo, hi = paired_bootstrap(strata, values, stat, n_resamples=N_RESAMPLES, seed=SEED, level=LEVEL)
    n = len(over)

    def share(k: int) -> dict[str, Any]:
        g = n + 1 + k
        return _share(est[k], lo[k], hi[k], est[g], lo[g], hi[g])

    def bpbs(k: int) -> dict[str, float]:
        at = 2 * (n + 1) + k
        return {"clm": float(est[at]), "target": float(est[at + n]), "source": float(est[at + 2 * n])}

    return {"domains": list(over), **share(n), "sequences": whole, "cut_left_out": measured - whole,
            "per_domain": {d: {**share(k), "bpb": bpbs(k)} for k, d in enumerate(over)}}


def _all_cut(results: Mapping[str, dict], models: Sequence[str], over: Sequence[str]) -> dict[str, Any] | None:
    """The share measured on nothing: every held-out sequence of a data source of ``over`` was
    cut by some model (an expert domain of long answers under a short ``evaluate.max_length``).
    Said so, naming the data sources, instead of leaving the target out of the report as if
    it had no source to compare with. None where the models lack the figures altogether."""
    every = _columns_over(results, models, over) if over else None
    if every is None:
        return None
    whole = sequence_columns(results, list(models), whole_only=True)
    have = set(whole[0]) if whole else set()
    n_whole = sum(s in over for s in whole[0]) if whole else 0
    return {"domains": list(over), "gap": None, "gap_closed": None, "interval": None,
            "status": "every sequence cut", "cut_domains": [d for d in over if d not in have],
            "sequences": n_whole, "cut_left_out": sum(s in over for s in every[0]) - n_whole, "per_domain": {}}


def fusion_vs_clm(domains: Mapping[str, Mapping[str, dict]], roles: Mapping[str, Any],
                  results: Mapping[str, dict] | None = None) -> dict[str, Any] | None:
    """Did fusion beat plain fine-tuning? Held-out NLL margins over the CLM baseline.

    ``roles`` (``RunPlan.report_roles``): the baseline's name, each target's source and
    that source's expert data sources (None when the run does not say), the merges, the
    λ ablation's targets. A margin is ``NLL(clm) - NLL(model)``: positive when the fused
    model is better. A target is compared on the mean NLL over its source's expert data
    sources (over all of them when they are not known), a merge over all data sources;
    each data source weighs the same, and the per-source margins are kept too.

    With ``results`` holding per-sequence figures (``nll.heldout_nll``), every margin gets
    a paired bootstrap interval (``bootstrap.py``) and a verdict: ``yes`` when the
    interval lies above 0, ``no`` below, ``not distinguishable`` else (also when there is
    no interval). Each target also gets the share of the gap to its source it closed.
    """
    clm = roles.get("clm")
    if not clm or clm not in domains:
        return None
    shared = sorted(domains[clm])
    results = results or {}

    def compare(model: str, over: Sequence[str]) -> dict[str, Any] | None:
        nll = {d: _nll(domains, model, d) for d in over}
        if not over or any(v is None for v in nll.values()):
            return None
        mine = sum(nll.values()) / len(over)  # type: ignore[arg-type]
        base = sum(_nll(domains, clm, d) for d in over) / len(over)  # type: ignore[misc]
        row = {"domains": list(over), "mean_nll": mine, "clm_mean_nll": base, "margin": base - mine,
               "margins": {d: _nll(domains, clm, d) - v for d, v in nll.items()},  # type: ignore[operator]
               "interval": None, "intervals": None}
        row.update(_margins(results, clm, model, over, shared) or {})
        row["verdict"] = verdict(*row["interval"]) if row["interval"] else "not distinguishable"
        row["beats_clm"] = row["verdict"] == "yes"
        return row

    targets, gaps = {}, {}
    for label, t in (roles.get("targets") or {}).items():
        experts = [d for d in (t.get("expert_domains") or shared) if d in shared]
        row = compare(label, experts) if label in domains else None
        if row is not None:
            targets[label] = {"source": t.get("source"), **row}
            gap = gap_closed(results, clm, label, t.get("source"), experts) if t.get("source") in results else None
            if gap is not None:
                gaps[label] = {"source": t.get("source"), **gap}
    merges = {}
    for label in roles.get("merges") or []:
        row = compare(label, shared) if label in domains else None
        if row is not None:
            merges[label] = row
    ablation: dict[str, dict[str, Any]] = {}
    for source, by_lam in (roles.get("ablation") or {}).items():
        experts = next((t.get("expert_domains") for t in (roles.get("targets") or {}).values()
                        if t.get("source") == source), None) or shared
        experts = [d for d in experts if d in shared]
        for lam, label in sorted(by_lam.items(), key=lambda kv: float(kv[0])):
            gap = gap_closed(results, clm, label, source, experts) if label in results else None
            if gap is not None:
                ablation.setdefault(source, {})[lam] = {"model": label, **gap}
    return {"clm": clm, "domains": shared, "targets": targets, "merges": merges, "gap_closed": gaps,
            "ablation": ablation,
            "bootstrap": {"resamples": N_RESAMPLES, "seed": SEED, "level": LEVEL,
                          "unit": "held-out sequence, resampled within its data source, the same draw "
                                  "for every model compared (paired)"}}


def _question_columns(results: Mapping[str, dict], models: Sequence[str]) -> tuple[list[str], np.ndarray] | None:
    """The MT-Bench questions every one of ``models`` had a scored turn on, paired by question
    id: ``(category per question, [n, 2·M])``, model k's score sum and scored turns in columns
    2k, 2k+1. None when a model has no per-question scores (an evaluation before version 4)."""
    tables = []
    for m in models:
        q = ((results.get(m) or {}).get("mt_bench") or {}).get("questions")
        if not q:
            return None
        tables.append({i: (c, s, n) for i, c, s, n in zip(q["id"], q["category"], q["score_sum"], q["scored"])
                       if n})
    return _paired(tables)


def _judged_apart(results: Mapping[str, dict], names: Sequence[str]) -> str | None:
    """What differs in how ``names`` were judged (the judge, the questions' and references'
    content), or None. A model evaluated later against a moved ``mt_bench_data`` location
    (FastChat's main branch) or by another judge is not comparable to cached ones."""
    def seen(key: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in names:
            v = (results[n].get("mt_bench") or {}).get(key)
            out.setdefault(json.dumps(v, sort_keys=True), []).append(n)
        return out

    parts = []
    for key, what in (("judge_model", "judges"), ("data_digests", "question or reference files")):
        groups = seen(key)
        if len(groups) > 1:
            parts.append(f"different {what} (" + "; ".join(", ".join(ns) for ns in groups.values()) + ")")
    return " and ".join(parts) or None


def mt_bench_intervals(results: Mapping[str, dict], roles: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """MT-Bench with its uncertainty: each model's average (over scored turns, as FastChat's)
    with a bootstrap interval over questions, both turns of a question together and drawn
    within their category; and, where ``roles`` names the CLM baseline, each target's and
    merge's margin over it, paired (the same questions drawn for both) with a verdict. At 80
    questions an average moves by about ±0.1-0.2: the paper's gaps between methods are often
    smaller. Only the questions drawn vary, not the answers' sampling or the judge's."""
    # a model none of whose turns was scored (a judge that never gave a rating) has no average
    own = {n: cols for n in results if (cols := _question_columns(results, [n])) is not None}
    names = list(own)
    if not names:
        return None

    def mean(sums: np.ndarray, k: int) -> np.ndarray:
        return sums[..., :, 2 * k].sum(-1) / sums[..., :, 2 * k + 1].sum(-1)

    models = {}
    for n, (strata, values) in own.items():
        est, lo, hi = paired_bootstrap(strata, values, lambda s: mean(s, 0)[..., None],
                                       n_resamples=N_RESAMPLES, seed=SEED, level=LEVEL)
        models[n] = {"average": float(est[0]), "interval": _interval(lo[0], hi[0]), "questions": len(strata)}
    vs: dict[str, Any] = {}
    clm = (roles or {}).get("clm")
    compared = [*((roles or {}).get("targets") or {}), *((roles or {}).get("merges") or [])]
    for label in compared if clm in models else []:
        found = _question_columns(results, [clm, label]) if label in models else None
        if found is None:
            continue
        strata, values = found
        est, lo, hi = paired_bootstrap(strata, values, lambda s: (mean(s, 1) - mean(s, 0))[..., None],
                                       n_resamples=N_RESAMPLES, seed=SEED, level=LEVEL)
        vs[label] = {"margin": float(est[0]), "interval": _interval(lo[0], hi[0]),
                     "verdict": verdict(lo[0], hi[0]), "questions": len(strata)}
        if differs := _judged_apart(results, [clm, label]):
            vs[label].update(verdict="not comparable", why=differs)
    return {"models": models, "clm": clm if vs else None, "vs_clm": vs, "judged_apart": _judged_apart(results, names),
            "bootstrap": {"resamples": N_RESAMPLES, "seed": SEED, "level": LEVEL,
                          "unit": "MT-Bench question (both turns), resampled within its category, the same "
                                  "draw for every model compared (paired)"}}


def _ci(iv: Sequence[float] | None, digits: int = 4, pct: bool = False) -> str:
    if not iv:
        return ""
    if pct:
        return f" [{iv[0]:.1%}, {iv[1]:.1%}]"
    return f" [{iv[0]:+.{digits}f}, {iv[1]:+.{digits}f}]"


def _share_text(x: Mapping[str, Any]) -> str:
    """A share of the gap closed in words, as far as ``x['status']`` lets it be read."""
    gap = x.get("gap") or {}
    if x.get("status") == "every sequence cut":
        return (f"not measured: every held-out sequence of {', '.join(x['cut_domains'])} was cut to "
                f"evaluate.max_length by a model's tokenizer (raise evaluate.max_length)")
    if x.get("gap_closed") is None:
        return f"no gap to close (the baseline is at least as good as the source: {gap.get('bpb', 0.0):+.3f} BPB)"
    if x.get("interval") is None:
        return (f"{x['gap_closed']:.1%} (no interval: the gap itself, {gap['bpb']:+.3f}"
                f"{_ci(gap['interval'], digits=3)} BPB, is not distinguishable from 0)")
    return f"{x['gap_closed']:.1%}{_ci(x['interval'], pct=True)}"


def fusion_markdown(fusion: Mapping[str, Any] | None) -> list[str]:
    if not fusion:
        return []
    clm, bs = fusion["clm"], fusion.get("bootstrap") or {}
    lines = ["## Did fusion beat plain fine-tuning?", "",
             f"Margin = held-out NLL of `{clm}` (λ = 1: same data, same steps, no fusion term) minus the "
             "model's, as a mean over data sources (each weighted equally); positive means fusion helped. "
             f"In brackets: the {bs.get('level', LEVEL):.0%} interval of a paired bootstrap over held-out "
             f"sequences ({bs.get('resamples', N_RESAMPLES)} resamples, seed {bs.get('seed', SEED)}; each "
             "resample draws every data source's sequences with replacement, the same draw for both models). "
             "**yes** only when the interval lies above 0, **no** when below, else not distinguishable.", ""]

    def line(label: str, what: str, r: Mapping[str, Any]) -> str:
        ivs = r.get("intervals") or {}
        parts = ", ".join(f"{d} {m:+.4f}{_ci(ivs.get(d))}" for d, m in r["margins"].items())
        return (f"- **{label}** on {what}: {r['verdict']}, {r['mean_nll']:.4f} vs "
                f"{r['clm_mean_nll']:.4f}, margin {r['margin']:+.4f}{_ci(r.get('interval'))} "
                f"(per data source: {parts})")

    for label, t in fusion["targets"].items():
        lines.append(line(label, f"{t['source']}'s expert data ({', '.join(t['domains'])})", t))
    for label, m in fusion["merges"].items():
        lines.append(line(label, "all data sources", m))
    lines.append("")
    if fusion.get("gap_closed"):
        lines += ["### Share of the gap to the expert closed", "",
                  f"`(BPB_{clm} − BPB_target) / (BPB_{clm} − BPB_source)` in bits per byte (the source speaks "
                  "other tokens) on the source's expert data: 0 is plain fine-tuning, 1 the expert itself. "
                  "Intervals: the same paired bootstrap, the three models on the same sequences.", ""]
        for label, g in fusion["gap_closed"].items():
            if g.get("status") == "every sequence cut":
                lines.append(f"- **{label}** against `{g['source']}`: {_share_text(g)}")
                continue
            per = ", ".join(f"{d} {_share_text(x)} (BPB {clm} "
                            f"{x['bpb']['clm']:.3f}, target {x['bpb']['target']:.3f}, {g['source']} "
                            f"{x['bpb']['source']:.3f})" for d, x in g["per_domain"].items())
            left = (f"; {g['cut_left_out']} sequences left out, cut to evaluate.max_length (each tokenizer "
                    "cuts elsewhere)") if g.get("cut_left_out") else ""
            lines.append(f"- **{label}**: {_share_text(g)} of the gap to `{g['source']}` (per data source: {per}"
                         f"{left})")
        lines.append("")
    if fusion.get("ablation"):
        lines += ["### λ ablation: gap closed against λ", "",
                  "One target per (source, λ), same data and steps; λ = 1 is the CLM baseline itself (gap 0).",
                  "", "| source | λ | model | " + " | ".join(["gap closed"]) + " | per data source |",
                  "|---|---:|---|---:|---|"]
        for source, by_lam in fusion["ablation"].items():
            for lam, g in by_lam.items():
                per = ", ".join(f"{d} {_share_text(x)}" for d, x in g["per_domain"].items())
                lines.append(f"| {source} | {float(lam):g} | {g['model']} | {_share_text(g)} | {per} |")
        lines.append("")
    return lines


def fusion_summary(fusion: Mapping[str, Any] | None) -> list[str]:
    """The report's answer in a few lines for a terminal: a verdict and margin per target
    (on its source's expert data) and per merge (on all data sources)."""
    # A report.json from an older version may lack a field: what it has is shown, nothing raised.
    rows = [(label, f"on {t.get('source')}'s expert data ({', '.join(t.get('domains') or [])})", t)
            for label, t in ((fusion or {}).get("targets") or {}).items()]
    rows += [(label, "on all data sources", m) for label, m in ((fusion or {}).get("merges") or {}).items()]
    rows = [(label, what, r) for label, what, r in rows if isinstance(r.get("margin"), (int, float))]
    if not rows:
        return []
    name, verdict = max(len(r[0]) for r in rows), max(len(str(r[2].get("verdict"))) for r in rows)
    level = (fusion.get("bootstrap") or {}).get("level", LEVEL)
    return [f"Did fusion beat plain fine-tuning (`{fusion.get('clm')}`, λ = 1)? Held-out NLL margin, "
            f"{level:.0%} interval:"] + [
        f"  {label:<{name}}  {r.get('verdict')!s:<{verdict}}  {r['margin']:+.4f}{_ci(r.get('interval'))}  {what}"
        for label, what, r in rows]


def mt_bench_summary(mt_bench: Mapping[str, Any] | None) -> list[str]:
    """The MT-Bench answer for a terminal: each target's and merge's paired margin over the CLM
    baseline (the 7B config measures MT-Bench alone: without these lines a run ended silent)."""
    rows = [(label, c) for label, c in ((mt_bench or {}).get("vs_clm") or {}).items()
            if isinstance(c.get("margin"), (int, float))]
    if not rows:
        return []
    name, verdict = max(len(label) for label, _ in rows), max(len(str(c.get("verdict"))) for _, c in rows)
    level = ((mt_bench or {}).get("bootstrap") or {}).get("level", LEVEL)
    return [f"On MT-Bench, against `{mt_bench.get('clm')}` (judge score margin, {level:.0%} interval over "  # type: ignore[union-attr]
            f"questions):"] + [
        f"  {label:<{name}}  {c.get('verdict')!s:<{verdict}}  {c['margin']:+.2f}{_ci(c.get('interval'), digits=2)}"
        f"  {c.get('questions')} questions" for label, c in rows]


def plot_fusion(domains: Mapping[str, Mapping[str, dict]], fusion: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Held-out NLL margin over the CLM baseline, per data source, for every target and merge,
    with its bootstrap interval: the differences are a few thousandths of a nat, invisible on
    the absolute NLL plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clm, groups = fusion["clm"], list(fusion["domains"])
    series = {m: [_nll(domains, clm, d) - _nll(domains, m, d) for d in groups]  # type: ignore[operator]
              for m in [*fusion["targets"], *fusion["merges"]]}
    rows = {**fusion["targets"], **fusion["merges"]}
    intervals = {m: [(rows[m].get("intervals_all") or {}).get(d) for d in groups] for m in series}
    fig, ax = _figure()
    _grouped_bars(ax, groups, series, f"NLL({clm}) - NLL(model)", intervals)
    ax.axhline(0.0, color="black", linewidth=0.8)
    # The scale is the targets' and the run's own merge method's: a baseline far off it
    # (TIES at tiny scale) would flatten every other bar to nothing. Its bars are cut at
    # the edge and labelled with their value.
    main = [*fusion["targets"], *list(fusion["merges"])[:1]]
    ref = max((abs(v) for m in main for v in series[m] if v is not None), default=0.0)
    ref = max([ref] + [abs(c) for m in main for iv in intervals[m] if iv for c in iv])
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
    level = (fusion.get("bootstrap") or {}).get("level", LEVEL)
    ax.set_title(f"Fusion vs plain fine-tuning: held-out NLL margin over {clm} (above 0: fusion helped; "
                 f"bars: {level:.0%} paired bootstrap)", fontsize="medium")
    return _save(fig, out / "fusion_margin.png")


def plot_gap_closed(fusion: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Share of the gap to the expert closed, in bits per byte, with its interval: per target
    and expert data source (left), and against λ per source and expert data source when the run
    has a λ ablation (right)."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ablation = fusion.get("ablation") or {}
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    axes = [fig.add_subplot(1, 2 if ablation else 1, k + 1) for k in range(2 if ablation else 1)]
    gaps = fusion["gap_closed"]
    groups = sorted({d for g in gaps.values() for d in g["per_domain"]})
    series = {label: [g["per_domain"][d]["gap_closed"] if d in g["per_domain"] else None for d in groups]
              for label, g in gaps.items()}
    intervals = {label: [g["per_domain"][d]["interval"] if d in g["per_domain"] else None for d in groups]
                 for label, g in gaps.items()}
    _grouped_bars(axes[0], groups, series, "share of the BPB gap closed", intervals)
    axes[0].axhline(0.0, color="black", linewidth=0.8)
    width = 0.8 / max(len(series), 1)
    for k, (label, vals) in enumerate(series.items()):
        for i, (d, v) in enumerate(zip(groups, vals)):
            entry = gaps[label]["per_domain"].get(d)
            if entry is None or entry["interval"] is not None:
                continue
            # a missing bar is no share of 0, and a bar without an error bar has none to draw
            axes[0].text(i + (k - (len(series) - 1) / 2) * width, max(v or 0.0, 0.0),
                         "no gap" if v is None else "gap ≈ 0: no interval", ha="center", va="bottom",
                         rotation=90, fontsize="x-small")
    axes[0].set_title("Gap to the expert closed (0: plain fine-tuning, 1: the expert)", fontsize="medium")
    if ablation:
        ax = axes[1]
        for source, by_lam in ablation.items():
            lams = sorted(by_lam, key=float)
            for d in by_lam[lams[0]]["per_domain"]:
                # a λ whose share has no interval (no gap, or one that reaches 0) is not drawn as
                # a point with a bar it does not have
                pts = [(float(lam), x["gap_closed"], x["interval"]) for lam in lams
                       for x in [by_lam[lam]["per_domain"].get(d)] if x and x["interval"] is not None]
                if not pts:
                    continue
                err = [[max(y - iv[0], 0.0) for _, y, iv in pts], [max(iv[1] - y, 0.0) for _, y, iv in pts]]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, marker="o", capsize=3,
                            label=f"{source}: {d}")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("λ (weight of the CLM loss)")
        ax.set_ylabel("share of the BPB gap closed")
        ax.set_title("Gap closed against λ", fontsize="medium")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no λ has a gap to close with an interval", transform=ax.transAxes, ha="center")
    return _save(fig, out / "gap_closed.png")


def why_markdown(fusion_stats: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per target: the alignment coverage of its source and how often MinCE chose the source."""
    rows = {k: v for k, v in fusion_stats.items() if v}
    if not rows:
        return []
    domains = sorted({d for v in rows.values() for d in (v.get("source_chosen") or {})})
    lines = ["## Why: what each target distilled from", "",
             "Coverage: share of the supervised rows whose teacher is the source's distribution (aligned "
             "1-to-1) rather than the label (fallback). Source chosen: share of the training sequences "
             "for which the fusion function took the source rather than the pivot, per data source.", "",
             "| target | source | fusion function | coverage | " + " | ".join(f"source chosen: {d}" for d in domains)
             + " |", "|---|---|---|---:|" + "---:|" * len(domains)]
    for label, v in rows.items():
        chosen = v.get("source_chosen") or {}
        cells = [f"{chosen[d]:.0%}" if d in chosen else "–" for d in domains]
        lines.append(f"| {label} | {v.get('source') or '–'} | {v.get('fusion_function') or '–'} | "
                     f"{v['coverage']:.1%} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(title: str, results: Mapping[str, dict], plots: Sequence[str] = (),
                    notes: Sequence[str] = (), fusion: Mapping[str, Any] | None = None,
                    fusion_stats: Mapping[str, Mapping[str, Any]] | None = None,
                    mt_bench: Mapping[str, Any] | None = None) -> str:
    lines = [f"# {title}", "", markdown_table(results), ""]
    lines += fusion_markdown(fusion)
    lines += why_markdown(fusion_stats or {})
    mt = {n: r["mt_bench"] for n, r in results.items() if r.get("mt_bench")}
    if mt:
        ivs = mt_bench or {}
        bs = ivs.get("bootstrap") or {}
        level, resamples = bs.get("level", LEVEL), bs.get("resamples", N_RESAMPLES)
        lines.append("MT-Bench: mean judge score (1-10) over both turns; unparsable verdicts are counted, "
                     f"not scored. In brackets: the {level:.0%} interval of a bootstrap over questions ({resamples} "
                     "resamples, both turns of a question together, drawn within their category; the same draw "
                     "for both models of a comparison). It counts which questions were asked, not the answers' "
                     "sampling or the judge's.")
        for n, m in mt.items():
            own = (ivs.get("models") or {}).get(n)
            avg = (f"average {own['average']:.2f}{_ci(own['interval'], digits=2)} over {own['questions']} "
                   "questions, " if own else "average without an interval (no per-question scores), ")
            sampled = f"; {m['sampled']} verdicts sampled: the judge took no temperature 0" if m.get("sampled") else ""
            lines.append(f"- {n}: {avg}turn 1 {_fmt(m.get('turn_1'))}, turn 2 {_fmt(m.get('turn_2'))}, "
                         f"{m.get('scored')} scored, {m.get('unparsable')} unparsable, {m.get('failed')} failed "
                         f"(judge {m.get('judge_model')}{sampled})")
        if ivs.get("judged_apart"):
            lines.append(f"- **Not comparable as measured**: the models were judged with {ivs['judged_apart']}.")
        for label, c in (ivs.get("vs_clm") or {}).items():
            why = f" ({c['why']})" if c.get("why") else ""
            lines.append(f"- **{label}** vs `{ivs['clm']}` on MT-Bench: {c['verdict']}{why}, margin "
                         f"{c['margin']:+.2f}{_ci(c['interval'], digits=2)} over {c['questions']} questions")
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


def _slim(r: Mapping[str, Any]) -> dict[str, Any]:
    """A model's results without the per-sequence and per-question figures the intervals were
    computed from (they stay in the evaluate artifacts)."""
    out = dict(r)
    if isinstance(r.get("heldout_nll"), dict):
        out["heldout_nll"] = {k: v for k, v in r["heldout_nll"].items() if k != "sequences"}
    if isinstance(r.get("mt_bench"), dict):
        out["mt_bench"] = {k: v for k, v in r["mt_bench"].items() if k != "questions"}
    return out


def build_report(title: str, results: Mapping[str, dict], out_dir: str | Path,
                 loss_histories: Mapping[str, Sequence[dict]] | None = None,
                 notes: Sequence[str] = (), roles: Mapping[str, Any] | None = None,
                 fusion_stats: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Write report.md, report.json and plots/*.png into ``out_dir``; returns the report object.

    ``report.json`` holds ``domains`` (model -> data source -> ``nll`` and, where the source
    has one right answer, ``exact_match``), ``fusion`` (margins over the CLM baseline with
    their bootstrap intervals, the gap to each expert closed, the λ ablation, when ``roles``
    names a baseline), ``why`` (``fusion_stats``: per target, its alignment coverage and how
    often the fusion function chose the source) and every model's ``results`` (without the
    per-sequence figures the intervals were computed from: those stay in the evaluate artifacts).
    """
    out = Path(out_dir)
    plots = plot_results(results, loss_histories, out / "plots")
    domains = per_domain(results)
    fusion = fusion_vs_clm(domains, roles, results) if roles else None
    if fusion and (fusion["targets"] or fusion["merges"]):
        plots.insert(0, plot_fusion(domains, fusion, out / "plots"))
        if any(g["per_domain"] for g in fusion["gap_closed"].values()):
            plots.insert(1, plot_gap_closed(fusion, out / "plots"))
    rel = [p.relative_to(out).as_posix() for p in plots]
    mt_bench = mt_bench_intervals(results, roles)
    md = render_markdown(title, results, rel, notes, fusion, fusion_stats, mt_bench)
    (out / "report.md").write_text(md)
    slim = {name: _slim(r) for name, r in results.items()}
    report = {"title": title, "models": list(results), "domains": domains, "fusion": fusion, "mt_bench": mt_bench,
              "why": dict(fusion_stats or {}), "results": slim,
              "columns": [h for _, h, _ in columns(results)], "plots": rel,
              "loss_histories": {k: list(v) for k, v in (loss_histories or {}).items()}}
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
    return {"markdown": md, "plots": rel, "report": report}
