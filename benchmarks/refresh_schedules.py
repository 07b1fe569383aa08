"""What any full-refresh trigger could reach on a model: every refresh schedule, a per-problem oracle, triggers simulated.

    python benchmarks/refresh_schedules.py --model dream-sudoku --n 500 --out docs/bench/schedules-dream-sudoku

A trigger of the `entropy` policy decides, after each step, whether the next step recomputes everything or only
the block's masks and the recent commits (here k 8 and the last step's commits). Whatever its signal, on one
problem it produces one refresh schedule (the set of steps that are full), and with deterministic decoding
(threshold, fp32, batch invariant) a schedule's outcome is fixed. So this runs the schedules themselves:
"none" (every step full), "never" (step 0 only), one refresh at each step 1..--single, and two at each pair of
steps in 1..--pairs, on the same held-out problems, and reports:

* each schedule's accuracy and rows x forwards relative to "none";
* the oracle: per problem the cheapest schedule run that solves it. No trigger of this kind does better, though
  the oracle also profits from having many tries at a problem whose outcome a perturbation flips;
* a perfect choice of problems with a fixed timing: refresh once at step s exactly on the problems "never" gets
  wrong;
* how well signals of "never"'s commits tell its failures from its successes (AUC over the whole trace: what an
  online trigger sees is less);
* single-refresh triggers simulated exactly: a trigger that fires first after step j of "never" (its trace up to
  there is "never"'s) and never again has the outcome of the schedule with one refresh at step j + 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Callable

import msgspec

from dengine.bench.accuracy import model_task
from dengine.bench.report import QuietCheck, run_record, write_report
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.llm import LLM
from dengine.sampling_params import SamplingParams
from dengine.scheduler.policies import POLICIES
from dengine.scheduler.policies.entropy import EntropyCache, EntropyOptions, commit_entropies
from dengine.tasks import generation_lengths

PARTIAL = {"tau": 1e9, "k": 8, "recent_steps": 1}  # what a partial step computes (the entropy policy's options)
Steps = list[dict[str, list]]  # one problem's steps: commit positions, confidences, entropies


class ScheduleOptions(EntropyOptions, forbid_unknown_fields=True):
    refresh_at: list[int] = msgspec.field(default_factory=list)  # the steps (0 = the first) recomputed in full


class Schedule(EntropyCache):
    """The entropy policy's partial steps, with full steps exactly at refresh_at; records each step's commits."""

    name = "schedule"
    Options = ScheduleOptions
    log: dict[str, Steps] = {}

    def __init__(self, options: ScheduleOptions) -> None:
        super().__init__(options)
        self.step = 0

    def observe(self, seq, outcome, full: bool) -> None:
        super().observe(seq, outcome, full)
        self.step += 1
        self.needs_full_recompute = self.step in self.options.refresh_at
        if outcome.positions.numel():
            probs = outcome.probs.double()
            Schedule.log.setdefault(seq.request_id, []).append({
                "full": full, "conf": probs.gather(-1, outcome.tokens[:, None]).squeeze(-1).tolist(),
                "ent": commit_entropies(probs).tolist()})


def run_schedules(llm: LLM, problems, base: SamplingParams, schedules: dict[str, list[int] | None]) -> dict:
    conversations = [[{"role": "user", "content": p.question}] for p in problems]
    runs = {}
    for name, refresh_at in schedules.items():
        Schedule.log = {}
        config = None if refresh_at is None else {**PARTIAL, "refresh_at": refresh_at}
        outputs = llm.chat(conversations, base.replace(cache_policy="none" if config is None else "schedule",
                                                       cache_config=config), use_tqdm=False)
        runs[name] = {"correct": [bool(p.check(o.text or "")) for p, o in zip(problems, outputs)],
                      "rows": [o.metrics.query_tokens for o in outputs],
                      "steps": [Schedule.log.get(o.request_id, []) for o in outputs]}
        print(f"{name}: {sum(runs[name]['correct']) / len(problems):.1%}", flush=True)
    return runs


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(a positive scores above a negative), ties half."""
    wins = sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


def partial(steps: Steps) -> Steps:
    return [s for s in steps if not s["full"]]


SIGNALS: dict[str, Callable[[Steps], float]] = {  # larger: more suspect
    "entropy mass of the partial steps": lambda st: sum(sum(s["ent"]) for s in partial(st)),
    "max entropy of a partial step's commit": lambda st: max([max(s["ent"]) for s in partial(st)] or [0.0]),
    "lowest confidence of a partial step's commit": lambda st: -min([min(s["conf"]) for s in partial(st)] or [1.0]),
    "partial steps committing below 0.9": lambda st: sum(min(s["conf"]) < 0.9 for s in partial(st)),
    "steps": len,
    "step 0's entropy mass": lambda st: sum(st[0]["ent"]) if st else 0.0,
    "fewer commits at step 0": lambda st: -len(st[0]["conf"]) if st else 0.0,
}


def triggers() -> dict[str, Callable[[Steps], bool]]:
    """Candidate first firings, given the steps so far (the last one just observed)."""
    found: dict[str, Callable[[Steps], bool]] = {}
    for tau in (0.5, 1.0, 1.5, 2.0, 3.0):
        found[f"entropy mass since step 0 (step 0's included) > {tau}"] = (
            lambda st, tau=tau: sum(sum(s["ent"]) for s in st) > tau)
        found[f"entropy mass of the partial steps > {tau}"] = lambda st, tau=tau: SIGNALS[
            "entropy mass of the partial steps"](st) > tau
    for least in (0.9, 0.8, 0.75, 0.7, 0.6):
        found[f"a partial step commits below {least}"] = lambda st, least=least: (
            not st[-1]["full"] and min(st[-1]["conf"]) < least)
    for count in (2, 3):
        found[f"the {count}th partial step committing below 0.9"] = lambda st, count=count: (
            sum(min(s["conf"]) < 0.9 for s in partial(st)) >= count)
    return found


def analyse(runs: dict, single: int) -> tuple[str, dict]:
    none, never = runs["none"], runs["never"]
    n, base = len(none["correct"]), sum(none["rows"])
    none_accuracy = sum(none["correct"]) / n
    lines, summary = [], {}

    def row(label: str, correct: list[bool], rows: list[int], extra: str = "") -> None:
        delta = sum(correct) / n - none_accuracy
        lines.append(f"| {label} | {sum(correct) / n:.1%} ({delta * 100:+.1f}) | {sum(rows) / base:.3f} |{extra}")
        summary[label] = {"accuracy": sum(correct) / n, "delta_points": delta * 100, "work": sum(rows) / base}

    lines += ["| schedule (full steps besides step 0) | accuracy (vs none) | rows x forwards / none's |", "|---|---|---|"]
    for name, run in runs.items():
        row(name, run["correct"], run["rows"])
    cached = [name for name in runs if name != "none"]
    best = [min((runs[k]["rows"][i], k) for k in cached if runs[k]["correct"][i]) if any(
        runs[k]["correct"][i] for k in cached) else (runs["never"]["rows"][i], "never") for i in range(n)]
    lines += ["", "| bound | accuracy (vs none) | rows x forwards / none's |", "|---|---|---|"]
    row("oracle: per problem the cheapest schedule that solves it", [runs[k]["correct"][i] for i, (_, k) in
                                                                      enumerate(best)], [r for r, _ in best])
    for step in range(1, single + 1):
        chosen = ["never" if never["correct"][i] else str(step) for i in range(n)]
        row(f"perfect choice of problems, one refresh at step {step}",
            [runs[k]["correct"][i] for i, k in enumerate(chosen)], [runs[k]["rows"][i] for i, k in enumerate(chosen)])
    solved = [i for i in range(n) if none["correct"][i]]
    failed = [i for i in solved if not never["correct"][i]]
    kept = [i for i in solved if never["correct"][i]]
    lines += ["", f"Signals of \"never\"'s whole trace: its {len(failed)} failures against its {len(kept)} successes "
                  "(problems \"none\" solves)", "", "| signal | AUC |", "|---|---|"]
    summary["auc"] = {}
    if failed and kept:
        for label, signal in SIGNALS.items():
            value = auc([signal(never["steps"][i]) for i in failed], [signal(never["steps"][i]) for i in kept])
            lines.append(f"| {label} | {value:.2f} |")
            summary["auc"][label] = value
    lines += ["", "| single-refresh trigger, simulated | accuracy (vs none) | rows x forwards / none's | problems "
                  "refreshed |", "|---|---|---|---|"]
    for label, fire in triggers().items():
        chosen = []
        for i in range(n):
            steps = never["steps"][i]
            first = next((j for j in range(len(steps)) if fire(steps[: j + 1])), None)
            chosen.append("never" if first is None or first + 1 >= len(steps) else str(first + 1))
        if any(k not in runs for k in chosen):
            continue  # fires after the last single-refresh schedule run
        refreshed = sum(k != "never" for k in chosen) / n
        row(label, [runs[k]["correct"][i] for i, k in enumerate(chosen)],
            [runs[k]["rows"][i] for i, k in enumerate(chosen)], f" {refreshed:.0%} |")
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default="dream-sudoku")
    parser.add_argument("--n", type=positive_int, default=500, help="held-out problems")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--single", type=positive_int, default=12, help="one refresh at each step 1..SINGLE")
    parser.add_argument("--pairs", type=positive_int, default=6, help="two refreshes at each pair of steps 1..PAIRS")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    POLICIES[Schedule.name] = Schedule
    task = model_task(args.model, None)
    gen_length, block_length = generation_lengths(task, None, None)
    base = SamplingParams(gen_length=gen_length, block_length=block_length, threshold=args.threshold,
                          stop_at_eos=True)
    schedules: dict[str, list[int] | None] = {"none": None, "never": []}
    schedules |= {str(step): [step] for step in range(1, args.single + 1)}
    schedules |= {f"{a},{b}": [a, b] for a, b in itertools.combinations(range(1, args.pairs + 1), 2)}
    check = QuietCheck()
    llm = LLM(args.model, dtype="float32", max_num_seqs=args.batch_size)
    runs = run_schedules(llm, task.held_out(args.n), base, schedules)
    markdown, summary = analyse(runs, args.single)
    print(markdown)
    record = run_record("python benchmarks/refresh_schedules.py", argv, check, model=args.model, task=task.name,
                        partial=PARTIAL, summary=summary,
                        runs={k: {"correct": v["correct"], "rows": v["rows"]} for k, v in runs.items()})
    write_report(args.out, record, markdown)


if __name__ == "__main__":
    main()
