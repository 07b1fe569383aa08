"""`dengine bench drift`: its K/V drift and commit signals against the dense reference, by hand."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dengine import LLMEngine, SamplingParams
from dengine.bench import drift
from reference import dense_forward


def _kv(model, canvas: torch.Tensor) -> torch.Tensor:
    """[layers, 2, T, kv_dim]: every layer's K and V of the canvas from the dense reference forward."""
    _, layers = dense_forward(model, canvas)
    return torch.stack([torch.stack([k.flatten(1), v.flatten(1)]) for k, v in layers])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_drift_equals_the_dense_reference_by_hand(folders, family, seed):
    engine = LLMEngine(folders[family], dtype="float64", cache_policy="none", kv_cache_memory=1 << 24, block_size=8)
    rng = random.Random(seed)
    prompt = [rng.randrange(0, 300) for _ in range(rng.randint(3, 9))]
    params = SamplingParams(gen_length=16, block_length=8, threshold=0.3 if family == "llada" else None)
    trajectory = drift.decode_with_drift(engine, {"prompt_token_ids": prompt}, params, keep_canvases=True)
    model = engine.model
    kv = [_kv(model, canvas) for canvas in trajectory.canvases]
    # the canvases rebuild from the commits: each differs from the next exactly at its step's commits
    changed = [(b != a).nonzero().flatten().tolist() for a, b in zip(trajectory.canvases, trajectory.canvases[1:])]
    for s, positions in enumerate(changed):
        assert all(trajectory.commit_step[p] == s for p in positions)
    steps = iter(trajectory.steps)
    for s, positions in enumerate(changed):
        if not positions:
            continue  # a step that commits nothing has no signal
        step = next(steps)
        new, old = kv[s + 1], kv[s]
        assert step.drift == pytest.approx(float((new - old).norm() / new.norm()), rel=1e-5)
        others = [p for p in range(new.shape[2]) if p not in positions]
        assert step.drift_others == pytest.approx(
            float((new[:, :, others] - old[:, :, others]).norm() / new[:, :, others].norm()), rel=1e-5)
        # the suffix: the positions after the block of step s + 1 (the first block still holding a mask)
        masked = (trajectory.canvases[s + 1][len(prompt):] == model.config.mask_token_id).nonzero().flatten()
        suffix = list(range(len(prompt) + (int(masked[0]) // 8 + 1) * 8, new.shape[2]))
        if suffix:
            assert step.drift_suffix == pytest.approx(
                float((new[:, :, suffix] - old[:, :, suffix]).norm() / new[:, :, suffix].norm()), rel=1e-4, abs=1e-6)
            # (masks far ahead drift little: float32 softmax rounding is a visible share of it, as per position)
        else:
            assert math.isnan(step.drift_suffix)
        for layer, value in enumerate(step.layer_drift):
            assert value == pytest.approx(float((new[layer] - old[layer]).norm() / new[layer].norm()), rel=1e-5)
        for p in range(new.shape[2]):
            expected = float((new[:, :, p] - old[:, :, p]).norm() / new[:, :, p].norm())
            # both forwards take the attention softmax in float32: per position, agreement to ~1e-7 of the norm
            assert float(trajectory.position_drift[s, p]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert step.signals["num_commits"] == len(positions)
        if family == "llada":  # LLaDA commits from softmax(logits) in float64: the signals by hand
            logits, _ = dense_forward(model, trajectory.canvases[s])
            logits[:, model.config.mask_token_id] = -torch.inf
            probs = logits[positions].double().softmax(-1)
            entropy = [-(p[p > 0] * p[p > 0].log()).sum().item() for p in probs]
            tokens = trajectory.canvases[s + 1][positions]
            confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
            assert step.signals["max_entropy"] == pytest.approx(max(entropy), rel=1e-6)
            assert step.signals["mean_entropy"] == pytest.approx(sum(entropy) / len(entropy), rel=1e-6)
            assert step.signals["max_one_minus_confidence"] == pytest.approx(float((1 - confidence).max()), rel=1e-6)
    assert next(steps, None) is None
    assert not engine.has_unfinished_requests()
    # (c) windows: the drift of the prompt and the tokens committed before s, from canvas s to s + j
    commits = [[p for p, c in trajectory.commit_step.items() if c == s] for s in range(len(kv))]
    expected = []
    for s in range(len(kv) - 1):
        if not commits[s]:
            continue
        settled = list(range(len(prompt))) + [p for p, c in trajectory.commit_step.items() if c < s]
        entropy_mass = 0.0
        for j in range(1, drift.MAX_WINDOW + 1):
            if s + j >= len(kv):
                break
            new, old = kv[s + j][:, :, settled], kv[s][:, :, settled]
            expected.append((float(j), sum(len(commits[t]) for t in range(s, s + j)),
                             float((new - old).norm() / new.norm())))
    assert len(trajectory.windows) == len(expected)
    for window, (steps_in, commits_in, value) in zip(trajectory.windows, expected):
        assert (window["steps"], window["num_commits"]) == (steps_in, commits_in)
        # a window's settled positions can drift little (~1e-4): float32 softmax rounding (~1e-8 of their norm here;
        # ~1e-7 per position above) is then a visible share of it
        assert window["drift_settled"] == pytest.approx(value, rel=1e-5, abs=1e-7)
    for window in trajectory.windows:
        assert window["sum_step_max_entropy"] >= window["max_entropy"] - 1e-12
        assert window["sum_entropy"] >= window["max_entropy"] - 1e-12


def test_spearman_and_ranks_by_hand():
    assert drift.average_ranks([10.0, 30.0, 20.0, 20.0]).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert drift.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert drift.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # with ties: Pearson on average ranks; x ranks 1, 2.5, 2.5, 4 against 1, 2, 3, 4
    rx = torch.tensor([1, 2.5, 2.5, 4]) - 2.5
    ry = torch.tensor([1.0, 2, 3, 4]) - 2.5
    assert drift.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(float((rx @ ry) / (rx.norm() * ry.norm())))
    assert math.isnan(drift.spearman([1, 1, 1], [1, 2, 3]))
    assert drift.spearman([1, 9, 2, 3], [1, math.nan, 3, 2]) == pytest.approx(0.5), "pairs without a value dropped"


def test_lag_profile_by_hand():
    # positions 2 and 3 committed at steps 0 and 1; per-step drift of each position at steps 0..2
    position_drift = torch.tensor([[0.0, 0.0, 0.9, 0.5],
                                   [0.0, 0.0, 0.2, 0.8],
                                   [0.0, 0.0, 0.1, 0.4]])
    trajectory = drift.Trajectory(steps=[], position_drift=position_drift, commit_step={2: 0, 3: 1})
    lags = drift.lag_profile([trajectory], max_lag=3)
    assert [row["count"] for row in lags] == [2, 2, 1, 0]
    assert lags[0]["mean"] == pytest.approx((0.9 + 0.8) / 2)  # each token at its own commit step
    assert lags[1]["mean"] == pytest.approx((0.2 + 0.4) / 2)
    assert lags[2]["mean"] == pytest.approx(0.1) and math.isnan(lags[3]["mean"])


def test_reference_levels_by_hand():
    # prompt of 2 positions; generated positions 2 and 3 committed at steps 0 and 1
    position_drift = torch.tensor([[0.1, 0.3, 0.9, 0.5],
                                   [0.2, 0.2, 0.2, 0.8],
                                   [0.3, 0.1, 0.1, 0.4]])
    trajectory = drift.Trajectory(steps=[], position_drift=position_drift, commit_step={2: 0, 3: 1})
    prompt, masked = drift.reference_drift([trajectory], [2])
    assert prompt == pytest.approx((0.1 + 0.3 + 0.2 + 0.2 + 0.3 + 0.1) / 6)
    assert masked == pytest.approx(0.5)  # only position 3 at step 0 was still masked


def test_a_request_decoded_in_one_step_has_nothing_to_measure(folders):
    engine = LLMEngine(folders["llada"], dtype="float32", cache_policy="none", kv_cache_memory=1 << 24, block_size=8)
    params = SamplingParams(gen_length=8, threshold=1e-9)  # every candidate passes: one step
    trajectory = drift.decode_with_drift(engine, {"prompt_token_ids": [5, 6, 7]}, params)
    assert trajectory.steps == [] and trajectory.position_drift.shape == (0, 11)
    assert sorted(trajectory.commit_step) == list(range(3, 11))
    assert drift.lag_profile([trajectory])[0]["count"] == 0
