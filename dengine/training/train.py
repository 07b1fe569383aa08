"""Train a small LLaDA- or Dream-format model on a registered task with the masked-diffusion SFT objective.

    python -m dengine.training.train --task digit-reversal --family llada --out dengine/assets/llada-reverse \
        --steps 2500 --stop-at 1800 --warmup 100 --lr 2e-3 --batch-size 32 --threads 1   # a shipped model

Each model card (dengine/assets/*/README.md) has its exact command; the folder gets a task.json naming
the task, so the benchmarks find the task from the model.

The objective is LLaDA's SFT: the response (answer, end-of-turn, EOS padding to gen_length) is masked at a
ratio t ~ U(0, 1); the loss is the cross-entropy on masked positions weighted by 1/t, normalised by the
response length (stratified ratios and exact mask counts keep its variance low; see diffusion_loss).
The Dream-format model predicts token i from position i - 1 (Dream's shift). Seeded and
reproducible; the forward runs under bf16 autocast on a CPU that computes bf16 (every shipped model was
trained so), in fp32 on one that would emulate it (`--precision`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dengine.config import ModelConfig
from dengine.cli_args import DefaultsHelpFormatter
from dengine.models import MODEL_FAMILIES
from dengine.models.loader import cpu_computes_bf16, load_model
from dengine.tasks import TASKS, Problem, Task, get_task, write_task_file
from dengine.tokenizer import load_tokenizer
from dengine.training.dense import TrainingKV, dense_batch
from dengine.training.export import save_checkpoint
from dengine.training.tokenizer import write_tokenizer



def model_config(family: str, ids: dict[str, int], args: argparse.Namespace) -> ModelConfig:
    """The architecture of an embedded model: the real family's layout at a small size."""
    return ModelConfig(
        model_type=family,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads if family == "llada" else args.kv_heads,
        head_dim=args.hidden // args.heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        rms_norm_eps=1e-5 if family == "llada" else 1e-6,
        rope_theta=10000.0,
        qkv_bias=family == "dream",
        rope_in_fp32=family == "llada",
        logit_shift=1 if family == "dream" else 0,
        max_position_embeddings=1024,
        mask_token_id=ids["mask_token"],
        eos_token_id=ids["eos_token"],
        pad_token_id=ids["eos_token"],
        bos_token_id=ids["bos_token"],
    )


def init_weights(model: torch.nn.Module, num_layers: int, generator: torch.Generator) -> None:
    """Normal(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 * layers), zero biases."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * std)


class ProblemStream:
    """Endless seeded training problems of a task, never one of its held-out problems."""

    def __init__(self, task: Task, seed: int, held_out: int) -> None:
        self.problems = task.training_stream(seed, held_out)

    def batch(self, size: int) -> list[Problem]:
        return [next(self.problems) for _ in range(size)]


def encode_batch(problems: list[Problem], tokenizer, eot: int, eos: int, gen_length: int):
    """Canvases [B, T] (chat-templated prompt + answer + end-of-turn + EOS padding) and the prompt length."""
    rows, prompt_len = [], None
    for problem in problems:
        text = tokenizer.apply_chat_template([{"role": "user", "content": problem.question}],
                                             add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        answer = tokenizer.encode(problem.answer, add_special_tokens=False) + [eot]
        if len(answer) > gen_length:
            raise ValueError(f"answer of {len(answer)} tokens does not fit gen_length {gen_length}")
        prompt_len = len(prompt) if prompt_len is None else prompt_len
        if len(prompt) != prompt_len:
            raise ValueError("a batch's prompts must have equal length")
        rows.append(prompt + answer + [eos] * (gen_length - len(answer)))
    return torch.tensor(rows), prompt_len


def diffusion_loss(model, canvas: torch.Tensor, prompt_len: int, mask_id: int, generator: torch.Generator,
                   block_length: int | None = None, block_rows: float = 0.0, first_block_share: float = 0.0,
                   decoding_share: float = 0.0, decoding_threshold: float = 0.9):
    """LLaDA's SFT loss on one batch; Dream-format models read token i at output i - 1.

    Each response is masked at a ratio t ~ U(0, 1) and the cross-entropy on its masked positions is
    weighted by 1/t. Two variance reductions keep the estimator's expectation: the batch's ratios are
    stratified (one per 1/B interval, in random order), and a response masked at ratio t has exactly
    max(1, round(t * L)) masked positions, its weight 1/t taken from that realised count.

    block_rows > 0 draws that fraction of the batch's rows as semi-autoregressive decoding sees its canvas
    (block masking): a block of block_length answer positions chosen uniformly, every block before it
    clean, every block after it fully masked, the block itself masked at ratio t as above; only the
    block's masked positions are scored (1/t weighted, normalised by the block's length). Uniform masking
    alone lets a later, unmasked token reveal an earlier masked one (a copied band gives its source away),
    which decoding left to right never shows the model. first_block_share of those rows (in expectation) take
    the first block instead of a uniform one: the first block is where the answer's genuine choices are
    made from the prompt alone (a chain's first grid), and where parallel decoding's commits are least
    determined by what is already on the canvas.

    decoding_share of the block-masked rows (in expectation; drawn only when > 0) see their block as
    threshold decoding leaves it instead of at a random ratio: from the block fully masked, 1 to 3 rounds
    (uniform) each run the model without gradient and unmask, with the training answer's tokens, the block's
    masked positions whose confidence reaches decoding_threshold (at least the most confident one, never
    the last one). Random masks mostly hide tokens that the visible ones determine; decoding leaves masked
    exactly the tokens the model is unsure of, where a confident guess commits one of several completions
    (the states where parallel decoding commits inconsistent cells). Scored and weighted as above, t being
    the share of the block left masked.
    """
    b, t = canvas.shape
    gen_length = t - prompt_len
    span = torch.full((b,), gen_length)
    first = torch.zeros(b, dtype=torch.long)
    n_block = round(b * block_rows) if block_length else 0
    if n_block:
        blocks = -(-gen_length // block_length)
        first[:n_block] = torch.randint(blocks, (n_block,), generator=generator) * block_length
        if first_block_share:
            first[:n_block] *= torch.rand(n_block, generator=generator) >= first_block_share
        span[:n_block] = (gen_length - first[:n_block]).clamp(max=block_length)
    strata = (torch.randperm(b, generator=generator) + torch.rand(b, generator=generator)) / b
    counts = (strata * span).round().clamp(min=1).minimum(span).long()
    order = torch.rand(b, gen_length, generator=generator).argsort(dim=1)
    position = torch.arange(gen_length)
    in_span = (position >= first[:, None]) & (position < (first + span)[:, None])
    scored = torch.zeros_like(canvas, dtype=torch.bool)
    # rank only the span's positions: positions outside it sort after every position inside it
    rank = torch.where(in_span, order, order + gen_length).argsort(dim=1).argsort(dim=1)
    scored[:, prompt_len:] = in_span & (rank < counts[:, None])
    if n_block and decoding_share:
        decoded = (torch.rand(n_block, generator=generator) < decoding_share).nonzero().flatten()
        if len(decoded):
            rounds = torch.randint(1, 4, (len(decoded),), generator=generator)
            left = decoding_masks(model, canvas[decoded], prompt_len, mask_id, in_span[decoded], rounds,
                                  decoding_threshold)
            scored[decoded, prompt_len:] = left
            counts[decoded] = left.sum(dim=1)
    masked = scored.clone()
    masked[:, prompt_len:] |= position >= (first + span)[:, None]
    noisy = canvas.masked_fill(masked, mask_id)
    rows = scored.reshape(-1).nonzero().flatten()
    ratio = (counts.float() / span)[:, None].expand(b, t).reshape(-1)[rows]
    norm = span.float()[:, None].expand(b, t).reshape(-1)[rows]
    logits = model(dense_batch(noisy, rows - model.config.logit_shift), TrainingKV(model.config.num_layers))
    token_loss = F.cross_entropy(logits.float(), canvas.reshape(-1)[rows], reduction="none") / (ratio * norm)
    return token_loss.sum() / b


def autocast_for(precision: str):
    """The forward's context: bf16 autocast, or plain fp32; "auto" picks bf16 where the CPU computes it (an
    AVX2-only CPU emulates bf16 matmuls, several times slower than fp32: docs/benchmarks.md 4d)."""
    if precision == "auto":
        precision = "bf16-autocast" if cpu_computes_bf16() else "fp32"
    if precision == "bf16-autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r}")


@torch.no_grad()
def decoding_masks(model, canvas: torch.Tensor, prompt_len: int, mask_id: int, in_span: torch.Tensor,
                   rounds: torch.Tensor, threshold: float) -> torch.Tensor:
    """The answer positions [B, gen_length] of each row's span still masked after rounds[b] rounds of threshold
    decoding from the span fully masked (later positions masked throughout, earlier ones clean); each round
    unmasks with canvas's own tokens the masked span positions whose confidence reaches threshold, at least
    the most confident one and never the span's last one (see diffusion_loss)."""
    b, gen_length = in_span.shape
    position = torch.arange(gen_length)
    after = position >= (position * in_span).amax(dim=1, keepdim=True) + 1
    left = in_span.clone()
    positions = (torch.arange(b)[:, None] * canvas.shape[1] + prompt_len + position).flatten()
    for step in range(int(rounds.max())):
        active = (rounds > step) & (left.sum(dim=1) > 1)
        if not active.any():
            break
        noisy = canvas.clone()
        noisy[:, prompt_len:] = noisy[:, prompt_len:].masked_fill(left | after, mask_id)
        logits = model(dense_batch(noisy, positions - model.config.logit_shift),
                       TrainingKV(model.config.num_layers))
        confidence = logits.float().softmax(dim=-1).amax(dim=-1).view(b, gen_length).masked_fill(~left, -1.0)
        reveal = confidence >= threshold
        reveal.scatter_(1, confidence.argmax(dim=1, keepdim=True), True)
        # never the last masked position: keep the least confident of them masked
        everything = (reveal & left).sum(dim=1) == left.sum(dim=1)
        keep = confidence.masked_fill(~left, 2.0).argmin(dim=1)
        reveal[everything, keep[everything]] = False
        left &= ~(reveal & active[:, None])
    return left


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train an embedded model (LLaDA or Dream format) on a task.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="digit-reversal")
    parser.add_argument("--family", choices=sorted(MODEL_FAMILIES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--gen-length", type=int, default=None, help="default: the task's")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2, help="Dream only (GQA)")
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save-every", type=int, default=0, help="also write the checkpoint every N steps")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this many steps; the learning-rate schedule still spans --steps")
    parser.add_argument("--block-masking", type=float, default=0.0,
                        help="fraction of each batch masked as block-by-block decoding sees its canvas "
                             "(blocks of the task's block_length; see diffusion_loss)")
    parser.add_argument("--first-block-share", type=float, default=0.0,
                        help="share of the block-masked rows that take the answer's first block instead of a "
                             "uniformly chosen one")
    parser.add_argument("--decoding-masking", type=float, default=0.0,
                        help="share of the block-masked rows whose block is masked as threshold decoding leaves it "
                             "(1-3 rounds of the model's own confident positions unmasked; see diffusion_loss)")
    parser.add_argument("--precision", choices=["auto", "bf16-autocast", "fp32"], default="auto",
                        help="the forward's precision: auto is bf16 autocast on a CPU with bf16 hardware (how the "
                             "shipped models were trained), fp32 on one without")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this checkpoint's weights (same family and sizes) instead of a fresh init")
    args = parser.parse_args(argv)
    stop_at = args.steps if args.stop_at is None else args.stop_at
    if not 0 <= args.block_masking <= 1:
        parser.error(f"--block-masking must be in [0, 1], got {args.block_masking}")
    if not 0 <= args.decoding_masking <= 1:
        parser.error(f"--decoding-masking must be in [0, 1], got {args.decoding_masking}")
    if not 0 <= args.first_block_share <= 1:
        parser.error(f"--first-block-share must be in [0, 1], got {args.first_block_share}")
    if not 0 < stop_at <= args.steps:
        parser.error(f"--stop-at must be in [1, --steps], got {args.stop_at}")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    gen_length = args.gen_length or task.gen_length

    ids = write_tokenizer(args.out, args.family)
    write_task_file(args.out, task)
    tokenizer = load_tokenizer(args.out)
    config = model_config(args.family, ids, args)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = MODEL_FAMILIES[args.family](config)
    init_weights(model, config.num_layers, generator)
    if args.init_from is not None:
        start_from = load_model(args.init_from, dtype="float32")
        if start_from.config != config:
            raise ValueError(f"{args.init_from} has another architecture than the one asked for")
        model.load_state_dict(start_from.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    stream = ProblemStream(task, args.seed, held_out=500)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    start, smoothed = time.perf_counter(), None
    bar = tqdm(range(stop_at), desc=f"train {args.family}", dynamic_ncols=True)
    for step in bar:
        canvas, prompt_len = encode_batch(stream.batch(args.batch_size), tokenizer, ids["end_of_turn"],
                                          ids["eos_token"], gen_length)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with autocast_for(args.precision):
            loss = diffusion_loss(model, canvas, prompt_len, ids["mask_token"], generator,
                                  task.block_length, args.block_masking, args.first_block_share,
                                  args.decoding_masking)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr_at(step):.2e}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < stop_at:
            save_checkpoint(model, args.out)
    model.eval()
    save_checkpoint(model, args.out)
    minutes = (time.perf_counter() - start) / 60
    print(f"saved {args.out} after {stop_at} steps in {minutes:.1f} min (final smoothed loss {smoothed:.4f})")


if __name__ == "__main__":
    main()
