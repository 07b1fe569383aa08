"""The embedded models: small LLaDA- and Dream-format checkpoints trained by dengine on its tasks.

Each folder is a real-format checkpoint plus task.json naming the task it was trained on (dengine.tasks).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent
EMBEDDED_MODELS = {
    "llada-reverse": ASSETS / "llada-reverse",
    "dream-reverse": ASSETS / "dream-reverse",
    "llada-sudoku": ASSETS / "llada-sudoku",
    "dream-sudoku": ASSETS / "dream-sudoku",
    "llada-chain": ASSETS / "llada-chain",
    "dream-chain": ASSETS / "dream-chain",
}
DEFAULT_MODEL = "llada-sudoku"


def served_name(model: str | Path | None) -> str:
    """The model name a server answers to: the embedded model's name, or the checkpoint folder's."""
    return DEFAULT_MODEL if model is None else Path(str(model)).name


def resolve_model(model: str | Path | None) -> Path:
    """A checkpoint folder: the given path, an embedded model's name, or the default embedded model."""
    if model is None:
        model = DEFAULT_MODEL
    if str(model) not in EMBEDDED_MODELS:
        if not Path(model).is_dir():
            raise ValueError(
                f"{str(model)!r} is neither a local checkpoint folder nor an embedded model "
                f"({', '.join(EMBEDDED_MODELS)}). dengine loads weights from local folders only and never "
                "downloads hub ids such as 'GSAI-ML/LLaDA-8B-Instruct': download the folder first and pass "
                "its path"
            )
        return Path(model)
    folder = EMBEDDED_MODELS[str(model)]
    if not (folder / "model.safetensors").is_file():
        raise ValueError(
            f"the embedded model {model!r} is not part of this build (no weights under {folder}); "
            "pass model=PATH to a checkpoint folder, or train it with the command in its model card "
            f"({folder / 'README.md'})"
        )
    return folder
