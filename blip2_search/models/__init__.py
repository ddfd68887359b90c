"""The model layer: loading, device/dtype policy, encoders (ITC/ITM) and the captioner."""

from .captioner import Blip2Captioner, CaptionSettings
from .encoder import Blip2Encoder, MatchScores, itc_scores
from .loading import DEFAULT_CAPTIONER, DEFAULT_EMBEDDER, ModelSource, resolve_model
from .policy import Placement, choose_placement, detect_placement

__all__ = [
    "Blip2Captioner",
    "Blip2Encoder",
    "CaptionSettings",
    "DEFAULT_CAPTIONER",
    "DEFAULT_EMBEDDER",
    "MatchScores",
    "ModelSource",
    "Placement",
    "choose_placement",
    "detect_placement",
    "itc_scores",
    "resolve_model",
]
