"""The hot path on a GPU, counted on CPU: per engine step exactly one host-to-device copy (to_device), one
device-to-host copy (to_host), and nothing in between that would make the host wait for the device or copy a
host tensor to it (.item(), .tolist(), bool(tensor), nonzero(), boolean-mask indexing, .to(device), a host tensor
inside a device op, ...).

On CPU every tensor is on "cpu", so the test marks device tensors itself: what to_device returns is an
`OnDevice` tensor, and torch's subclass rules make everything computed from it one too; the model's weights and
the KV cache are device tensors by their storage; a factory call with device= between the two copies makes one.
A `HostDeviceLog` (a TorchFunctionMode) sees every torch call of the step and notes each that would sync or copy
on a GPU."""

from __future__ import annotations

import random

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import dengine.forward_batch as forward_batch
import dengine.model_runner as model_runner
from dengine import LLMEngine, SamplingParams
from dengine.forward_batch import pack, to_device, to_host, unpack
from dengine.scheduler.policies import POLICIES

FAMILIES = ["llada", "dream"]

# Calls that make the host wait for a device operand (its value, or a shape that depends on its values).
SYNCS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__",
         "__format__", "__repr__", "__array__", "nonzero", "argwhere", "unique", "unique_consecutive",
         "masked_select", "bincount", "equal", "allclose"}
# Factories that fill memory on the device they are given; torch.tensor / as_tensor would copy host data there.
FILLS = {"arange", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "linspace", "eye"}
FROM_HOST = {"tensor", "as_tensor", "from_numpy"}
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}


class OnDevice(torch.Tensor):
    """A tensor that would live on the GPU; torch's default subclass handling passes the mark on to results."""


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    return "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])


def _has_mask(index) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in tree_flatten(index)[0])


class HostDeviceLog(TorchFunctionMode):
    """Counts the engine's transfers per step and notes every torch call that would sync or copy on a GPU."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        tensors = [*engine.model.parameters(), *engine.model.buffers(), *engine.kv_cache.key, *engine.kv_cache.value]
        self.resident = {_storage(t) for t in tensors}  # weights and KV cache: on the device from the start
        self.to_device = self.to_host = 0
        self.events: list[str] = []
        self.in_forward = False  # between the step's to_device and its to_host
        self.paused = False

    def is_device(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, OnDevice) or _storage(tensor) in self.resident

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device = [t for t in tensors if self.is_device(t)]
        host = [t for t in tensors if not self.is_device(t) and t.dim() > 0]  # a CPU scalar may join a GPU op
        if device:
            if name in SYNCS or (name == "to" and _names_a_device(args, kwargs)):
                self.events.append(f"{name} on a device tensor waits for the device")
            elif name == "where" and len(args) + len(kwargs) == 1:
                self.events.append("where(condition) has a data-dependent shape")
            elif name == "repeat_interleave" and "output_size" not in kwargs:
                self.events.append("repeat_interleave without output_size has a data-dependent shape")
            elif name in INDEXING and len(args) > 1 and _has_mask(args[1]):
                self.events.append(f"{name} with a boolean mask has a data-dependent shape")
            if host:
                self.events.append(f"{name} mixes a host tensor into a device op (a copy to the device)")
        elif host and (name == "cuda" or name == "to" and _names_a_device(args, kwargs)):
            self.events.append(f"{name} sends a host tensor to the device")
        out = func(*args, **kwargs)
        if device:  # what an op makes from the weights or the cache alone lives on the device too
            out = self.mark(out)
        elif self.in_forward and not tensors and "device" in kwargs:
            if name in FROM_HOST:
                self.events.append(f"torch.{name}(..., device=) copies host data to the device")
            elif name in FILLS:
                out = self.mark(out)
        return out

    def mark(self, out):
        if isinstance(out, torch.Tensor) and not self.is_device(out):
            return out.as_subclass(OnDevice)
        if type(out) in (tuple, list):
            return type(out)(self.mark(item) for item in out)
        return out

    def wrap(self, monkeypatch) -> None:
        """Route the runner's two transfers through the log: count them, and mark what crosses."""
        real_to_device, real_to_host = forward_batch.to_device, model_runner.to_host

        def counted_to_device(tensors, device):
            self.to_device += 1
            assert not any(self.is_device(t) for t in tensors), "to_device is given a tensor already on the device"
            self.paused = True
            sent = [t.as_subclass(OnDevice) for t in real_to_device(tensors, device)]
            self.paused, self.in_forward = False, True
            return sent

        def counted_to_host(tensors):
            self.to_host += 1
            self.in_forward, self.paused = False, True
            assert all(isinstance(t, OnDevice) for t in tensors), "to_host is given a tensor the device never made"
            received = [t.as_subclass(torch.Tensor) for t in real_to_host(tensors)]
            self.paused = False
            return received

        monkeypatch.setattr(forward_batch, "to_device", counted_to_device)
        monkeypatch.setattr(model_runner, "to_host", counted_to_host)


def _requests(rng: random.Random, family: str, policies: list[str]) -> list[tuple[dict, SamplingParams]]:
    """Prompts of different lengths (several attention groups), samplers with and without randomness, CFG
    for LLaDA, logprobs and traces (the host reads the commits' distributions)."""
    requests = []
    for policy in policies:
        block = rng.choice([4, 8])
        gen = block * rng.randint(1, 2)
        params = SamplingParams(
            gen_length=gen, block_length=block, steps=gen // rng.choice([1, 2]), cache_policy=policy,
            temperature=rng.choice([0.0, 0.7]), threshold=rng.choice([None, 0.3]),
            cfg_scale=rng.choice([0.0, 0.5]) if family == "llada" else 0.0,
            logprobs=rng.choice([None, 2]), trace=rng.random() < 0.5, seed=rng.randrange(1 << 30))
        requests.append(({"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(1, 12))]}, params))
    return requests


def _run_counting(folder, monkeypatch, requests) -> list[tuple[int, int, list[str]]]:
    """Every step of the requests, run together: (to_device calls, to_host calls, notes) per step."""
    engine = LLMEngine(folder, dtype="float32", device="cpu", block_size=8, kv_cache_memory=1 << 24)
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(i, prompt, params)
    log = HostDeviceLog(engine)
    log.wrap(monkeypatch)
    steps = []
    while engine.has_unfinished_requests():
        log.to_device = log.to_host = 0
        log.events = []
        with log:
            engine.step()
        steps.append((log.to_device, log.to_host, log.events))
        assert len(steps) < 200
    return steps


def _assert_one_copy_each_way(steps: list[tuple[int, int, list[str]]]) -> None:
    assert steps
    for index, (sent, received, events) in enumerate(steps):
        assert (sent, received) == (1, 1), f"step {index}: {sent} copies to the device, {received} back"
        assert not events, f"step {index}: {events}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_each_step_copies_once_each_way_and_never_waits_in_between(folders, monkeypatch, seed, family, policy):
    rng = random.Random(seed)
    _assert_one_copy_each_way(_run_counting(folders[family], monkeypatch, _requests(rng, family, [policy] * 3)))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_policy_in_one_batch(folders, monkeypatch, seed, family):
    """dLLM-Cache's row selection beside sequences that compute every row, d2Cache's probe beside the others."""
    rng = random.Random(seed)
    _assert_one_copy_each_way(_run_counting(folders[family], monkeypatch, _requests(rng, family, sorted(POLICIES))))


def test_the_log_sees_what_it_must_refuse(folders):
    """The log itself: a sync, a host tensor in a device op, a copy to the device, and a mask index are noted."""
    engine = LLMEngine(folders["llada"], dtype="float32", device="cpu", block_size=8, kv_cache_memory=1 << 22)
    log = HostDeviceLog(engine)
    x = torch.arange(6).as_subclass(OnDevice)
    with log:
        int(x[0])
        x + torch.ones(6, dtype=torch.long)
        torch.ones(3).to(engine.device)
        x[x > 2]
        engine.kv_cache.key[0].sum().item()
        torch.ones(3).tolist()  # a host tensor: fine
        torch.zeros(2, dtype=torch.bool)[torch.tensor([True, False])]  # on the host: fine
    assert len(log.events) == 5, log.events


def test_packing_round_trips_every_dtype_at_aligned_offsets(seed):
    tensors = [torch.randint(0, 1 << 40, (7,)), torch.randint(-5, 5, (3, 5), dtype=torch.int32),
               torch.rand(5) < 0.5, torch.randn(2, 3).bfloat16(), torch.zeros(0, dtype=torch.int64),
               torch.randn(3, 2, dtype=torch.float64).t()]
    buffer = pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.numel() % forward_batch.ALIGNMENT == 0
    for got, want in zip(unpack(buffer, tensors), tensors):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    on_meta = to_device(tensors, torch.device("meta"))
    assert [(t.device.type, t.dtype, t.shape) for t in on_meta] == [("meta", t.dtype, t.shape) for t in tensors]


def test_on_cpu_the_transfers_are_the_tensors_themselves():
    tensors = [torch.arange(5), torch.ones(2, 3)]
    assert all(a is b for a, b in zip(to_device(tensors, torch.device("cpu")), tensors))
    assert all(a is b for a, b in zip(to_host(tensors), tensors))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on this machine)")
def test_cuda_transfers_round_trip(seed):
    tensors = [torch.randint(0, 1000, (9,)), torch.randint(0, 9, (2, 4), dtype=torch.int32), torch.rand(6) < 0.5]
    sent = to_device(tensors, torch.device("cuda"))
    assert all(t.is_cuda for t in sent)
    back = to_host([*sent, torch.randn(3, 5, device="cuda").bfloat16()])
    assert all(not t.is_cuda for t in back)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))
