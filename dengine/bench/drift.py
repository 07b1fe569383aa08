"""EntropyCache's two observations, measured on a model's own task under exact decoding.

    dengine bench drift --model llada-sudoku --n 200 --out docs/bench/drift-llada --plot

Every step of exact decoding (policy "none") recomputes the whole canvas, so the K/V the paged cache holds
after step s are those of canvas x_s, and after step s + 1 those of x_{s+1}, the canvas with step s's
commits. Their difference is exactly how stale a cache that skipped step s + 1's recompute would be:

(a) entropy tracks drift: per step s, the relative L2 drift ||KV(x_{s+1}) - KV(x_s)|| / ||KV(x_{s+1})||
    over every layer, K and V, every position (and over the positions not committed at s, the settled ones,
    and those after the next step's block: the still-masked suffix a partial step reads from the cache unless
    EntropyCache's `suffix` recomputes it), against the
    maximum entropy of the tokens committed at s, and against cheaper or rival signals (mean entropy,
    max 1 - confidence, the number of commits): Spearman rank correlations over all steps of all problems;
(c) for parallel decoding (several commits a step), the drift a cache accumulates: for every window of
    j = 1..MAX_WINDOW steps starting at s, the drift from canvas s to s + j of the settled positions (the
    prompt and the tokens committed before s: what a partial step reads from the cache) against signals of
    the window's commits (entropy mass, max entropy, the sum of the steps' max entropies, commits, steps),
    the candidates for a recompute trigger that works when many tokens commit per step;
(b) volatility persists after unmasking: a token committed at step c keeps changing its own K/V at steps
    c + d (relative L2 per position, every layer); the mean per d = 0..16 says how many recent commits
    are worth recomputing (EntropyCache's k). d = 0 is the commit itself (its input changes from the mask).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dengine.assets import resolve_model
from dengine.bench.accuracy import add_task_arguments, model_task
from dengine.bench.policies import sampler_params
from dengine.bench.report import QuietCheck, figure, plot_title, run_record, write_report
from dengine.decoding import StepOutcome
from dengine.engine import LLMEngine
from dengine.cli_args import DefaultsHelpFormatter, positive_int
from dengine.scheduler.policies.none import NoCache
from dengine.llm import chat_prompt
from dengine.sampling_params import SamplingParams
from dengine.tasks import generation_lengths

MAX_LAG = 16
SIGNALS = ("max_entropy", "mean_entropy", "max_one_minus_confidence", "num_commits", "sum_entropy",
           "count_x_max_entropy", "sum_one_minus_confidence")
MAX_WINDOW = 8
WINDOW_SIGNALS = ("sum_entropy", "max_entropy", "sum_step_max_entropy", "num_commits", "steps")
TARGETS = ("drift", "drift_others", "drift_settled", "drift_suffix")  # which positions' K/V drift


class RecordingNoCache(NoCache):
    """Exact decoding that keeps every step's commits (positions, tokens, distributions)."""

    def __init__(self) -> None:
        super().__init__(NoCache.parse_options(None))
        self.outcomes: list[StepOutcome] = []

    def observe(self, seq, outcome, full: bool) -> None:
        self.outcomes.append(outcome)


@dataclass
class StepDrift:
    """One step s of one problem: the commits' signals and the K/V drift they cause."""

    signals: dict[str, float]
    drift: float  # every position
    drift_others: float  # positions not committed at s
    drift_settled: float  # the prompt and the tokens committed before s
    drift_suffix: float  # the positions after the next step's block (still masks); nan where there are none
    layer_drift: list[float]


@dataclass
class Trajectory:
    """One problem decoded exactly: per-step drift, and per-position drift of its K/V at each step."""

    steps: list[StepDrift]
    position_drift: torch.Tensor  # [num_steps - 1, T]: relative drift of each position between s and s + 1
    commit_step: dict[int, int]  # canvas position -> the step that committed it
    canvases: list[torch.Tensor] = field(default_factory=list)  # x_s for every step (kept for checking)
    windows: list[dict[str, float]] = field(default_factory=list)  # window signals and drift_settled (see (c))


def commit_signals(outcome: StepOutcome) -> dict[str, float]:
    """The candidate signals of one step's commits (natural-log entropies)."""
    entropy = torch.special.entr(outcome.probs.double()).sum(-1)
    confidence = outcome.probs.double().gather(-1, outcome.tokens[:, None]).squeeze(-1)
    count = outcome.tokens.numel()
    return {"max_entropy": float(entropy.max()), "mean_entropy": float(entropy.mean()),
            "max_one_minus_confidence": float((1 - confidence).max()), "num_commits": float(count),
            "sum_entropy": float(entropy.sum()), "count_x_max_entropy": count * float(entropy.max()),
            "sum_one_minus_confidence": float((1 - confidence).sum())}


def window_drift(snapshots: list[torch.Tensor], signals: list[dict[str, float] | None], settled: list[torch.Tensor],
                 max_window: int = MAX_WINDOW) -> list[dict[str, float]]:
    """(c): per window of j steps from s (s a step with commits), the drift of the positions settled before s
    from snapshot s to s + j, and the window's signals. signals[s] is None for a step without commits."""
    windows = []
    for s, first in enumerate(signals):
        if s + 1 >= len(snapshots):
            break
        if first is None:
            continue
        old = snapshots[s][:, :, settled[s]]
        mass = peak = step_peaks = commits = 0.0
        for j in range(1, max_window + 1):
            if s + j >= len(snapshots):
                break
            step = signals[s + j - 1]
            if step is not None:
                mass += step["sum_entropy"]
                peak = max(peak, step["max_entropy"])
                step_peaks += step["max_entropy"]
                commits += step["num_commits"]
            windows.append({"steps": float(j), "sum_entropy": mass, "max_entropy": peak,
                            "sum_step_max_entropy": step_peaks, "num_commits": commits,
                            "drift_settled": relative_drift(snapshots[s + j][:, :, settled[s]], old)})
    return windows


def snapshot(engine: LLMEngine, table: list[int], num_tokens: int) -> torch.Tensor:
    """The cached K and V of positions 0..num_tokens-1 of a block table, every layer: [layers, 2, T, kv_dim]
    in float32 at least (float64 caches stay float64)."""
    cache = engine.runner.kv_cache
    size = cache.block_size
    table = torch.as_tensor(table, dtype=torch.long)
    positions = torch.arange(num_tokens)
    slots = table[positions // size] * size + positions % size
    layers = []
    for key, value in zip(cache.key, cache.value):
        flat = [t.view(-1, t.shape[-2] * t.shape[-1])[slots].to(torch.promote_types(t.dtype, torch.float32))
                for t in (key, value)]
        layers.append(torch.stack(flat))
    return torch.stack(layers)


def relative_drift(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / new.norm().clamp_min(1e-30))


def decode_with_drift(engine: LLMEngine, prompt, params: SamplingParams, keep_canvases: bool = False) -> Trajectory:
    """Decode one prompt exactly, alone in the engine, measuring the cache's drift after every step."""
    seq = engine.make_sequence("drift", prompt, params.replace(cache_policy="none", cache_config=None,
                                                                stop_at_eos=False))
    recorder = RecordingNoCache()
    seq.policy = recorder
    engine.add_sequence(seq)
    snapshots, canvases, block_ends, table = [], [], [], None
    while not seq.is_finished:
        canvases.append(seq.canvas.clone())
        block_ends.append(seq.block_end)
        engine.step()
        # A sequence's blocks never change while it runs; the last step frees them (unwritten since).
        table = seq.block_tables[0] if seq.block_tables else table
        if table is None:
            break  # finished in its first step (parallel decoding): no later step to compare with
        snapshots.append(snapshot(engine, table, seq.num_tokens))
    steps, per_position, commit_step = [], [], {}
    settled_now = torch.zeros(seq.num_tokens, dtype=torch.bool)
    settled_now[: seq.prompt_len] = True
    settled, signals = [], []
    for outcome in recorder.outcomes:
        settled.append(settled_now.clone())
        settled_now[outcome.positions] = True
        signals.append(commit_signals(outcome) if outcome.positions.numel() else None)
    for s, outcome in enumerate(recorder.outcomes):
        for position in outcome.positions.tolist():
            commit_step[position] = s
        if s + 1 >= len(snapshots):
            break
        new, old = snapshots[s + 1], snapshots[s]
        norms = [torch.linalg.vector_norm(t, dim=(0, 1, 3)) for t in (new - old, new)]
        per_position.append(norms[0] / norms[1].clamp_min(1e-30))
        if outcome.positions.numel() == 0:
            continue  # nothing committed: the canvas did not change
        others = torch.ones(seq.num_tokens, dtype=torch.bool)
        others[outcome.positions] = False
        suffix = slice(block_ends[s + 1], seq.num_tokens)  # what step s + 1 reads beyond its block
        steps.append(StepDrift(
            signals=signals[s],
            drift=relative_drift(new, old),
            drift_others=relative_drift(new[:, :, others], old[:, :, others]),
            drift_settled=relative_drift(new[:, :, settled[s]], old[:, :, settled[s]]),
            drift_suffix=(relative_drift(new[:, :, suffix], old[:, :, suffix]) if block_ends[s + 1] < seq.num_tokens
                          else math.nan),
            layer_drift=[relative_drift(new[layer], old[layer]) for layer in range(new.shape[0])],
        ))
    return Trajectory(steps, torch.stack(per_position) if per_position else torch.zeros(0, seq.num_tokens),
                      commit_step, canvases if keep_canvases else [], window_drift(snapshots, signals, settled))


def average_ranks(values: list[float]) -> torch.Tensor:
    """1-based ranks, ties given their average rank."""
    x = torch.tensor(values, dtype=torch.float64)
    order = x.argsort(stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson on average ranks) over the pairs where y is a number; nan when
    either side is constant."""
    x, y = zip(*[(a, b) for a, b in zip(x, y) if not math.isnan(b)]) if x else ((), ())
    if not x:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denominator if denominator > 0 else math.nan


def mean(values: list[float]) -> float:
    """The mean of the values that are numbers (nan marks a step without the positions measured)."""
    numbers = [v for v in values if not math.isnan(v)]
    return sum(numbers) / len(numbers) if numbers else math.nan


def lag_profile(trajectories: list[Trajectory], max_lag: int = MAX_LAG) -> list[dict[str, float]]:
    """Per d = 0..max_lag: mean and median drift of a committed token's own K/V d steps after its commit."""
    by_lag: list[list[float]] = [[] for _ in range(max_lag + 1)]
    for trajectory in trajectories:
        for position, committed in trajectory.commit_step.items():
            for lag in range(max_lag + 1):
                step = committed + lag
                if step >= trajectory.position_drift.shape[0]:
                    break
                by_lag[lag].append(float(trajectory.position_drift[step, position]))
    return [{"lag": lag, "count": len(values),
             "mean": mean(values),
             "median": float(torch.tensor(values).median()) if values else math.nan}
            for lag, values in enumerate(by_lag)]


def reference_drift(trajectories: list[Trajectory], prompt_lengths: list[int]) -> tuple[float, float]:
    """Mean per-step drift of prompt positions (never masked) and of still-masked positions: the levels a
    committed token's drift is compared with."""
    prompt, masked = [], []
    for t, length in zip(trajectories, prompt_lengths):
        steps, positions = t.position_drift.shape
        if not steps:
            continue
        prompt.append(t.position_drift[:, :length].flatten())
        committed = torch.full((positions,), steps + 1)
        for position, step in t.commit_step.items():
            committed[position] = step
        still_masked = committed[None, length:] > torch.arange(steps)[:, None]  # [steps, generated]
        masked.append(t.position_drift[:, length:][still_masked])
    joined = lambda parts: float(torch.cat(parts).mean()) if parts else math.nan  # noqa: E731
    return joined(prompt), joined(masked)


@dataclass
class DriftReport:
    n: int
    steps: int
    correlations: dict[str, dict[str, float]]  # signal -> {target: rho} for every target of TARGETS
    mean_drift: dict[str, float]  # target -> mean over the steps where it has positions
    window_correlations: dict[str, float]  # (c): window signal -> rho against the settled positions' drift
    windows: int
    layer_drift: list[float]  # mean per layer
    lags: list[dict[str, float]]
    prompt_drift: float
    masked_drift: float
    points: list[dict[str, float]] = field(default_factory=list)  # per step: signals and drift (for plots)


def summarise(trajectories: list[Trajectory], prompt_lengths: list[int]) -> DriftReport:
    steps = [s for t in trajectories for s in t.steps]
    correlations = {
        signal: {target: spearman([s.signals[signal] for s in steps], [getattr(s, target) for s in steps])
                 for target in TARGETS}
        for signal in SIGNALS
    }
    mean_drift = {target: mean([getattr(s, target) for s in steps]) for target in TARGETS}
    windows = [w for t in trajectories for w in t.windows]
    window_correlations = {signal: spearman([w[signal] for w in windows], [w["drift_settled"] for w in windows])
                           for signal in WINDOW_SIGNALS}
    layers = len(steps[0].layer_drift) if steps else 0
    layer_drift = [sum(s.layer_drift[i] for s in steps) / len(steps) for i in range(layers)]
    points = [{name: float(f"{value:.4g}") for name, value in  # 4 digits: enough to redraw the plots
               {**s.signals, "drift": s.drift, "drift_others": s.drift_others}.items()} for s in steps]
    return DriftReport(len(trajectories), len(steps), correlations, mean_drift, window_correlations, len(windows),
                       layer_drift, lag_profile(trajectories),
                       *reference_drift(trajectories, prompt_lengths), points)


def markdown(report: DriftReport) -> str:
    def cell(value: float) -> str:
        return "n/a (constant)" if math.isnan(value) else f"{value:+.3f}"

    lines = [f"{report.n} problems, {report.steps} steps with commits.", "",
             "| signal of step s's commits | Spearman vs drift (all positions) | vs drift (others) "
             "| vs drift (settled: prompt and earlier commits) | vs drift (suffix: after the next step's block) |",
             "|---|---|---|---|---|"]
    lines += [f"| {signal} | " + " | ".join(cell(c[target]) for target in TARGETS) + " |"
              for signal, c in report.correlations.items()]
    lines += ["", "Mean relative drift per step: " + ", ".join(
        f"{target.replace('drift_', '') if target != 'drift' else 'all positions'} {value:.4f}"
        for target, value in report.mean_drift.items()) + "."]
    lines += ["", f"Windows of 1 to {MAX_WINDOW} steps ({report.windows}): the settled positions' drift from the "
              "window's start to its end against the window's commits:", "",
              "| signal of the window's commits | Spearman vs drift (settled) |", "|---|---|"]
    lines += [f"| {signal} | {cell(rho)} |" for signal, rho in report.window_correlations.items()]
    lines += ["", "| layer | " + " | ".join(str(i) for i in range(len(report.layer_drift))) + " |",
              "|---|" + "---|" * len(report.layer_drift),
              "| mean drift per step | " + " | ".join(f"{d:.4f}" for d in report.layer_drift) + " |", "",
              f"Committed tokens' own K/V drift d steps after their commit (for comparison, per step: prompt "
              f"positions {report.prompt_drift:.4f}, still-masked positions {report.masked_drift:.4f}):", "",
              "| d | tokens | mean | median |", "|---|---|---|---|"]
    lines += [f"| {row['lag']} | {row['count']} | {row['mean']:.4f} | {row['median']:.4f} |" for row in report.lags]
    return "\n".join(lines)


def plot(report: DriftReport, title: str, path: Path) -> None:
    """Left: drift against the max entropy of the step's commits. Right: a token's drift against steps since
    its commit."""
    with figure(path, title, ncols=2, figsize=(11, 4.2)) as (_, (left, right)):
        x = [max(p["max_entropy"], 1e-8) for p in report.points]  # log axis: entropies below 1e-8 drawn at it
        left.scatter(x, [p["drift"] for p in report.points], s=6, alpha=0.35, label="all positions")
        left.scatter(x, [p["drift_others"] for p in report.points], s=6, alpha=0.35, label="not committed at s")
        rho = report.correlations["max_entropy"]["drift"]
        left.set_title(f"entropy tracks drift (Spearman {rho:+.2f})", fontsize=10)
        left.set_xlabel("max entropy of the tokens committed at step s (nats)")
        left.set_xscale("log")
        left.set_ylabel("relative K/V drift, step s to s+1")
        left.set_yscale("log")
        left.legend(fontsize=8)
        lags = [row for row in report.lags if row["count"]]
        right.plot([r["lag"] for r in lags], [r["mean"] for r in lags], marker="o", label="mean")
        right.plot([r["lag"] for r in lags], [r["median"] for r in lags], marker="s", label="median")
        right.axhline(report.prompt_drift, color="grey", linestyle="--", label="prompt positions")
        right.axhline(report.masked_drift, color="grey", linestyle=":", label="still-masked positions")
        right.set_yscale("log")
        right.set_xlabel("steps since the token was committed (d)")
        right.set_ylabel("relative drift of its own K/V per step")
        right.set_title("volatility persists after unmasking", fontsize=10)
        right.legend(fontsize=8)


def main(argv: list[str] | None = None) -> DriftReport:
    parser = argparse.ArgumentParser(prog="dengine bench drift", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default="llada-sudoku", help="embedded model name or checkpoint folder")
    parser.add_argument("--n", type=positive_int, default=200, help="held-out problems")
    parser.add_argument("--sampler", default=None, help="one-token (default: the task's), threshold:V or factor:V")
    add_task_arguments(parser)
    parser.add_argument("--dtype", default="float32", help="float32 keeps rounding far below the drift measured")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json (and OUT.png with --plot)")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--no-tqdm", action="store_true")
    args = parser.parse_args(argv)
    task = model_task(args.model, args.task)
    sampler = args.sampler or task.sampler
    params = sampler_params(sampler, *generation_lengths(task, args.gen_length, args.block_length))
    check = QuietCheck()
    engine = LLMEngine(resolve_model(args.model), dtype=args.dtype, cache_policy="none", max_num_seqs=1)
    problems = task.held_out(args.n)
    trajectories, prompt_lengths = [], []
    for problem in tqdm(problems, desc=f"drift ({sampler})", disable=args.no_tqdm, dynamic_ncols=True):
        prompt = chat_prompt(engine.tokenizer, [{"role": "user", "content": problem.question}])
        prompt_lengths.append(len(prompt["prompt_token_ids"]))
        trajectories.append(decode_with_drift(engine, prompt, params))
    report = summarise(trajectories, prompt_lengths)
    text = markdown(report)
    print(text)
    record = run_record("dengine bench drift", argv, check, model=str(args.model), task=task.name, sampler=sampler,
                        **{k: v for k, v in asdict(report).items()})
    title = plot_title(record, f"{args.model} on {task.name}, {sampler}, exact decoding")
    write_report(args.out, record, text, (lambda path: plot(report, title, path)) if args.plot else None)
    return report


if __name__ == "__main__":
    main()
