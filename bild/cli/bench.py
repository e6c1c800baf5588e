"""`bild bench`, `bild sweep` and `bild tune` (bild.bench holds the library they drive).

Cheap to import: models, metrics and plotting load inside the handlers.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from ..bench.datasets import CALIBRATION
from ..bench.sweep import EXAMPLES
from ..config import GenerationConfig, read_settings
from ..errors import BildError
from .args import add_fields, add_model_args, given

DEFAULT_METHODS = ["ar", "speculative", "bild", "hf-generate", "hf-assisted"]


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark methods on a dataset; JSONL records + summary (resumable)")
    add_model_args(bench)
    _add_run_args(bench, dataset_choice=True)
    bench.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, metavar="SPEC",
                       help="ar, little, speculative[:gamma=N|:adaptive], bild[:fallback=F,rollback=R,max_little=N], "
                            f"hf-generate, hf-assisted, hf-prompt-lookup[:prompt_lookup_num_tokens=N], llamacpp "
                            f"(default: {' '.join(DEFAULT_METHODS)})")
    bench.add_argument("--config", dest="tuned_config", default=None,
                       help="JSON from `bild tune`: its settings fill bild parameters a spec leaves unset")
    bench.add_argument("--summary-only", action="store_true", help="summarise the records in -o; run nothing")
    bench.set_defaults(handler=cmd_bench)

    sweep = sub.add_parser("sweep", help="grid of bild α_FB × α_RB (with ablations) and speculative γ; Pareto plot")
    add_model_args(sweep)
    _add_run_args(sweep, dataset_choice=True, limit=10)
    _add_grid_args(sweep)
    sweep.add_argument("--gamma", default="2,4,6", help="speculative draft lengths (default 2,4,6)")
    sweep.add_argument("--no-ablations", action="store_true",
                       help="skip fallback-only (rollback=inf) and rollback-only (fallback=0) settings")
    sweep.set_defaults(handler=cmd_sweep)

    tune = sub.add_parser("tune", help="pick bild's α_FB, α_RB on calibration prompts within a quality budget")
    add_model_args(tune)
    _add_run_args(tune, dataset_choice=False, limit=10)
    _add_grid_args(tune)
    tune.add_argument("--dataset", default="sharegpt-calibration", choices=CALIBRATION,
                      help="calibration prompts: never a held-out set (default sharegpt-calibration)")
    tune.add_argument("--budget", required=True, help=EXAMPLES.replace("%", "%%"))
    tune.add_argument("--write", default=None, help="config file to write (default OUT/tuned.json); an existing "
                                                    "one keeps its other generate settings (e.g. a pair's lookup)")
    tune.set_defaults(handler=cmd_tune)


def _add_run_args(p, dataset_choice: bool, limit: int | None = None) -> None:
    if dataset_choice:
        p.add_argument("--dataset", default="sharegpt",
                       help="sharegpt (held-out split), humaneval (164 problems), humaneval-calibration or "
                            "humaneval-heldout (its even and odd halves), or jsonl:PATH (default sharegpt)")
    p.add_argument("-o", "--out", required=True, help="output directory (records.jsonl, summary.md/json, ...)")
    p.add_argument("--limit", type=int, default=limit, help=f"number of prompts (default {limit or 'all'})")
    add_fields(p, GenerationConfig, ["max_new_tokens"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--timeout", type=float, default=10.0, help="HumanEval: seconds per test run (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_grid_args(p) -> None:
    p.add_argument("--fallback", default="0.3,0.5,0.7,0.9", help="α_FB values (default 0.3,0.5,0.7,0.9)")
    p.add_argument("--rollback", default="2,3,5", help="α_RB values (default 2,3,5)")


def _max_new_tokens(args) -> int:
    return GenerationConfig(**given(args, GenerationConfig, ["max_new_tokens"])).max_new_tokens


# --- handlers ---------------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    from ..bench import load_tuned
    from ..bench.methods import parse_method
    from ..bench.runner import RECORDS, read_records

    methods = [parse_method(s) for s in args.methods]
    if args.tuned_config:
        tuned = load_tuned(args.tuned_config)
        methods = [m.with_defaults(tuned) for m in methods]
    labels = list(dict.fromkeys(m.label for m in methods))
    if len(labels) != len(methods):
        raise BildError("a method is listed twice", field="methods")
    if args.summary_only:
        records = read_records(os.path.join(args.out, RECORDS), repair=False)  # a run may still be writing
        if not records:
            raise BildError(f"no records in {args.out}", field="out")
        return _report(records, [m for m in labels if any(r["method"] == m for r in records)], args.out)
    records, _ = _run(args, methods, args.dataset)
    return _report(records, [m.label for m in methods if _ran(m, records)], args.out)


def cmd_sweep(args) -> int:
    from ..bench.summary import summarize
    from ..bench.sweep import grid, parse_floats, plot_pareto

    gammas = [int(g) for g in parse_floats(args.gamma, "gamma")]
    methods = grid(parse_floats(args.fallback, "fallback"), parse_floats(args.rollback, "rollback"), gammas,
                   ablations=not args.no_ablations)
    records, little = _run(args, methods, args.dataset)
    labels = [m.label for m in methods if _ran(m, records)]
    _report(records, labels, args.out)
    png = os.path.join(args.out, "pareto.png")
    summary = summarize(records, labels)
    plot_pareto(summary["methods"], png, title=f"{args.big} + {little}, {args.dataset}, "
                                               f"{summary['prompts']} prompts × {_max_new_tokens(args)} tokens")
    print(f"wrote {png}")
    return 0


def cmd_tune(args) -> int:
    from ..bench.summary import summarize
    from ..bench.sweep import choose, grid, parse_budget, parse_floats

    budget = parse_budget(args.budget)
    methods = grid(parse_floats(args.fallback, "fallback"), parse_floats(args.rollback, "rollback"), [])
    records, little = _run(args, methods, args.dataset)  # never the held-out prompts
    labels = [m.label for m in methods]
    _report(records, labels, args.out)
    summary = summarize(records, labels)
    best = choose(summary["methods"], budget)
    if best is None:
        print(f"no bild setting meets {budget}; keep ar, or relax the budget", file=sys.stderr)
        return 1
    row = summary["methods"][best]
    chosen = next(m for m in methods if m.label == best).kwargs
    path = args.write or os.path.join(args.out, "tuned.json")
    kept = read_settings(path) if os.path.isfile(path) else {}
    ar = summary["methods"]["ar"]
    config = {"generate": {**kept, "policy": "bild", **chosen},
              "tuned": {"budget": str(budget), "method": best, "big": args.big, "little": little,
                        "dataset": args.dataset, "prompts": summary["prompts"],
                        "max_new_tokens": _max_new_tokens(args),
                        **{k: row.get(k) for k in ("speedup_vs_ar", "rouge_l", "bleu", "ppl", "identical_to_ar",
                                                   "pass_at_1")},
                        "ar_ppl": ar.get("ppl"), "ar_pass_at_1": ar.get("pass_at_1")}}
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    quality = f"pass@1 {row['pass_at_1']:.3f} (ar {ar['pass_at_1']:.3f})" if row.get("pass_at_1") is not None \
        else f"ROUGE-L {row['rouge_l']:.3f}"
    print(f"chosen: fallback={chosen['fallback']:g} rollback={chosen['rollback']:g} "
          f"(speedup {row['speedup_vs_ar']:.2f}x, {quality}) -> {path}")
    if row["speedup_vs_ar"] < 1:
        print("note: no bild setting within the budget beat ar on these prompts; ar alone is faster", file=sys.stderr)
    return 0


# --- shared steps -----------------------------------------------------------------------------------------

def _run(args, methods, dataset: str) -> tuple[list[dict], str]:
    """Run the methods; -> (records, the little model's spec as BigLittle.load resolved it)."""
    from ..bench.datasets import load_items
    from ..bench.runner import machine, run_bench
    from .generate import load_pair

    items = load_items(dataset, args.limit)  # fail on a bad dataset before loading models
    max_new_tokens = _max_new_tokens(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    bl = load_pair(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "commands.txt"), "a") as f:
        f.write(shlex.join(["bild"] + sys.argv[1:]) + "\n")  # quoted: budgets hold shell characters
    settings = dict(big=args.big, little=bl.little_description, dataset=dataset,
                    engine=getattr(bl, "engine", "hf"), dtype=bl.precision, activations=_activations(bl),
                    machine=machine())
    records = run_bench(bl, items, methods, args.out, max_new_tokens, settings, progress=not args.no_progress,
                        timeout=args.timeout)
    return records, _little_spec(args)


def _report(records: list[dict], labels: list[str], out: str) -> int:
    from ..bench.summary import markdown, summarize

    summary = summarize(records, labels)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def _ran(method, records: list[dict]) -> bool:
    return any(r["method"] == method.label for r in records)


def _little_spec(args) -> str:
    """The little model as `BigLittle.load` resolves it: --little, else the big model's default draft, else the
    early exit models.load_little makes of None."""
    from ..models import default_little
    return args.little or default_little(args.big) or "early-exit"


def _activations(bl) -> str:
    """What the big model's products take, as run (the default depends on the model file)."""
    model = getattr(bl.big_runner, "model", None)
    return "int8" if getattr(model, "int8", False) else "fp32"
