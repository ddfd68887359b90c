"""What the embedder and the captioner share: a resolved checkpoint, its placement, processor and loading."""

from __future__ import annotations

import json
import threading
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ModelLoadError
from .loading import ModelSource
from .policy import Placement

LOADING = threading.RLock()
"""Held while a model part loads (and while transformers is first imported), in every checkpoint of the process:
transformers' lazy imports are not thread-safe, and `from_pretrained` builds modules under process-wide patches
(meta-device parameters, the default dtype), so two threads loading at once fail or get parameters with no data."""


class Checkpoint:
    """A BLIP-2 checkpoint on local disk whose parts load on first use."""

    role = "model"

    def __init__(self, source: ModelSource, placement: Placement):
        self.source = source
        self.placement = placement
        self._image_processor = None
        self._image_size: int | None = None
        self._resample: int | None = None
        self._norm_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def revision(self) -> str:
        return self.source.revision

    @property
    def device(self) -> torch.device:
        return torch.device(self.placement.device)

    def _load_once(self, attribute: str, load):
        """`self.<attribute>`, set to `load()` on first use under LOADING (checked again there: another thread may
        have loaded it meanwhile)."""
        value = getattr(self, attribute)
        if value is None:
            with LOADING:
                value = getattr(self, attribute)
                if value is None:
                    value = load()
                    setattr(self, attribute, value)
        return value

    @property
    def image_processor(self):
        """The checkpoint's own image processor, PIL backend (the resize LAVIS does, with the checkpoint's filter)."""
        return self._load_once("_image_processor", self._load_image_processor)

    def _load_image_processor(self):
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(self.source.path, backend="pil")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = ("it has no preprocessor_config.json" if not (self.source.path / "preprocessor_config.json").is_file()
                      else str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            raise ModelLoadError(f"{self.role} {self.name!r}: its image preprocessor could not be loaded ({reason}); put the "
                                 f"preprocessor_config.json that came with this checkpoint in {self.source.path}") from exc

    @property
    def image_size(self) -> int:
        """Side of the square model input, read from the checkpoint's preprocessor config (which must match the
        ViT's `vision_config.image_size`: HF would run a smaller input on the wrong position embeddings). Its
        first read also checks the processor's `resample`."""
        if self._image_size is None:
            self._resample = self._checked_resample()
            side = self._checked_image_size()
            self._check_processor_follows_decode(side, self._resample)
            self._image_size = side
        return self._image_size

    @property
    def resample(self) -> int:
        """The PIL filter (`Image.Resampling`) the checkpoint's processor resizes photos with: bicubic in BLIP-2's
        checkpoints, maybe another in a fine-tuned one. Every decode for this model must use it (see `image_input`)."""
        _ = self.image_size  # checked with the size, so every image path refuses a filter it cannot honour at once
        return self._resample

    @property
    def image_input(self) -> tuple[int, int]:
        """`(S, resample)`: how a photo becomes this model's input; two models with equal ones read the same pixels."""
        return self.image_size, self.resample

    def _checked_resample(self) -> int:
        resample = getattr(self.image_processor, "resample", None)
        if isinstance(resample, bool) or not isinstance(resample, int) or resample not in {int(f) for f in Image.Resampling}:
            # transformers resizes with bilinear for a filter it does not know (e.g. "bicubic" spelt as text), silently
            raise ModelLoadError(f"model {self.name!r}: its {self._settings_file()} sets resample {resample!r}, not a PIL resampling filter, "
                                 f"so photos cannot be resized as the model was trained; put the {self._settings_file(entry=False)} that "
                                 'came with this checkpoint beside it, or set its "resample" to 3 (bicubic, as BLIP-2)')
        return int(resample)

    def _checked_image_size(self) -> int:
        size = self.image_processor.size
        height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (getattr(size, "height", None), getattr(size, "width", None))
        if height is None or height != width:  # e.g. {"shortest_edge": S}: photos would keep their aspect, which the ViT cannot read
            raise ModelLoadError(f"model {self.name!r}: its {self._settings_file()} does not resize photos to a square (size {_size_text(size)}), "
                                 f"but BLIP-2's ViT reads S x S pixels; put the {self._settings_file(entry=False)} that came with this "
                                 'checkpoint beside it, or set its "size" to {"height": S, "width": S}')
        side = int(height)
        built_for = (self.source.config().get("vision_config") or {}).get("image_size")
        if built_for is not None and int(built_for) != side:
            raise ModelLoadError(f"model {self.name!r}: its {self._settings_file()} resizes photos to {side} px but its ViT was built "
                                 f"for {built_for} px (config.json vision_config.image_size); put the {self._settings_file(entry=False)} "
                                 "that came with this checkpoint beside it")
        return side

    def _check_processor_follows_decode(self, side: int, resample: int) -> None:
        """Refuse a processor whose pixels differ from a photo resized straight to `side` x `side` with `resample`
        (what indexing decodes) then `pixels_from_uint8`: the library's vectors and `embed_images`/`rerank` would read
        other inputs, or the ViT an input of another size (a processor that does not resize, crops or pads)."""
        fix = f"put the {self._settings_file(entry=False)} that came with this checkpoint beside it"
        if not getattr(self.image_processor, "do_resize", True):
            raise ModelLoadError(f"model {self.name!r}: its {self._settings_file()} sets do_resize false, so photos would reach its ViT "
                                 f"at their own size, but it reads {side} x {side} pixels; {fix}, or set its \"do_resize\" to true")
        probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side + 3, side + 7, 3), dtype=np.uint8))
        expected = self.pixels_from_uint8(np.array(probe.resize((side, side), resample))[None])
        made = self.image_processor(images=[probe], return_tensors="pt")["pixel_values"]
        if made.shape != expected.shape:
            raise ModelLoadError(f"model {self.name!r}: its image processor makes {'x'.join(map(str, made.shape[2:]))} pixel inputs, "
                                 f"not the {side} x {side} photo it resizes to (a setting such as do_center_crop or do_pad); {fix}")
        error = float(((made.float() - expected).abs() / (1 + expected.abs())).max())
        if error > 1e-4:
            raise ModelLoadError(f"model {self.name!r}: its image processor changes photos in a way this library does not follow "
                                 f"(pixel values off by up to {error:.3g} from resize, rescale and normalise); {fix}")

    def _settings_file(self, *, entry: bool = True) -> str:
        """The file the image processor's settings were read from, to name in a message: transformers reads the
        "image_processor" entry of processor_config.json (which save_pretrained writes since transformers 5) before
        preprocessor_config.json. `entry`: name that entry too."""
        try:
            nested = json.loads((self.source.path / "processor_config.json").read_text(encoding="utf-8")).get("image_processor")
        except (OSError, ValueError, AttributeError):  # none, not JSON, or not an object: transformers reads the other file
            nested = None
        if not isinstance(nested, dict):
            return "preprocessor_config.json"
        return 'processor_config.json ("image_processor")' if entry else "processor_config.json"

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel_values `[n, 3, S, S] float32` with the checkpoint's processor (the reference path)."""
        _ = self.image_size  # checks the processor against the ViT first: a wrong one would run silently (see `image_size`)
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def pixels_from_uint8(self, pixels: np.ndarray, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Already-resized RGB `[n, S, S, 3] uint8` -> normalised pixel_values `[n, 3, S, S] float32` on `device`.

        Equal to the processor's output for images already at S x S (resizing to the same size is a copy).
        With a device, the uint8 array travels (a quarter of the float32 bytes) and is normalised there; to a
        GPU it goes through pinned memory, so the copy queues behind the work already queued instead of
        waiting for it (a copy from pageable memory makes the host wait for the stream first).
        """
        proc = self.image_processor
        x = torch.from_numpy(np.ascontiguousarray(pixels))
        if device is not None and torch.device(device).type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
        elif device is not None:
            x = x.to(device)
        x = x.permute(0, 3, 1, 2).float()
        if getattr(proc, "do_rescale", True):  # as the processor: a checkpoint may turn either step off
            x = x * float(proc.rescale_factor)
        if not getattr(proc, "do_normalize", True):
            return x
        mean, std = self._normalisation(x.device)
        return (x - mean) / std

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's mean and std `[1, 3, 1, 1] float32` on `device`, made once: making them for every
        batch would copy from pageable memory, which makes the host wait for the GPU's queue."""
        cache = self._norm_by_device
        if device not in cache:
            proc = self.image_processor
            # a processor may give one value for all three channels (image_mean: 0.5), as transformers allows
            cache[device] = tuple(torch.tensor(v, dtype=torch.float32).reshape(-1).expand(3).reshape(1, 3, 1, 1).to(device)
                                  for v in (proc.image_mean, proc.image_std))
        return cache[device]

    def _load_tokenizer(self):
        """The checkpoint's own tokenizer. Without its files transformers 5 makes an empty one rather than failing (every
        text then has no words: blank captions, one vector for every query), so one that knows no word is refused."""
        from transformers import AutoTokenizer

        fix = f"put the tokenizer files that came with this checkpoint (tokenizer.json or vocab.txt, tokenizer_config.json) in {self.source.path}"
        try:
            tok = AutoTokenizer.from_pretrained(self.source.path)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelLoadError(f"{self.role} {self.name!r}: its tokenizer could not be loaded ({reason}); {fix}") from exc
        special = set(tok.all_special_tokens)
        if all(token in special for token in tok.get_vocab()):
            raise ModelLoadError(f"{self.role} {self.name!r} has a tokenizer that knows no words (its tokenizer files are missing or incomplete); {fix}")
        return tok

    def _from_pretrained(self, cls):
        """Load `cls` from the checkpoint in this placement, frozen, in eval mode."""
        from safetensors import SafetensorError

        try:
            # Lazy loads can happen inside an inference_mode call; weights made there could not be used later.
            with LOADING, torch.inference_mode(False):
                # ignore_mismatched_sizes: report them in `info` (refused below, by name) rather than raise an error that names none
                model, info = cls.from_pretrained(self.source.path, dtype=self.placement.torch_dtype, use_safetensors=True,
                                                  output_loading_info=True, ignore_mismatched_sizes=True)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:  # SafetensorError: a file cut short
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelLoadError("could not load {cls} from {role} {name!r} ({reason}); check the checkpoint files or pass another {argument}",
                                 argument=self.role, cls=cls.__name__, role=self.role, name=self.name, reason=reason) from exc
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # transformers fills them with random values and only logs it: every score would be noise
            raise ModelLoadError("{role} {name!r} lacks {n} weight{s} that {cls} needs (e.g. {examples}), so they would be random; its "
                                 ".safetensors files are incomplete or from another model class: download or save the checkpoint again, "
                                 "or pass another {argument}", argument=self.role, role=self.role, name=self.name, n=len(missing),
                                 s="s" if len(missing) != 1 else "", cls=cls.__name__, examples=", ".join(missing[:3]))
        mismatched = sorted(info.get("mismatched_keys") or ())
        if mismatched:  # transformers left them random: e.g. a Q-Former of another width than config.json says
            key, in_files, in_config = mismatched[0]
            raise ModelLoadError("{role} {name!r} has {n} weight{s} of another shape than its config.json builds (e.g. {key}: {files} in "
                                 "the files, {config} in the config), so they would be random; put the config.json that came with these "
                                 "weights beside them, or pass another {argument}", argument=self.role, role=self.role, name=self.name,
                                 n=len(mismatched), s="s" if len(mismatched) != 1 else "", key=key, files=_shape_text(in_files),
                                 config=_shape_text(in_config))
        return model.to(self.device).eval().requires_grad_(False)


def _shape_text(shape) -> str:
    """A tensor shape as `48x32` (`scalar` for none)."""
    return "x".join(str(int(n)) for n in shape) or "scalar"


def _size_text(size) -> str:
    """A processor's size setting as the fields it sets, e.g. `shortest_edge=224`."""
    fields = size.items() if isinstance(size, dict) else vars(size).items()
    return ", ".join(f"{k}={v}" for k, v in fields if v is not None) or "unset"
