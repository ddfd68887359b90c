"""The model layer: loading, device/dtype policy, encoders (ITC/ITM) and the captioner.

Names are imported on first use, so resolving a model name does not import torch.
"""

import importlib

_LAZY = {
    "Blip2Captioner": "captioner", "CaptionSettings": "captioner",
    "Blip2Encoder": "encoder", "MatchScores": "encoder", "itc_scores": "encoder",
    "DEFAULT_CAPTIONER": "loading", "DEFAULT_EMBEDDER": "loading", "ModelSource": "loading", "resolve_model": "loading",
    "Placement": "policy", "choose_placement": "policy", "detect_placement": "policy",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'blip2_search.models' has no attribute {name!r}")
