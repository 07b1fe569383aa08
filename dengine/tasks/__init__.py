"""Synthetic tasks with exactly checkable answers, used to train and evaluate the embedded models."""

from dengine.tasks.chain_sum import ChainSumProblem, check_answer, generate_problems, split_problems

__all__ = ["ChainSumProblem", "check_answer", "generate_problems", "split_problems"]
