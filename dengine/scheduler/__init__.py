"""Continuous-batching scheduler: waiting and running queues, admission and per-step batches."""
