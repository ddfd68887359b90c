"""One registry of settings: name, default, environment variable and help, read by the CLI, docs and code."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    env: str | None
    help: str
    minimum: float | None = None  # numbers: the smallest value allowed
    maximum: float | None = None  # numbers: the largest value allowed
    positive: bool = False  # numbers: must be > 0

    def value(self):
        """The environment's value when set, else the default (typed like the default).

        Raises InvalidInputError naming the variable when its value is not such a number."""
        raw = os.environ.get(self.env) if self.env else None
        if raw is None or raw == "":
            return self.default
        if not isinstance(self.default, (int, float)):
            return raw
        try:
            value = type(self.default)(raw.strip())
        except ValueError:
            value = None
        if not self._allowed(value):
            raise InvalidInputError(
                f"environment variable {self.env}={raw!r} is not {self._wanted()}; set it to one (default {self.default}) or unset it"
            )
        return value

    def check(self, value):
        """`value` passed in Python for this setting, checked as the environment's is (InvalidInputError naming it)."""
        typed = None  # numpy numbers count as numbers
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            typed = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(self.default, int):
            typed = float(value)
        if not self._allowed(typed):
            raise InvalidInputError(f"{self.name}={value!r} is not {self._wanted()}; pass one (default {self.default})")
        return typed

    def _allowed(self, value) -> bool:
        return not (value is None or not math.isfinite(value) or (self.positive and value <= 0)
                    or (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum))

    def _wanted(self) -> str:
        kind = "a whole number" if isinstance(self.default, int) else "a number"
        low = "> 0" if self.positive else f">= {self.minimum:g}" if self.minimum is not None else ""
        low += f" and <= {self.maximum:g}" if self.maximum is not None else ""
        return f"{kind} {low}" if low else kind


SETTINGS = {
    s.name: s
    for s in [
        Setting("library", "indexes/default", "BLIP2_SEARCH_LIBRARY", "Library folder (created by `index`)."),
        Setting("model", "Salesforce/blip2-itm-vit-g", "BLIP2_SEARCH_MODEL", "Embedder/ITM checkpoint for a new library: hub id, local dir or 'demo'."),
        Setting("captioner", "Salesforce/blip2-opt-2.7b", "BLIP2_SEARCH_CAPTIONER", "Caption model (BLIP-2 generation checkpoint) for a new library."),
        Setting("batch_size", 0, "BLIP2_SEARCH_BATCH_SIZE",
                "Images per model call while indexing (0 = auto: 32 on the CPU or with captions, 256 on a GPU).", minimum=0, maximum=4096),
        Setting("workers", 0, "BLIP2_SEARCH_WORKERS", "Decode workers while indexing (0 = one per CPU core).", minimum=0, maximum=256),
        Setting("vector_index", "auto", "BLIP2_SEARCH_VECTOR_INDEX",
                "Vector index of a new library: exact (all vectors in RAM, ~34 KB an image), compact (4-bit PQ codes, "
                "~1.3 KB an image, candidates rescored exactly from the database) or auto (exact until it would "
                "outgrow vector_memory_gb, then compact)."),
        Setting("vector_memory_gb", 4.0, "BLIP2_SEARCH_VECTOR_MEMORY_GB",
                "RAM (GiB) the exact vector index may use before an `auto` library moves to compact codes.", positive=True),
    ]
}


def get(name: str):
    """Current value of setting `name`."""
    return SETTINGS[name].value()


def given(name: str, value):
    """`value` for setting `name` when given (checked like the environment's), else the setting's current value."""
    return SETTINGS[name].value() if value is None else SETTINGS[name].check(value)
