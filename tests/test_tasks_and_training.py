"""The digit-reversal task, the embedded tokenizer, real-format export and the training loop."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dengine import load_model, load_tokenizer
from dengine.models import MODEL_FAMILIES
from dengine.tasks import ReversalProblem, check_answer, get_task
from dengine.tasks.digit_reversal import NUM_DIGITS
from dengine.training import train
from dengine.training.tokenizer import specials_for, write_tokenizer
from dengine.training.train import ProblemStream, diffusion_loss, encode_batch, init_weights, model_config

digits = st.lists(st.integers(0, 9), min_size=NUM_DIGITS, max_size=NUM_DIGITS).map(tuple)


@settings(deadline=None, max_examples=60)
@given(digits)
def test_worked_answer_is_accepted_and_consistent(values):
    problem = ReversalProblem(values)
    assert check_answer(problem, problem.answer)
    assert check_answer(problem, problem.answer + "\n")
    assert problem.target == "".join(map(str, values))[::-1]
    lines = problem.answer.split(";")[:-1]
    assert len(lines) == len(values) + 1 and {len(line) for line in lines} == {2 * len(values) + 1}
    for moved, line in enumerate(lines):
        left, right = line.split("|")
        # every digit is on exactly one side, the moved ones newest first
        assert right.rstrip("_")[::-1] + left.rstrip("_") == "".join(map(str, values))
        assert len(right.rstrip("_")) == moved
    assert lines[-1].endswith(problem.target)


@settings(deadline=None, max_examples=60)
@given(digits, digits)
def test_wrong_results_are_rejected(values, other):
    problem = ReversalProblem(values)
    assume(other != values[::-1])
    wrong = problem.answer.rsplit("=>", 1)[0] + "=>" + "".join(map(str, other))
    assert not check_answer(problem, wrong)
    assert not check_answer(problem, problem.answer + "0")  # one digit too many
    assert not check_answer(problem, problem.answer[:-1])  # one digit short


@settings(deadline=None, max_examples=60)
@given(digits, st.text(max_size=20))
def test_answers_without_the_final_marker_are_rejected(values, junk):
    problem = ReversalProblem(values)
    assert not check_answer(problem, problem.answer.replace("=>", "") + junk.replace("=>", ""))


@pytest.mark.parametrize("bad", [(), (1, 10), (-1, 2)])
def test_bad_digits_are_refused(bad):
    with pytest.raises(ValueError, match="digits"):
        ReversalProblem(bad)


REVERSAL = get_task("digit-reversal")


def test_splits_are_seeded_and_disjoint():
    held_out = REVERSAL.held_out(500)
    assert REVERSAL.held_out(10) == held_out[:10], "the held-out split is a prefix of any larger one"
    stream = REVERSAL.training_stream(seed=0, held_out=500)
    train = [next(stream) for _ in range(2000)]
    assert not {p.digits for p in train} & {p.digits for p in held_out}
    assert REVERSAL.generate(20, 3) == REVERSAL.generate(20, 3) != REVERSAL.generate(20, 4)
    lengths = [len(p.answer) + 1 for p in held_out]  # + end of turn, one token per character
    assert sum(lengths) / len(lengths) >= 48


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_embedded_tokenizer_round_trips_task_text(tmp_path, family):
    ids = write_tokenizer(tmp_path, family)
    tokenizer = load_tokenizer(tmp_path)
    for problem in REVERSAL.generate(50, 1):
        for text in (problem.question, problem.answer):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            assert len(encoded) == len(text) and tokenizer.decode(encoded) == text
    for role, token in specials_for(family).items():
        assert tokenizer.convert_tokens_to_ids(token) == ids[role]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Reverse the digits of 12"}],
                                         add_generation_prompt=True, tokenize=False)
    head = "<|startoftext|><|start_header_id|>user" if family == "llada" else "<|im_start|>system"
    assert chat.startswith(head)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_training_is_reproducible_lowers_the_loss_and_exports_the_real_format(tmp_path, family):
    argv = ["--family", family, "--steps", "12", "--warmup", "2", "--batch-size", "4", "--hidden", "64",
            "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "96", "--gen-length", "128",
            "--lr", "3e-3"]
    train.main(argv + ["--out", str(tmp_path / "a")])
    train.main(argv + ["--out", str(tmp_path / "b")])
    first, second = load_model(tmp_path / "a", dtype="float32"), load_model(tmp_path / "b", dtype="float32")
    for (name, p), q in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(p, q), name
    assert first.config.model_type == family and first.config.logit_shift == (family == "dream")
    tokenizer = load_tokenizer(tmp_path / "a")
    assert tokenizer.mask_token_id == first.config.mask_token_id
    assert tokenizer.eos_token_id == first.config.eos_token_id


def test_training_loss_decreases(tmp_path):
    ids = write_tokenizer(tmp_path, "llada")
    tokenizer = load_tokenizer(tmp_path)
    args = argparse.Namespace(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=96, vocab=128)
    model = MODEL_FAMILIES["llada"](model_config("llada", ids, args))
    generator = torch.Generator().manual_seed(0)
    init_weights(model, 2, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = ProblemStream(get_task("digit-reversal"), 0, held_out=10)
    canvas, prompt_len = encode_batch(stream.batch(8), tokenizer, ids["end_of_turn"], ids["eos_token"], 128)
    losses = []
    for _ in range(25):
        loss = diffusion_loss(model, canvas, prompt_len, ids["mask_token"], torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_stop_at_keeps_the_schedule_of_the_full_run(tmp_path):
    argv = ["--family", "llada", "--warmup", "1", "--batch-size", "2", "--hidden", "32", "--layers", "1",
            "--heads", "2", "--intermediate", "48", "--gen-length", "128", "--lr", "3e-3"]
    train.main(argv + ["--steps", "6", "--stop-at", "3", "--out", str(tmp_path / "stopped")])
    train.main(argv + ["--steps", "3", "--out", str(tmp_path / "short")])
    train.main(argv + ["--steps", "6", "--stop-at", "3", "--out", str(tmp_path / "again")])
    stopped, short, again = (load_model(tmp_path / name, dtype="float32") for name in ("stopped", "short", "again"))
    # the first 3 steps of a 6-step schedule are not a 3-step schedule; the same command gives the same weights
    assert not torch.equal(stopped.lm_head.weight, short.lm_head.weight)
    assert torch.equal(stopped.lm_head.weight, again.lm_head.weight)
    with pytest.raises(SystemExit):
        train.main(argv + ["--steps", "3", "--stop-at", "4", "--out", str(tmp_path / "bad")])


class _RecordingModel(torch.nn.Module):
    """Stands in for a model in diffusion_loss: records the canvas it is given and scores every row equally."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.config = argparse.Namespace(logit_shift=0, num_layers=1)
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, context, kv):
        self.seen = context.batch.input_ids.clone()
        self.rows = context.batch.logits_indices.clone()
        return self.bias.expand(len(self.rows), -1)


def test_block_masking_shows_the_canvas_of_block_by_block_decoding():
    b, prompt_len, gen_length, block, mask = 64, 5, 100, 32, 99
    canvas = torch.randint(0, 90, (b, prompt_len + gen_length))
    model = _RecordingModel(128)
    loss = diffusion_loss(model, canvas, prompt_len, mask, torch.Generator().manual_seed(3), block, 0.5)
    seen = model.seen.view(b, -1)
    scored = torch.zeros(b * seen.shape[1], dtype=torch.bool)
    scored[model.rows] = True
    scored = scored.view(b, -1)
    assert torch.equal(seen[:, :prompt_len], canvas[:, :prompt_len])
    assert (seen[scored] == mask).all()                          # every scored position is masked
    starts = set()
    for row in range(b):
        answer_masked = (seen[row, prompt_len:] == mask).nonzero().flatten()
        answer_scored = scored[row, prompt_len:].nonzero().flatten()
        assert len(answer_scored) >= 1
        if row >= b // 2:                                        # uniform masking: what is masked is scored
            assert torch.equal(answer_masked, answer_scored)
            continue
        first = int(answer_scored.min()) // block * block
        starts.add(first)
        end = min(first + block, gen_length)
        assert int(answer_scored.max()) < end                    # scored positions lie in one block
        assert torch.equal(seen[row, prompt_len:prompt_len + first], canvas[row, prompt_len:prompt_len + first])
        assert (seen[row, prompt_len + end:] == mask).all()     # every later block fully masked
    assert len(starts) == 4                                      # 32 rows reach all four blocks (0, 32, 64, 96)
    # a uniform model scores ln(128) per token, and 1/t taken from the realised count makes every row's
    # weighted mean exactly that, block rows and uniform rows alike
    assert abs(loss.item() - math.log(128)) < 1e-4


def test_no_block_masking_keeps_the_uniform_loss_bit_for_bit():
    canvas = torch.randint(0, 90, (16, 60))
    model = _RecordingModel(128)
    a = diffusion_loss(model, canvas, 10, 99, torch.Generator().manual_seed(5))
    rows_a = model.rows
    b = diffusion_loss(model, canvas, 10, 99, torch.Generator().manual_seed(5), 32, 0.0)
    assert torch.equal(rows_a, model.rows) and torch.equal(a, b)


def _block_starts(share: float, seed: int) -> list[int]:
    """The block each block-masked row of a 64-row batch scores (its first scored answer position's block)."""
    b, prompt_len, gen_length, block, mask = 64, 5, 128, 32, 99
    canvas = torch.randint(0, 90, (b, prompt_len + gen_length))
    model = _RecordingModel(128)
    diffusion_loss(model, canvas, prompt_len, mask, torch.Generator().manual_seed(seed), block, 1.0, share)
    scored = torch.zeros(b * (prompt_len + gen_length), dtype=torch.bool)
    scored[model.rows] = True
    answer = scored.view(b, -1)[:, prompt_len:]
    return [int(row.nonzero().min()) // block for row in answer]


def test_first_block_share_moves_block_rows_to_the_first_block():
    seed = 11
    assert set(_block_starts(1.0, seed)) == {0}
    uniform, half = _block_starts(0.0, seed), _block_starts(0.5, seed)
    assert set(uniform) == {0, 1, 2, 3}
    # share 0.5: a row keeps its uniform block or takes block 0, and about half of the others move there
    assert all(h in (u, 0) for u, h in zip(uniform, half))
    moved = sum(h == 0 and u != 0 for u, h in zip(uniform, half))
    assert 10 <= moved <= 38, moved
    # share 0 draws nothing more: the same rows as before the option existed
    canvas = torch.randint(0, 90, (16, 60))
    model = _RecordingModel(128)
    a = diffusion_loss(model, canvas, 10, 99, torch.Generator().manual_seed(5), 16, 0.5)
    rows_a = model.rows
    b = diffusion_loss(model, canvas, 10, 99, torch.Generator().manual_seed(5), 16, 0.5, 0.0)
    assert torch.equal(rows_a, model.rows) and torch.equal(a, b)


def test_precision_auto_follows_the_cpus_bf16_hardware(monkeypatch):
    monkeypatch.setattr(train, "cpu_computes_bf16", lambda: True)
    with train.autocast_for("auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(train, "cpu_computes_bf16", lambda: False)
    with train.autocast_for("auto"):
        assert not torch.is_autocast_enabled("cpu")
    with train.autocast_for("bf16-autocast"):
        assert torch.is_autocast_enabled("cpu")


class _ConfidentModel(torch.nn.Module):
    """Stands in for a model: output row r puts probability confidence[r % T] on token 1 (the rest uniform
    over 4 tokens), whatever the canvas; records the canvases it is run on."""

    def __init__(self, confidence: torch.Tensor, shift: int = 0) -> None:
        super().__init__()
        self.config = argparse.Namespace(logit_shift=shift, num_layers=1)
        self.confidence, self.seen = confidence, []
        self.bias = torch.nn.Parameter(torch.zeros(4))

    def forward(self, context, kv):
        t = len(self.confidence)
        self.seen.append(context.batch.input_ids.view(-1, t).clone())
        c = self.confidence[context.batch.logits_indices % t]
        probs = torch.stack([(1 - c) / 3, c, (1 - c) / 3, (1 - c) / 3], dim=-1)
        return probs.log() + self.bias


@pytest.mark.parametrize("shift", [0, 1])
def test_decoding_masks_unmask_what_threshold_decoding_commits(shift):
    prompt_len, gen_length, mask = 2, 8, 9
    # answer positions 2..5 form the span; 6, 7 come after it; confidences read at output position - shift
    answer_confidence = torch.tensor([0.1, 0.2, 0.95, 0.5, 0.3, 0.92, 0.99, 0.99])
    confidence = torch.zeros(prompt_len + gen_length)
    confidence[prompt_len - shift: prompt_len - shift + gen_length] = answer_confidence
    model = _ConfidentModel(confidence, shift)
    canvas = torch.arange(10, 20)[None].repeat(2, 1)
    in_span = torch.zeros(2, gen_length, dtype=torch.bool)
    in_span[:, 2:6] = True
    left = train.decoding_masks(model, canvas, prompt_len, mask, in_span, torch.tensor([1, 3]), 0.9)
    # round 1, span fully masked: 0.95 (answer position 2) and 0.92 (5) reach 0.9; 0.99 at 6 and 7 is after
    # the span, never unmasked. Round 2 (second row only): nothing reaches 0.9, the most confident (0.5 at 3)
    # is unmasked. Round 3: one position left, which is never unmasked.
    assert left[0].nonzero().flatten().tolist() == [3, 4]
    assert left[1].nonzero().flatten().tolist() == [4]
    assert len(model.seen) == 2
    first, second = model.seen
    assert (first[:, prompt_len + 2:] == mask).all() and (first[:, : prompt_len + 2] == canvas[:, :4]).all()
    # the second round's canvas shows the unmasked positions with the training answer's tokens
    shown = [i - prompt_len for i in range(prompt_len, prompt_len + gen_length) if second[1, i] != mask]
    assert shown == [0, 1, 2, 5] and torch.equal(second[1, prompt_len + 5], canvas[1, prompt_len + 5])


def test_decoding_masks_never_reveal_the_spans_last_position():
    model = _ConfidentModel(torch.full((6,), 0.99))
    in_span = torch.ones(1, 4, dtype=torch.bool)
    left = train.decoding_masks(model, torch.arange(6)[None], 2, 9, in_span, torch.tensor([3]), 0.9)
    assert left.sum() == 1


def test_decoding_share_scores_the_decoded_rows_and_zero_keeps_the_loss():
    canvas = torch.randint(0, 90, (16, 60), generator=torch.Generator().manual_seed(2))
    model = _RecordingModel(128)
    a = diffusion_loss(model, canvas, 10, 99, torch.Generator().manual_seed(5), 16, 0.5, 0.5)
    rows_a = model.rows
    b = diffusion_loss(model, canvas, 10, 99, torch.Generator().manual_seed(5), 16, 0.5, 0.5, 0.0)
    assert torch.equal(rows_a, model.rows) and torch.equal(a, b)
    # every block row decoded: the recording model is uniform (confidence 1/128), so each round reveals only
    # its most confident position (the first masked one) and the loss stays finite and positive
    c = diffusion_loss(model, canvas, 10, 99, torch.Generator().manual_seed(5), 16, 1.0, 0.0, 1.0)
    assert torch.isfinite(c) and c > 0
