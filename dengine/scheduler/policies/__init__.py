"""Cache policies by name. Adding one is a new file and one line here."""

from __future__ import annotations

from typing import Any

from dengine.scheduler.policies.base import CachePolicy
from dengine.scheduler.policies.d2cache import D2Cache
from dengine.scheduler.policies.dllm import DLLMCache
from dengine.scheduler.policies.entropy import EntropyCache
from dengine.scheduler.policies.fast_dllm import DualCache, PrefixCache
from dengine.scheduler.policies.none import NoCache

POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls for cls in (NoCache, PrefixCache, DualCache, EntropyCache, DLLMCache, D2Cache)
}


def policy_class(name: str) -> type[CachePolicy]:
    """The policy registered under name, or a ValueError listing the known ones."""
    if name not in POLICIES:
        raise ValueError(f"cache_policy {name!r} is unknown; choose one of {sorted(POLICIES)}")
    return POLICIES[name]


def make_policy(name: str, config: dict[str, Any] | None = None) -> CachePolicy:
    """A fresh per-sequence policy instance with validated options."""
    cls = policy_class(name)
    return cls(cls.parse_options(config))


__all__ = ["CachePolicy", "POLICIES", "make_policy", "policy_class"]
