"""The study report: delta_m of every variant against single-task with bootstrap intervals, Dice tables, cost.

For each condition (data set x label budget) every variant (with its weighting) is compared with the
baseline cells of the same condition. Both sides of a seed share their split, so each test case is scored
by both: the comparison is paired. The 95% interval is a two-level bootstrap: seeds are resampled with
replacement, then, within each drawn seed and modality, its test cases; each resample gives
``delta_m = 1/T sum_t 100 (mean Dice_mtl,t - mean Dice_stl,t) / mean Dice_stl,t`` (Maninis et al. 2019,
Dice only, T = CT and MR), and the interval is its 2.5 and 97.5 percentiles. A variant whose interval lies
entirely below zero is flagged as negative transfer. A case's Dice is the mean over its classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CellResult", "Comparison", "Claim", "bootstrap_delta_m", "compare_cells", "write_report"]

MODALITIES = ("ct", "mr")


@dataclass
class CellResult:
    """What one finished cell contributes: its factor levels, per-case test Dice rows and its cost."""

    factors: dict[str, str]
    run_id: str
    per_case: list[dict]
    classes: dict[str, list[str]]
    step_seconds: float = math.nan
    parameters: int = 0

    def case_scores(self, modality: str) -> dict[str, float]:
        """``case_id -> mean Dice over classes`` of one modality's test cases."""
        out = {}
        for r in self.per_case:
            if r["modality"] == modality:
                vals = [r[c] for c in self.classes[modality] if r.get(c) is not None and not math.isnan(r[c])]
                out[r["case_id"]] = float(np.mean(vals)) if vals else math.nan
        return out


@dataclass
class Comparison:
    """delta_m (percent) of one variant against the baseline in one condition, with 95% intervals."""

    condition: tuple[str, str]
    variant: str
    weighting: str
    seeds: int
    cases: dict[str, int]
    delta_m: float
    ci: tuple[float, float]
    per_task: dict[str, float] = field(default_factory=dict)
    per_task_ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def negative_transfer(self) -> bool:
        """The whole interval lies below zero."""
        return self.ci[1] < 0

    @property
    def positive_transfer(self) -> bool:
        """The whole interval lies above zero."""
        return self.ci[0] > 0


def bootstrap_delta_m(pairs: list[dict[str, tuple[np.ndarray, np.ndarray]]], *, n: int = 2000, seed: int = 0
                      ) -> tuple[float, tuple[float, float], dict[str, float], dict[str, tuple[float, float]]]:
    """delta_m of paired case scores and its two-level bootstrap 95% interval.

    Args:
        pairs: one entry per seed: modality -> ``(mtl, stl)`` arrays of the same test cases' scores.
        n: resamples.

    Returns:
        ``(delta_m, (lo, hi), per_task, per_task_ci)``, in percent.
    """
    tasks = sorted(set.intersection(*(set(p) for p in pairs)))

    def stat(draw_seeds: np.ndarray, draw_cases: dict[tuple[int, str], np.ndarray] | None) -> tuple[float, dict[str, float]]:
        per = {}
        for t in tasks:
            m_sum = s_sum = 0.0
            count = 0
            for k, s in enumerate(draw_seeds):
                mtl, stl = pairs[s][t]
                idx = draw_cases[(k, t)] if draw_cases is not None else slice(None)
                m_sum += float(np.sum(mtl[idx]))
                s_sum += float(np.sum(stl[idx]))
                count += len(mtl[idx])
            per[t] = 100.0 * (m_sum - s_sum) / s_sum if s_sum > 0 else math.nan
        return float(np.mean(list(per.values()))), per

    point, per_point = stat(np.arange(len(pairs)), None)
    rng = np.random.default_rng(seed)
    vals, per_vals = [], {t: [] for t in tasks}
    for _ in range(n):
        seeds = rng.integers(0, len(pairs), size=len(pairs))
        cases = {(k, t): rng.integers(0, len(pairs[s][t][0]), size=len(pairs[s][t][0])) for k, s in enumerate(seeds) for t in tasks}
        v, per = stat(seeds, cases)
        vals.append(v)
        for t in tasks:
            per_vals[t].append(per[t])
    ci = (float(np.nanpercentile(vals, 2.5)), float(np.nanpercentile(vals, 97.5)))
    per_ci = {t: (float(np.nanpercentile(per_vals[t], 2.5)), float(np.nanpercentile(per_vals[t], 97.5))) for t in tasks}
    return point, ci, per_point, per_ci


def _paired(variant: CellResult, baseline: CellResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for m in MODALITIES:
        a, b = variant.case_scores(m), baseline.case_scores(m)
        common = sorted(c for c in a if c in b and not math.isnan(a[c]) and not math.isnan(b[c]))
        if common:
            out[m] = (np.array([a[c] for c in common]), np.array([b[c] for c in common]))
    return out


def compare_cells(results: list[CellResult], *, baseline: str, baseline_weighting: str, n_boot: int = 2000) -> list[Comparison]:
    """Every (variant, weighting) against the baseline cells of its condition, paired by seed and case."""
    out = []
    conditions = sorted({(r.factors["dataset"], r.factors["budget"]) for r in results})
    for cond in conditions:
        here = [r for r in results if (r.factors["dataset"], r.factors["budget"]) == cond]
        base = {r.factors["seed"]: r for r in here if r.factors["variant"] == baseline and r.factors["weighting"] == baseline_weighting}
        groups: dict[tuple[str, str], dict[str, CellResult]] = {}
        for r in here:
            if (r.factors["variant"], r.factors["weighting"]) != (baseline, baseline_weighting):
                groups.setdefault((r.factors["variant"], r.factors["weighting"]), {})[r.factors["seed"]] = r
        for (variant, weighting), by_seed in groups.items():
            pairs = [_paired(by_seed[s], base[s]) for s in sorted(by_seed) if s in base]
            pairs = [p for p in pairs if p]
            if not pairs:
                continue
            d, ci, per, per_ci = bootstrap_delta_m(pairs, n=n_boot)
            cases = {t: int(sum(len(p[t][0]) for p in pairs if t in p)) for t in MODALITIES}
            out.append(Comparison(condition=cond, variant=variant, weighting=weighting, seeds=len(pairs), cases=cases,
                                  delta_m=d, ci=ci, per_task=per, per_task_ci=per_ci))
    return out


@dataclass
class Claim:
    """A statement the study is meant to test, checked against the comparisons."""

    text: str
    kind: str  # best_above | negative | not_negative
    dataset: str
    budget: str
    variants: list[str] | None = None
    threshold: float = 0.0

    def check(self, comps: list[Comparison]) -> tuple[bool | None, str]:
        """``(met, evidence)``; ``met`` is None when the study has no cell to test it."""
        here = [c for c in comps if c.condition == (self.dataset, self.budget) and (self.variants is None or c.variant in self.variants)]
        if not here:
            return None, "no matching cells"
        if self.kind == "best_above":
            best = max(here, key=lambda c: c.delta_m)
            return best.delta_m > self.threshold and best.ci[0] > 0, f"best {_name(best)}: {_fmt(best)}"
        flags = [c for c in here if c.negative_transfer]
        if self.kind == "negative":
            return bool(flags), "; ".join(f"{_name(c)}: {_fmt(c)}" for c in here)
        return not flags, "; ".join(f"{_name(c)}: {_fmt(c)}" for c in here)


def _name(c: Comparison) -> str:
    return f"{c.variant} ({c.weighting})"


def _fmt(c: Comparison) -> str:
    return f"{c.delta_m:+.2f}% [{c.ci[0]:+.2f}, {c.ci[1]:+.2f}]"


def _ms(vals: list[float]) -> str:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return "n/a"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.3f}"


def headline_table(comps: list[Comparison]) -> str:
    """The Markdown table of delta_m per condition and variant (the parent run's description)."""
    lines = ["| data set | MR budget | variant | weighting | seeds | delta_m % [95% CI] | CT % [95% CI] | MR % [95% CI] | flag |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(comps, key=lambda c: (c.condition, -c.delta_m)):
        task = {t: f"{c.per_task[t]:+.2f} [{c.per_task_ci[t][0]:+.2f}, {c.per_task_ci[t][1]:+.2f}]" if t in c.per_task else "n/a" for t in MODALITIES}
        flag = "negative transfer" if c.negative_transfer else ("gain" if c.positive_transfer else "")
        hurt = [t.upper() for t in MODALITIES if t in c.per_task_ci and c.per_task_ci[t][1] < 0]
        if hurt and not c.negative_transfer:
            flag = (flag + "; " if flag else "") + f"negative transfer on {', '.join(hurt)}"
        lines.append(f"| {c.condition[0]} | {c.condition[1]} | {c.variant} | {c.weighting} | {c.seeds} | {_fmt(c)} | {task['ct']} | {task['mr']} | {flag} |")
    return "\n".join(lines)


def dice_tables(results: list[CellResult]) -> tuple[str, str]:
    """Markdown tables: per-modality mean Dice and per-organ Dice, mean ± sd over seeds, per cell group."""
    groups: dict[tuple, list[CellResult]] = {}
    for r in results:
        f = r.factors
        groups.setdefault((f["dataset"], f["budget"], f["variant"], f["weighting"]), []).append(r)
    mod = ["| data set | MR budget | variant | weighting | seeds | CT Dice | MR Dice |", "|---|---|---|---|---|---|---|"]
    organs = sorted({c for r in results for m in MODALITIES for c in r.classes.get(m, [])},
                    key=lambda c: next(i for r in results for m in MODALITIES for i, x in enumerate(r.classes.get(m, [])) if x == c))
    org = ["| data set | MR budget | variant | weighting | " + " | ".join(f"{m.upper()} {c}" for m in MODALITIES for c in organs) + " |",
           "|---|---|---|---|" + "---|" * (len(organs) * len(MODALITIES))]
    for key in sorted(groups):
        rs = groups[key]
        per_mod = {m: [float(np.nanmean(list(r.case_scores(m).values()))) if r.case_scores(m) else math.nan for r in rs] for m in MODALITIES}
        mod.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(rs)} | {_ms(per_mod['ct'])} | {_ms(per_mod['mr'])} |")
        cells = []
        for m in MODALITIES:
            for c in organs:
                vals = []
                for r in rs:
                    v = [row[c] for row in r.per_case if row["modality"] == m and row.get(c) is not None and not math.isnan(row[c])]
                    vals.append(float(np.mean(v)) if v else math.nan)
                cells.append(_ms(vals))
        org.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + " |")
    return "\n".join(mod), "\n".join(org)


def cost_table(results: list[CellResult], baseline: str) -> str:
    """Markdown table: parameters and median step time per variant and weighting, with ratios to the baseline."""
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for r in results:
        groups.setdefault((r.factors["variant"], r.factors["weighting"]), []).append(r)
    base = [r for (v, _), rs in groups.items() if v == baseline for r in rs]
    b_time = float(np.nanmedian([r.step_seconds for r in base])) if base else math.nan
    b_par = base[0].parameters if base else 0
    lines = ["| variant | weighting | parameters | x baseline | median step (s) | x baseline |", "|---|---|---|---|---|---|"]
    for (v, w), rs in sorted(groups.items()):
        t = float(np.nanmedian([r.step_seconds for r in rs]))
        p = rs[0].parameters
        lines.append(f"| {v} | {w} | {p:,} | {p / b_par if b_par else math.nan:.2f} | {t:.3f} | {t / b_time if b_time == b_time and b_time > 0 else math.nan:.2f} |")
    return "\n".join(lines)


def _plots(comps: list[Comparison], results: list[CellResult], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    conds = sorted({c.condition for c in comps})
    if conds:
        fig, axes = plt.subplots(1, len(conds), figsize=(4.8 * len(conds), 3.8), squeeze=False)
        for ax, cond in zip(axes[0], conds):
            cs = sorted([c for c in comps if c.condition == cond], key=lambda c: c.delta_m)
            y = np.arange(len(cs))
            err = np.array([[c.delta_m - c.ci[0] for c in cs], [c.ci[1] - c.delta_m for c in cs]])
            colors = ["tab:red" if c.negative_transfer else "tab:green" if c.positive_transfer else "tab:gray" for c in cs]
            for k, c in enumerate(cs):
                ax.errorbar([c.delta_m], [y[k]], xerr=err[:, k : k + 1], fmt="none", ecolor=colors[k], capsize=3)
            ax.scatter([c.delta_m for c in cs], y, c=colors, zorder=3)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_yticks(y, [f"{c.variant}\n({c.weighting})" for c in cs], fontsize=7)
            ax.set_title(f"{cond[0]}, MR budget {cond[1]}", fontsize=9)
            ax.set_xlabel("delta_m vs single-task (%), 95% CI")
        fig.tight_layout()
        p = folder / "delta_m.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    # Dice per organ, per condition and modality: one bar per variant (mean over seeds), sd as error bars
    rconds = sorted({(r.factors["dataset"], r.factors["budget"]) for r in results})
    every = sorted({(r.factors["variant"], r.factors["weighting"]) for r in results})
    color = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(every)}  # one colour per variant in every panel
    if rconds:
        fig, axes = plt.subplots(len(rconds), len(MODALITIES), figsize=(10, 3.0 * len(rconds)), squeeze=False)
        for i, cond in enumerate(rconds):
            rs = [r for r in results if (r.factors["dataset"], r.factors["budget"]) == cond]
            names = sorted({(r.factors["variant"], r.factors["weighting"]) for r in rs})
            for j, m in enumerate(MODALITIES):
                ax = axes[i][j]
                organs = rs[0].classes.get(m, [])
                width = 0.8 / max(1, len(names))
                for k, name in enumerate(names):
                    vals = []
                    for c in organs:
                        per = [np.mean([row[c] for row in r.per_case if row["modality"] == m and row.get(c) is not None and not math.isnan(row[c])] or [math.nan])
                               for r in rs if (r.factors["variant"], r.factors["weighting"]) == name]
                        vals.append((np.nanmean(per), np.nanstd(per)))
                    x = np.arange(len(organs)) + k * width
                    ax.bar(x, [v[0] for v in vals], width, yerr=[v[1] for v in vals], color=color[name], capsize=1)
                ax.set_xticks(np.arange(len(organs)) + 0.4 - width / 2, organs, fontsize=7)
                ax.set_ylim(0, 1)
                ax.set_title(f"{m.upper()} Dice: {cond[0]}, MR budget {cond[1]}", fontsize=9)
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=color[n], label=f"{n[0]} ({n[1]})") for n in every], loc="lower center",
                   ncol=min(5, len(every)), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(every) > 5), 1, 1))
        p = folder / "dice_per_organ.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(folder: Path, *, title: str, results: list[CellResult], comps: list[Comparison], baseline: str,
                 claims: list[Claim] = (), notes: str = "", missing: list[str] = (), n_boot: int = 2000) -> tuple[Path, str, list[Path]]:
    """Write ``report.md`` and its PNGs into ``folder``; returns ``(report path, headline table, pictures)``."""
    folder.mkdir(parents=True, exist_ok=True)
    pics = _plots(comps, results, folder)
    head = headline_table(comps)
    mod, org = dice_tables(results)
    parts = [f"# {title}", ""]
    if notes:
        parts += [notes.strip(), ""]
    parts += ["## Headline: delta_m against single-task", "",
              f"delta_m in percent of the single-task Dice (mean over CT and MR; positive = better than single-task), "
              f"with a paired two-level bootstrap 95% interval ({n_boot} resamples over seeds, then test cases). "
              "`negative transfer`: the whole interval is below zero (`on MR`: the MR term's interval); `gain`: the whole interval is above zero.", "", head, ""]
    if claims:
        parts += ["## The claims, checked against these numbers", ""]
        for cl in claims:
            met, ev = cl.check(comps)
            verdict = "not tested" if met is None else ("**met**" if met else "**not met**")
            parts.append(f"- {cl.text}: {verdict} ({ev})")
        parts.append("")
    parts += ["## Findings per condition", ""]
    for cond in sorted({c.condition for c in comps}):
        cs = [c for c in comps if c.condition == cond]
        best = max(cs, key=lambda c: c.delta_m)
        neg = [_name(c) for c in cs if c.negative_transfer]
        pos = [_name(c) for c in cs if c.positive_transfer]
        parts.append(f"- {cond[0]}, MR budget {cond[1]}: best {_name(best)} {_fmt(best)}; "
                     f"interval above zero: {', '.join(pos) or 'none'}; negative transfer: {', '.join(neg) or 'none'}.")
        for c in cs:
            if not c.positive_transfer:
                continue
            ok = [t.upper() for t in MODALITIES if t in c.per_task_ci and c.per_task_ci[t][0] > 0]
            parts.append(f"  - {_name(c)}: the interval of each task's own term is above zero for {', '.join(ok) or 'neither task'}"
                         + ("; it gains on CT as well, whose labels were not made scarce: part of the gain is the mechanism "
                            "training faster or fitting better, not transfer to the scarce task" if "CT" in ok and cond[1] != "all" else "") + ".")
    seeds = sorted({c.seeds for c in comps})
    parts += ["", f"How far to trust the intervals: each rests on {', '.join(map(str, seeds))} seed(s) and their test cases; with "
              "few seeds the seed level of the bootstrap has few distinct draws, so the intervals are optimistic and a "
              "result that holds for one seed only is not a result."]
    parts += ["", "![delta_m per variant](delta_m.png)", "", "## Dice per modality (mean ± sd over seeds of the cells' mean test Dice)", "", mod, "",
              "## Dice per organ (mean ± sd over seeds)", "", org, "", "![Dice per organ](dice_per_organ.png)", "",
              "## Compute cost", "", "Parameters of the whole network (both columns, sharing modules, heads); median wall time of one "
              "training step (both modalities' batches, forward, backward, update) over the cells of a variant, on the machine that ran them. "
              "Cells ran in separate processes at different times: on a machine shared with other jobs these times carry that load, "
              "and `benchmarks/sharing.py` measures the ratios side by side.", "",
              cost_table(results, baseline), ""]
    if missing:
        parts += ["## Cells without a result", "", *[f"- {m}" for m in missing], ""]
    path = folder / "report.md"
    path.write_text("\n".join(parts))
    return path, head, pics
