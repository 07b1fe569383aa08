"""Synthetic tasks with exactly checkable answers, used to train and evaluate the embedded models."""

from dengine.tasks.digit_reversal import ReversalProblem, check_answer, generate_problems, split_problems

__all__ = ["ReversalProblem", "check_answer", "generate_problems", "split_problems"]
