"""The planner against the oracle and single-option baselines, on the stored outcome matrix.

Reads bench/data/planner_outcomes.jsonl (regenerate it with ``python -m bench.planner_matrix``),
gives every task a seeded scenario (latency budget 4/10/30 s, 0/2/8 expected follow-up questions),
fits the planner on one half of the tasks and scores it on the other (2-fold cross-fitting), and
prints, side by side: quality, cost, agreement with the oracle, quality regret, budget violations,
unanswered requests (infeasible option or refused) and quality per second, for the planner, the
oracle, always-rag, always-in-context, always-ttt, a context-length threshold (full in the window,
rag past it) and a random policy with the planner's mix of options. Then the same per task family.

    python -m bench.planner                 # evaluate (seconds, no model)
    python -m bench.planner --fit           # also refit retrieval/planner_model.json on every task
    python -m bench.planner --quick         # CI smoke: the same on the committed matrix
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from bench.common import RESULTS_DIR, environment, format_table, write_result
from bench.planner_matrix import DATA

NAME = "planner"


def load_tasks(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(evaluation, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed; no plot"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rows = [p.row() for p in evaluation.policies.values()] + [evaluation.oracle.row(), evaluation.ceiling.row()]
    for row in rows:
        ax.scatter(row["cost_s"], row["quality"], s=60)
        ax.annotate(row["policy"], (row["cost_s"], row["quality"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("mean measured seconds per request (preparation amortised)")
    ax.set_ylabel("mean answer quality")
    ax.set_title("planner vs oracle and baselines (held-out, 2-fold)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=Path, default=DATA)
    parser.add_argument("--fit", action="store_true", help="refit the bundled planner model on every task of the matrix")
    parser.add_argument("--out-model", type=Path, default=None, help="where --fit writes (default retrieval/planner_model.json)")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    from retrieval.planner import BUNDLED_MODEL, PlannerModel
    from retrieval.planner_eval import evaluate

    tasks = load_tasks(args.matrix)
    evaluation = evaluate(tasks, tolerance=args.tolerance)
    rows = [p.row() for p in evaluation.policies.values()] + [evaluation.oracle.row(), evaluation.ceiling.row()]
    headers = ["policy", "tasks", "quality", "cost_s", "agreement", "regret", "violations", "unanswered", "quality_per_s"]
    table = format_table(headers, [[r[h] for h in headers] for r in rows], f"Planner on {len(tasks)} tasks (held-out, 2-fold), tolerance {args.tolerance}")
    print(table)
    planner, oracle = evaluation.policies["planner"], evaluation.oracle
    print(f"(hindsight-by-situation: the best preference order of options per query class x length bucket,\n"
          f" chosen in hindsight on every task: the ceiling for a policy that sees only those features)")
    family_rows = []
    for family, cell in planner.by_family().items():
        oracle_cell = oracle.by_family()[family]
        choices = ", ".join(f"{o}:{n}" for o, n in sorted(cell["choices"].items(), key=lambda kv: str(kv[0])))
        family_rows.append([family, cell["quality"], oracle_cell["quality"], cell["cost_s"], oracle_cell["cost_s"], choices])
    family_table = format_table(["family", "planner q", "oracle q", "planner s", "oracle s", "planner choices"], family_rows, "Per task family")
    print(family_table)
    goals = evaluation.goals()
    print("goals:", json.dumps(goals))
    payload = {"benchmark": NAME, "quick": args.quick, "environment": environment(), "matrix": str(args.matrix), "tasks": len(tasks),
               "tolerance": args.tolerance, "rows": rows, "families": {"planner": planner.by_family(), "oracle": oracle.by_family()},
               "goals": goals, "choices": [c.__dict__ for c in planner.choices], "table": table + "\n" + family_table}
    path = write_result(NAME, payload)
    print(plot(evaluation, RESULTS_DIR / (f"{NAME}.quick.png" if args.quick else f"{NAME}.png")))
    print(f"results in {path}")
    if args.fit:
        model = PlannerModel.fit(tasks, meta={"matrix": args.matrix.name, "tasks": len(tasks), "machine": {k: environment()[k] for k in ("cpu_count", "torch_threads")},
                                              "model": "smollm2-135m-instruct"})
        out = args.out_model or BUNDLED_MODEL
        model.save(out)
        print(f"planner model fitted on {len(tasks)} tasks: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
