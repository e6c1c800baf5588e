"""Sweeps and tuning: the α_FB × α_RB grid (with the paper's ablations), Pareto fronts, quality budgets."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import BildError
from .methods import Method, _make


def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BildError(f"--{name} takes comma-separated numbers, got {text!r}", field=name) from None
    if not values:
        raise BildError(f"--{name} is empty", field=name)
    return values


def grid(fallbacks: list[float], rollbacks: list[float], gammas: list[int], ablations: bool = True) -> list[Method]:
    """ar, bild over fallbacks × rollbacks, and speculative per gamma. Ablations: fallback only
    (rollback=inf) for each α_FB, and rollback only (fallback=0: the big model runs every max_little tokens)
    for each α_RB."""
    fbs, rbs = list(dict.fromkeys(fallbacks)), list(dict.fromkeys(rollbacks))
    pairs = [(f, r) for f in fbs for r in rbs]
    if ablations:
        pairs += [(f, math.inf) for f in fbs if f > 0] + [(0.0, r) for r in rbs if r != math.inf]
    out = [Method("ar")] + [_make("bild", {"fallback": f, "rollback": r}) for f, r in dict.fromkeys(pairs)]
    return out + [_make("speculative", {"gamma": g}) for g in dict.fromkeys(gammas)]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both maximised), by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


def plot_pareto(rows: dict[str, dict], path: str, title: str = "") -> None:
    """Speedup vs ar against ROUGE-L vs ar, one point per method, the front joined, ar marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m for m, r in rows.items() if r.get("rouge_l") is not None and r.get("speedup_vs_ar") is not None]
    points = [(rows[m]["rouge_l"], rows[m]["speedup_vs_ar"]) for m in labels]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for family, color in (("bild", "tab:blue"), ("speculative", "tab:green")):
        xs = [p for m, p in zip(labels, points) if m.split(":")[0] == family]
        ax.scatter([x for x, _ in xs], [y for _, y in xs], color=color, label=family, s=25)
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="gray", label="Pareto front")
    for i in front:
        ax.annotate(labels[i].replace("bild:", "").replace("speculative:", "spec "), points[i], fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if "ar" in labels:
        ax.scatter([points[labels.index("ar")][0]], [points[labels.index("ar")][1]], marker="*", s=200,
                   color="tab:red", label="ar (big model alone)", zorder=5)
    ax.axhline(1.0, color="tab:red", lw=0.5)
    ax.set_xlabel("ROUGE-L vs ar output")
    ax.set_ylabel("speedup vs ar (tokens/s ratio)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True, slots=True)
class Budget:
    metric: str        # rouge_l, bleu, identical_to_ar, ppl or pass_at_1
    op: str            # ">=" or "<="
    value: float
    relative: bool     # ppl: value is a percentage over ar's perplexity; pass_at_1: points (of 100) below ar's

    def ok(self, row: dict, ar_row: dict) -> bool:
        got = row.get(self.metric)
        if got is None or (isinstance(got, float) and math.isnan(got)):
            return False
        limit = self.value
        if self.relative and self.metric == "ppl":
            limit = ar_row["ppl"] * (1 + self.value / 100)
        elif self.relative:
            limit = ar_row["pass_at_1"] - self.value / 100
        return got >= limit - 1e-12 if self.op == ">=" else got <= limit

    def __str__(self) -> str:
        if self.relative and self.metric == "pass_at_1":
            return f"pass@1>=-{self.value:g}pt"
        return f"{self.metric}{self.op}{'+' if self.relative else ''}{self.value:g}{'%' if self.relative else ''}"


METRICS = {"rouge_l": ">=", "bleu": ">=", "identical": ">=", "identical_to_ar": ">=", "ppl": "<=", "pass@1": ">="}
_BUDGET = re.compile(r"^\s*([a-z_@1]+)\s*(>=|<=)\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|pt)?\s*$")
EXAMPLES = "rouge_l>=0.9, bleu>=40, identical>=0.5, ppl<=+3% (over ar), ppl<=12, pass@1>=-1pt (below ar) or pass@1>=0.6"


def parse_budget(text: str) -> Budget:
    """One of EXAMPLES: a floor or ceiling on a metric, absolute, or relative to ar's (ppl in %, pass@1 in points)."""
    m = _BUDGET.match(text)
    if not m:
        raise BildError(f"cannot parse budget {text!r}; examples: {EXAMPLES}", field="budget")
    metric, op, sign, value, unit = m.groups()
    if metric not in METRICS:
        raise BildError(f"unknown budget metric {metric!r}; choose one of rouge_l, bleu, identical, ppl, pass@1",
                        field="budget")
    if op != METRICS[metric]:
        raise BildError(f"a {metric} budget is a {'lower' if METRICS[metric] == '>=' else 'upper'} bound: "
                        f"use {metric}{METRICS[metric]}...", field="budget")
    relative = {"ppl": ("+", "%"), "pass@1": ("-", "pt")}.get(metric)
    if (sign or unit) and (relative is None or (sign, unit) != relative):
        form = f"{metric}{op}{relative[0]}N{relative[1]}" if relative else "absolute values only"
        raise BildError(f"a relative {metric} budget is written {form}, not {text!r}"
                        if relative else f"relative budgets are for ppl and pass@1, not {metric}", field="budget")
    metric = {"identical": "identical_to_ar", "pass@1": "pass_at_1"}.get(metric, metric)
    return Budget(metric, op, float(value), relative=bool(unit))


def choose(rows: dict[str, dict], budget: Budget) -> str | None:
    """The bild setting with the highest speedup vs ar among those within the budget."""
    ar = rows.get("ar")
    if ar is None:
        raise BildError("tuning needs ar records as the reference")
    ok = [m for m, r in rows.items() if m.startswith("bild") and r.get("speedup_vs_ar") is not None
          and budget.ok(r, ar)]
    return max(ok, key=lambda m: rows[m]["speedup_vs_ar"], default=None)
