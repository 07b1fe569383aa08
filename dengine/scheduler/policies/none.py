"""Policy "none": exact decoding, a full recompute every step."""

from __future__ import annotations

from dengine.scheduler.policies.base import CachePolicy


class NoCache(CachePolicy):
    name = "none"

    def plan(self, seq) -> None:
        return None
