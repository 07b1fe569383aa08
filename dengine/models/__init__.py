"""Model families dengine implements natively, keyed by config.json's model_type (case-insensitive)."""

from dengine.models.dream import DreamModel
from dengine.models.llada import LLaDAModel
from dengine.models.transformer import DiffusionLM

MODEL_FAMILIES: dict[str, type[DiffusionLM]] = {
    LLaDAModel.model_type: LLaDAModel,
    DreamModel.model_type: DreamModel,
}

__all__ = ["DiffusionLM", "DreamModel", "LLaDAModel", "MODEL_FAMILIES"]
