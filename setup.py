from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dengine",
    version="0.1.0",
    description="A serving engine for diffusion language models (LLaDA, Dream) with approximate KV caching",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dengine", "dengine.*"]),
    package_data={"dengine": ["assets/*/*.json", "assets/*/*.safetensors", "assets/*/*.md", "explore/*.html"]},
    install_requires=[
        "torch>=2.5",
        "transformers>=5.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "msgspec>=0.18",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6", "xformers>=0.0.28"],
        "serve": ["ray[serve,data]>=2.40", "fastapi>=0.110", "prometheus-client>=0.17"],
        "bench": ["matplotlib>=3.7", "httpx>=0.24"],
        "test": ["pytest>=8", "hypothesis>=6", "httpx>=0.24", "openai>=1.0", "selenium>=4.20"],
    },
    entry_points={"console_scripts": ["dengine=dengine.cli:main"]},
)
