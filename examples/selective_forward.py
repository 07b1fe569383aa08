"""Load a checkpoint folder and run one full and one partial (selective-recompute) forward.

    python examples/selective_forward.py [CHECKPOINT_FOLDER] [--dtype bfloat16|float32]

With no folder, a small random LLaDA-format checkpoint is written to a temporary folder first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from dengine import ModelRunner, PagedKVCache, SequenceQuery, load_model, load_tokenizer
from dengine.kv import KVCacheManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="checkpoint folder (LLaDA or Dream format)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--length", type=int, default=256, help="canvas length (prompt + generation)")
    args = parser.parse_args()
    if args.folder is None:
        from checkpoints import write_checkpoint  # the test suite's writer of real-format checkpoints

        args.folder, _ = write_checkpoint(Path(tempfile.mkdtemp()) / "tiny-llada", "llada", seed=0,
                                          layers=4, hidden=256, heads=4, intermediate=512)
        print(f"wrote a random LLaDA-format checkpoint to {args.folder}")
    model = load_model(args.folder, dtype=args.dtype)
    tokenizer = load_tokenizer(args.folder)
    config = model.config
    print(f"{config.model_type}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_heads}/{config.num_kv_heads} heads, vocab {config.vocab_size}, "
          f"tokenizer: {'yes' if tokenizer else 'none'}")

    manager = KVCacheManager(num_blocks=64, block_size=16)
    cache = PagedKVCache(config, manager.pool.num_blocks, manager.block_size, model.embed.weight.dtype, "cpu")
    runner = ModelRunner(model, cache)
    canvas = torch.full((args.length,), config.mask_token_id)
    canvas[: args.length // 2] = torch.randint(0, config.mask_token_id, (args.length // 2,))
    table = manager.allocate("demo", args.length)

    start = time.perf_counter()
    runner.run([SequenceQuery(canvas, table, torch.arange(args.length))])
    full = time.perf_counter() - start
    window = torch.arange(args.length // 2, args.length // 2 + 32)
    start = time.perf_counter()
    logits = runner.run([SequenceQuery(canvas, table, window)])[0]
    partial = time.perf_counter() - start
    print(f"full forward over {args.length} positions: {full * 1e3:.1f} ms")
    print(f"partial forward over {window.numel()} positions (others from the paged cache): {partial * 1e3:.1f} ms")
    print(f"logits {tuple(logits.shape)}, most likely token at position {int(window[0])}: {int(logits[0].argmax())}")
    manager.free("demo")


if __name__ == "__main__":
    main()
