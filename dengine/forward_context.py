"""One step's forward context: the ragged batch and what its layers share besides it."""

from __future__ import annotations

from dataclasses import dataclass

from dengine.attention.base import AttendFn
from dengine.attention.probe import AttentionProbe
from dengine.forward_batch import ForwardBatch
from dengine.layer_reuse import LayerReuse


@dataclass
class ForwardContext:
    """Built by the runner (or the training loop) once per step; read by every layer."""

    batch: ForwardBatch
    attend: AttendFn  # the backend's plan for the batch
    layer_reuse: LayerReuse | None = None  # some sequences reuse cached layer outputs
    probe: AttentionProbe | None = None  # some sequences record their attention
