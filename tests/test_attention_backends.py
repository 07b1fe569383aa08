"""Backend selection everywhere; the GPU backends against the torch backend: in every run on CPU through the
kernel doubles (tests/kernel_doubles.py), and on the real kernels where CUDA and the libraries are installed."""

from __future__ import annotations

import importlib.util
import random
import types

import pytest
import torch

import kernel_doubles
from checkpoints import VOCAB, write_checkpoint
from dengine import LLM, ModelRunner, PagedKVCache, SamplingParams, SequenceQuery, load_model
from dengine.attention import AttentionBackend, available_backends, select_backend
from dengine.attention.base import AttendFn
from dengine.attention.flash import PAGED_BLOCK_MULTIPLE, FlashAttentionBackend
from dengine.attention.torch_sdpa import TorchAttentionBackend
from dengine.forward_batch import ForwardBatch
from dengine.scheduler.policies import POLICIES

CUDA = torch.cuda.is_available()
# A GPU backend's output against the torch backend's on the same bf16 inputs, relative to the largest output
# value. Both round the output to bf16, the torch backend its probabilities too: at most 0.71% measured over 60
# random ragged batches (head_dim 16 to 128, 1 to 4 query heads per KV head, block sizes 16 and 256), at most
# 0.78% over every attention call of the engine test below (every policy, both families).
BF16_TOLERANCE = 2e-2


def test_cpu_selects_torch_and_rejects_gpu_backends():
    assert select_backend("cpu").name == "torch"
    assert available_backends(torch.device("cpu")) == ["torch"]
    with pytest.raises(ValueError, match="unknown"):
        select_backend("cpu", "flashinfer")
    for name in ("flash-attn", "xformers"):
        with pytest.raises(ValueError, match="cannot run on cpu"):
            select_backend("cpu", name)


def _gpu_backend_params():
    """Each GPU backend on the kernel doubles (on CPU, every run) and on its real kernels (CUDA, when installed)."""
    params = []
    for name, module in (("flash-attn", "flash_attn"), ("xformers", "xformers")):
        params.append(pytest.param(name, "cpu", id=f"{name}-doubles"))
        reason = None
        if not CUDA:
            reason = "needs CUDA (none on this machine)"
        elif importlib.util.find_spec(module) is None:
            reason = f"needs {module} installed (pip install dengine[gpu])"
        params.append(pytest.param(name, "cuda", id=f"{name}-cuda",
                                   marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return params


def _kernels(device: str, monkeypatch) -> kernel_doubles.KernelDoubles | None:
    """The kernel doubles, installed, on CPU; None on CUDA, where the real kernels run."""
    return kernel_doubles.install(monkeypatch) if device == "cpu" else None


def _assert_called_without_copies(doubles: kernel_doubles.KernelDoubles, backend_name: str, block_size: int) -> None:
    """The backend called its kernel in a layout the kernel takes as is: flash-attn reading the paged cache
    exactly when the block size allows it, never through its wrapper's copies; xformers on its flash operator."""
    if backend_name == "flash-attn":
        paged = block_size % PAGED_BLOCK_MULTIPLE == 0
        assert doubles.flash.calls
        assert all(call.paged == paged and not call.copied for call in doubles.flash.calls)
    else:
        assert doubles.xformers.calls
        assert {call.op for call in doubles.xformers.calls} == {"fa2F"}


@pytest.mark.parametrize("backend_name,device", _gpu_backend_params())
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("block_size", [16, 256, 384])
def test_gpu_backend_matches_torch_backend(tmp_path, monkeypatch, seed, backend_name, device, family, block_size):
    """Same ragged partial step through the GPU backend and the torch backend, both on device in bf16."""
    doubles = _kernels(device, monkeypatch)
    folder, _ = write_checkpoint(tmp_path, family, seed=seed, hidden=128, heads=4, layers=2)
    model = load_model(folder, dtype="bfloat16", device=device)
    rng = random.Random(seed)
    lengths = [rng.randint(5, 300) for _ in range(3)]
    canvases = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    blocks = list(range(sum(-(-n // block_size) for n in lengths) + 4))
    rng.shuffle(blocks)
    tables = [[blocks.pop() for _ in range(-(-n // block_size))] for n in lengths]
    results = {}
    for name in (backend_name, "torch"):
        cache = PagedKVCache(model.config, max(max(t) for t in tables) + 1, block_size, torch.bfloat16, device)
        runner = ModelRunner(model, cache, select_backend(device, name))
        runner.run([SequenceQuery(c, t, torch.arange(c.numel())) for c, t in zip(canvases, tables)])
        partial = [
            SequenceQuery(c, t, torch.tensor(sorted(random.Random(seed + i).sample(range(c.numel()), min(20, c.numel())))))
            for i, (c, t) in enumerate(zip(canvases, tables))
        ]
        results[name] = [out.float().cpu() for out in runner.run(partial)]
    for got, ref in zip(results[backend_name], results["torch"]):
        assert (got - ref).abs().max() / ref.abs().max() < BF16_TOLERANCE
        # the top token agrees on every row whose top two logits are further apart than the tolerance allows
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_TOLERANCE * ref.abs().max()
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    if doubles is not None:
        _assert_called_without_copies(doubles, backend_name, block_size)


@pytest.mark.parametrize("backend_name,device", _gpu_backend_params())
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_gpu_backend_reuses_layer_outputs_and_records_attention_like_torch(tmp_path, monkeypatch, seed, backend_name,
                                                                           device, family):
    """A dLLM-Cache sequence (its attention planned for fewer rows past layer 0) and a d2Cache one (its
    attention probabilities recorded) in one batch, through the GPU backend and the torch backend on device."""
    from dengine.model_runner import CachedOutputs

    doubles = _kernels(device, monkeypatch)
    folder, _ = write_checkpoint(tmp_path, family, seed=seed, hidden=128, heads=4, layers=2)
    model = load_model(folder, dtype="bfloat16", device=device)
    rng = random.Random(seed)
    length, block_size = rng.randint(40, 200), 16
    canvases = [torch.randint(0, VOCAB, (length,)) for _ in range(2)]
    per_seq = -(-length // block_size)
    results = {}
    for name in (backend_name, "torch"):
        cache = PagedKVCache(model.config, 4 * per_seq + 64, block_size, torch.bfloat16, device)
        outputs = list(range(2 * per_seq, 2 * per_seq + -(-length // cache.outputs_per_block)))
        tables = [list(range(per_seq)), list(range(per_seq, 2 * per_seq))]
        runner = ModelRunner(model, cache, select_backend(device, name))
        everything, empty = torch.arange(length), torch.zeros(0, dtype=torch.long)
        refresh = CachedOutputs(outputs, everything, empty, 0)
        runner.run([
            SequenceQuery(canvases[0], tables[0], everything, cached_outputs=refresh),
            SequenceQuery(canvases[1], tables[1], everything),
        ])
        rows = torch.arange(length // 2, length)
        always = torch.tensor(sorted(random.Random(seed).sample(rows.tolist(), 5)))
        probed = SequenceQuery(canvases[1], tables[1], rows, record_attention=True)
        logits = runner.run([
            SequenceQuery(canvases[0], tables[0], rows, cached_outputs=CachedOutputs(outputs, always, empty, 0)),
            probed,
        ])
        results[name] = [out.float().cpu() for out in logits] + [p.float().cpu() for p in probed.attention]
    for got, ref in zip(results[backend_name], results["torch"]):
        assert (got - ref).abs().max() / ref.abs().max() < BF16_TOLERANCE
    if doubles is not None:
        _assert_called_without_copies(doubles, backend_name, block_size)


def test_gpu_backends_call_their_kernels_in_layouts_the_kernels_take(monkeypatch, seed):
    """Random ragged batches over random model shapes (head_dim, query heads per KV head, block size), q a view of
    the fused q|k projection as the layers pass it: each GPU backend's kernel accepts every call without a copy,
    and agrees with the torch backend."""
    doubles = kernel_doubles.install(monkeypatch)
    rng = random.Random(seed)
    for _ in range(6):
        kv_heads, head_dim = rng.choice([1, 2, 4]), rng.choice([32, 64, 128, 256])
        heads, block_size = kv_heads * rng.choice([1, 2, 3, 4]), rng.choice([16, 32, 256, 384, 512])
        lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 4))]
        order = list(range(sum(-(-n // block_size) for n in lengths) + 2))
        rng.shuffle(order)
        tables = [[order.pop() for _ in range(-(-n // block_size))] for n in lengths]
        cache = types.SimpleNamespace(block_size=block_size, num_blocks=max(max(t) for t in tables) + 1)
        key_cache, value_cache = (torch.randn(cache.num_blocks, block_size, kv_heads, head_dim).bfloat16()
                                  for _ in range(2))
        queries = [SequenceQuery(torch.zeros(n, dtype=torch.long), table,
                                 torch.tensor(sorted(rng.sample(range(n), rng.randint(1, min(n, 64))))))
                   for n, table in zip(lengths, tables)]
        outputs = {}
        for name in ("torch", "flash-attn", "xformers"):
            doubles.flash.calls.clear()
            doubles.xformers.calls.clear()
            ctx = ModelRunner(torch.nn.Linear(1, 1), cache, select_backend("cpu", name)).prepare(queries)
            if name == "torch":
                rows = ctx.batch.input_ids.numel()
                q = torch.randn(rows, heads + kv_heads, head_dim).mul(2).bfloat16()[:, :heads]
            outputs[name] = ctx.attend(q, key_cache, value_cache).float()
            if name != "torch":
                _assert_called_without_copies(doubles, name, block_size)
        for name in ("flash-attn", "xformers"):
            assert (outputs[name] - outputs["torch"]).abs().max() < BF16_TOLERANCE * outputs["torch"].abs().max()


class Shadowed(AttentionBackend):
    """Every attention call through some backends and through the torch backend on the same inputs; keeps each
    backend's largest difference from the torch one and returns the first backend's output (the one the engine
    then decodes with)."""

    name = "shadowed"

    def __init__(self, backends: list[AttentionBackend]) -> None:
        self.backends = backends
        self.reference = TorchAttentionBackend()
        self.worst = {backend.name: 0.0 for backend in backends}
        self.calls = 0

    def plan(self, batch: ForwardBatch) -> AttendFn:
        plans = [(backend.name, backend.plan(batch)) for backend in self.backends]
        reference = self.reference.plan(batch)

        def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
            expected = reference(q, key_cache, value_cache).float()
            outs = [(name, attend_with(q, key_cache, value_cache)) for name, attend_with in plans]
            for name, out in outs:
                error = ((out.float() - expected).abs().max() / expected.abs().max()).item()
                self.worst[name] = max(self.worst[name], error)
            self.calls += 1
            return outs[0][1]

        return attend


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_engine_on_the_gpu_backends_with_every_policy(folders, monkeypatch, seed, family, policy):
    """The engine end to end with attention_backend="flash-attn" on the doubles, at block size 16 (keys gathered)
    and at the backend's default block size (the cache read through block tables); every attention call of every
    step also runs the xformers backend and the torch one on the same inputs, and stays within bf16's tolerance."""
    doubles = kernel_doubles.install(monkeypatch)
    rng = random.Random(seed)
    prompts, params = [], []
    for _ in range(3):
        prompts.append({"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(1, 20))]})
        block = rng.choice([8, 16])
        gen = block * rng.randint(1, 2)
        params.append(SamplingParams(gen_length=gen, block_length=block, steps=gen // rng.choice([1, 2]),
                                     threshold=rng.choice([None, 0.3])))
    for block_size in (16, None):  # None: the backend's default, pages flash-attn reads in place
        doubles.flash.calls.clear()
        doubles.xformers.calls.clear()
        llm = LLM(folders[family], dtype="bfloat16", device="cpu", cache_policy=policy, block_size=block_size,
                  attention_backend="flash-attn", kv_cache_memory=1 << 24)
        block_size = block_size or FlashAttentionBackend.default_block_size
        assert llm.engine.kv_manager.block_size == block_size
        runner = llm.engine.runner
        assert runner.backend.name == "flash-attn"
        runner.backend = shadow = Shadowed([runner.backend, select_backend("cpu", "xformers")])
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [len(o.token_ids) for o in outputs] == [p.gen_length for p in params]
        assert shadow.calls and max(shadow.worst.values()) < BF16_TOLERANCE, shadow.worst
        for name in ("flash-attn", "xformers"):
            _assert_called_without_copies(doubles, name, block_size)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (none on this machine)")
def test_cuda_torch_backend_matches_cpu_fp32(tmp_path, seed):
    folder, _ = write_checkpoint(tmp_path, "dream", seed=seed)
    tokens = torch.randint(0, VOCAB, (50,))
    outs = []
    for device in ("cpu", "cuda"):
        model = load_model(folder, dtype="float32", device=device)
        runner = ModelRunner(model, PagedKVCache(model.config, 8, 8, torch.float32, device))
        outs.append(runner.run([SequenceQuery(tokens, list(range(7)), torch.arange(50))])[0].cpu())
    assert torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3)


def test_a_sequence_alone_computes_what_sdpa_computes_for_it_in_a_group(seed):
    """A lone sequence goes through the written-out path, equal-shaped ones through one SDPA call; in fp64 they
    must agree to fp64 rounding, or batching would change which tokens near-ties commit (batch invariance)."""
    from dengine.attention.torch_sdpa import _sdpa, math_attention

    q = torch.randn(2, 8, 5, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 37, 16, dtype=torch.float64) * 3 for _ in range(2))
    alone = torch.cat([math_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(2)])
    assert (alone - _sdpa(q, k, v)).abs().max() < 1e-12
    q32, k32, v32 = q.float(), k.float(), v.float()  # fp32 and lower keep an fp32 softmax
    assert (math_attention(q32, k32, v32).double() - _sdpa(q, k, v)).abs().max() < 1e-4


def test_written_out_bf16_attention_keeps_the_scores_in_fp32(seed):
    """On bf16 operands the CPU path is about as accurate as SDPA's kernel (what the official LLaDA and Dream code
    runs), which keeps q k^T in fp32: rounding the scores to bf16 before the softmax made the attention's error
    4-6x SDPA's (measured 0.9% against 0.16% of the output's size)."""
    from dengine.attention.torch_sdpa import _sdpa, math_attention

    rng = random.Random(seed)
    kv_heads = rng.choice([1, 2, 4, 8])
    heads, head_dim = kv_heads * rng.choice([1, 2, 4]), rng.choice([32, 64, 128])
    n, s = rng.randint(8, 64), rng.randint(64, 320)
    q = (torch.randn(2, heads, n, head_dim) * 2).bfloat16()
    k = (torch.randn(2, kv_heads, s, head_dim) * 2).bfloat16()
    v = torch.randn(2, kv_heads, s, head_dim).bfloat16()
    truth = _sdpa(q.double(), k.double(), v.double())

    def error(out: torch.Tensor) -> float:
        return ((out.double() - truth).abs().mean() / truth.abs().mean()).item()

    ours, sdpa = error(math_attention(q, k, v)), error(_sdpa(q, k, v))
    assert ours < 2 * sdpa, (ours, sdpa)
