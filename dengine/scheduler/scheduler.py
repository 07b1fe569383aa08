"""Continuous batching: admit by free KV blocks and max_num_seqs, pack each step by a token budget."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from dengine.kv.manager import KVCacheManager
from dengine.model_runner import SequenceQuery
from dengine.scheduler.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's batch: the scheduled sequences and their query sets, in the same order."""

    sequences: list[Sequence] = field(default_factory=list)
    queries: list[list[SequenceQuery]] = field(default_factory=list)
    num_batched_tokens: int = 0
    deferred: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


class Scheduler:
    """Waiting queue (FIFO) and running list; knows sequences and KV blocks, never the model."""

    def __init__(self, kv_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        # Round-robin order: a sequence stepped this step goes to the back, so deferred ones go first.
        self.running: deque[Sequence] = deque()

    def check_admissible(self, seq: Sequence) -> None:
        """Raise ValueError if seq could never be scheduled (KV pool or token budget too small)."""
        self.kv.check_fits(seq.num_tokens, copies=seq.num_branches, layer_outputs=seq.policy.stores_layer_outputs)
        if seq.kv_tokens > self.max_num_batched_tokens:
            raise ValueError(
                f"a full recompute of this request costs {seq.kv_tokens} tokens but max_num_batched_tokens "
                f"is {self.max_num_batched_tokens}"
            )

    def add(self, seq: Sequence) -> None:
        self.check_admissible(seq)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            outputs = seq.policy.stores_layer_outputs
            if not self.kv.can_allocate(seq.num_tokens, copies=seq.num_branches, layer_outputs=outputs):
                break
            self.waiting.popleft()
            keys = [(seq.request_id, branch) for branch in range(seq.num_branches)]
            seq.block_tables = [self.kv.allocate(key, seq.num_tokens, layer_outputs=outputs) for key in keys]
            seq.output_tables = [self.kv.output_table(key) for key in keys] if outputs else []
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def schedule(self) -> SchedulerOutput:
        """Admit what fits, then take running sequences in round-robin order while the budget lasts."""
        self._admit()
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for seq in self.running:
            queries = seq.plan()
            cost = sum(q.query_positions.numel() for q in queries)
            if cost <= budget:
                out.sequences.append(seq)
                out.queries.append(queries)
                budget -= cost
            else:
                out.deferred.append(seq)
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def postprocess(self, out: SchedulerOutput) -> list[Sequence]:
        """Free the finished sequences' blocks at once; rotate the stepped ones behind the deferred."""
        finished = [seq for seq in out.sequences if seq.is_finished]
        for seq in finished:
            self._release(seq)
        stepped = {id(seq) for seq in out.sequences}
        self.running = deque(
            [seq for seq in self.running if id(seq) not in stepped]
            + [seq for seq in out.sequences if not seq.is_finished]
        )
        return finished

    def _release(self, seq: Sequence) -> None:
        for branch in range(seq.num_branches):
            self.kv.free((seq.request_id, branch))
        seq.block_tables = []
        seq.output_tables = []

    def abort(self, request_id: Hashable) -> Sequence | None:
        """Remove a request wherever it is and free its blocks; None if it is unknown or done."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._release(seq)
                    seq.status = SequenceStatus.ABORTED
                    return seq
        return None
