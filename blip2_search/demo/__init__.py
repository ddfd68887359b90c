"""The demo: a synthetic scene language and two tiny BLIP-2 models trained on it, shipped in the package.

``ITM_DIR`` and ``CAPTIONER_DIR`` are ordinary HF model folders (load them with ``from_pretrained``, like
any checkpoint); ``python -m blip2_search.demo.train`` rebuilds them. Importing this package does not
import torch.
"""

from __future__ import annotations

from pathlib import Path

from .scenes import (
    ALL_CAPTIONS,
    ALL_SCENES,
    COLORS,
    POSITIONS,
    SHAPES,
    Scene,
    encode,
    random_scene,
    render,
    render_encoded,
    write_folder,
)

__all__ = [
    "ALL_CAPTIONS",
    "ALL_SCENES",
    "CAPTIONER_DIR",
    "COLORS",
    "ITM_DIR",
    "MODELS_DIR",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "encode",
    "random_scene",
    "render",
    "render_encoded",
    "write_folder",
]

MODELS_DIR = Path(__file__).resolve().parent / "models"
ITM_DIR = MODELS_DIR / "itm"  # Blip2ForImageTextRetrieval (+ BERT tokenizer, Blip2Processor)
CAPTIONER_DIR = MODELS_DIR / "captioner"  # Blip2ForConditionalGeneration with a tiny OPT (+ processor)
