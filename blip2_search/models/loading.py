"""Resolve a model name (hub id, local directory or "demo") to local files, never running remote code."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError, ModelNotFoundError

DEFAULT_EMBEDDER = "Salesforce/blip2-itm-vit-g"
DEFAULT_CAPTIONER = "Salesforce/blip2-opt-2.7b"
DEMO = "demo"

# Only what loading needs: configs, tokenizer files and safetensors weights (never pickles, never code).
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "spiece.model", "merges.txt", "vocab.*"]


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local directory.

    `name` is what the user asked for; `revision` identifies the exact weights (the hub commit for a
    hub snapshot, a content fingerprint for a local directory), so a library can tell if its vectors
    were made by these weights.
    """

    name: str
    path: Path
    revision: str
    older_revisions: tuple[str, ...] = ()
    """A local directory's fingerprints as libraries recorded them before (`weights_fingerprint`, which left out the
    processor and tokenizer files; `legacy_fingerprint`, which sampled only the first and last MiB): a library that
    recorded one adopts `revision` when the files still give it."""

    def config(self) -> dict:
        """The checkpoint's `config.json` as a dict."""
        try:
            config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
            raise ModelLoadError(f"model {self.name!r}: its config.json cannot be read ({exc}); put the config.json that came with this "
                                 f"checkpoint in {self.path}") from exc
        if not isinstance(config, dict):
            raise ModelLoadError(f"model {self.name!r}: its config.json holds no settings object; put the config.json that came with this "
                                 f"checkpoint in {self.path}")
        return config


def resolve_model(name: str, *, role: str = "embedder") -> ModelSource:
    """Turn `name` into local files: "demo", a directory, or a hub id found in (or fetched to) the HF cache.

    Raises ModelNotFoundError naming everything that was tried and the fix.
    """
    if not name or not str(name).strip():
        raise ModelNotFoundError("{role} model name is empty; pass {argument} with a hub id, a local directory or 'demo'", argument=_argument(role), role=role)
    name = str(name)
    if name == DEMO:
        return _demo_source(role)
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(name, path, role)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise ModelNotFoundError("{role} model directory {name!r} does not exist; pass {argument} with an existing directory, a hub id or 'demo'",
                                 argument=_argument(role), role=role, name=name)
    return _hub_source(name, role)


def _argument(role: str) -> str:
    """The keyword that names a model of this role (`Library.open(model=..., captioner=...)`; the CLI's --model, --captioner)."""
    return "captioner" if role == "captioner" else "model"


def _demo_source(role: str) -> ModelSource:
    from .. import demo

    path = demo.CAPTIONER_DIR if role == "captioner" else demo.ITM_DIR
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"the demo {role} is missing from the installed package at {path}; reinstall blip2-search or run `python -m blip2_search.demo.train`")
    return _fingerprinted(DEMO, path)


def _local_source(name: str, path: Path, role: str) -> ModelSource:
    if not path.is_dir():
        raise ModelNotFoundError("{role} model path {name!r} is a file, not a checkpoint directory; pass {argument} with the directory holding config.json",
                                 argument=_argument(role), role=role, name=name)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError("{role} model directory {name!r} has no config.json; pass {argument} with a directory saved by save_pretrained",
                                 argument=_argument(role), role=role, name=name)
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")):
            raise ModelLoadError("{role} model directory {name!r} has only pickled .bin weights, which are not loaded (a pickle can run "
                                 "code); load it once with transformers' from_pretrained, save it with save_pretrained (which writes "
                                 ".safetensors) beside its tokenizer and preprocessor files, and pass {argument} with that directory",
                                 argument=_argument(role), role=role, name=name)
        raise ModelLoadError("{role} model directory {name!r} has no .safetensors weights; put the weights that came with its config.json "
                             "in it, or pass {argument} with a directory saved by save_pretrained", argument=_argument(role), role=role, name=name)
    return _fingerprinted(name, path.resolve())


def _hub_source(name: str, role: str) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelNotFoundError(f"cannot resolve hub id {name!r}: huggingface_hub is not installed; pip install huggingface_hub") from exc

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    fix = "pass {argument:PATH} to a local copy, or download it once with `hf download {name}` into the HF cache (HF_HOME)"
    try:
        local = snapshot_download(name, allow_patterns=_HUB_FILES, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, HfHubHTTPError, ValueError, OSError):
        local = None
    cached = local
    if local is not None and not offline and not any(Path(local).glob("*.safetensors")):
        local = None  # a snapshot without its weights (configs fetched by another tool, a download cut short): fetch them
    if local is None and offline:
        raise ModelNotFoundError("{role} model {name!r} is not in the HF cache and HF_HUB_OFFLINE is set; " + fix + ", or unset HF_HUB_OFFLINE",
                                 argument=_argument(role), role=role, name=name)
    if local is None:
        try:
            local = snapshot_download(name, allow_patterns=_HUB_FILES)
        except Exception as exc:  # the hub client raises many types (HTTP, DNS, auth, repo-not-found)
            if cached is None:
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                raise ModelNotFoundError("{role} model {name!r} is not a local directory, not in the HF cache, and could not be downloaded ({reason}); "
                                         + fix, argument=_argument(role), role=role, name=name, reason=reason) from exc
            local = cached  # the cached snapshot stands, refused below for the weights it lacks
    path = Path(local)
    if not any(path.glob("*.safetensors")):  # else from_pretrained fails naming a file, not why it is absent
        raise ModelLoadError("{role} model {name!r} has no .safetensors weights in its HF cache snapshot {path}: the download was cut "
                             "short, or the repository holds only pickled .bin weights, which are never fetched or loaded; download it "
                             "again with `hf download {name}`, or pass {argument} with a local copy saved by save_pretrained",
                             argument=_argument(role), role=role, name=name, path=path)
    if path.parent.name == "snapshots":
        return ModelSource(name, path, path.name)
    return _fingerprinted(name, path)


_EDGE_BYTES = 4096

# The files that turn a photo or a text into the model's input (image size, resample, mean and std; vocabulary,
# lower-casing, special tokens): an edit to one changes every vector as surely as new weights do.
_INPUT_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                "tokenizer.model")


def _fingerprinted(name: str, path: Path) -> ModelSource:
    """`path` as a `ModelSource` revised by its content, with the fingerprints older libraries recorded for it."""
    weights = weights_fingerprint(path)
    return ModelSource(name, path, fingerprint(path, weights=weights), (weights, legacy_fingerprint(path)))


def fingerprint(path: Path, *, weights: str | None = None) -> str:
    """A short content id for a checkpoint directory: `weights_fingerprint` (pass it when already made) and the
    bytes of each processor and tokenizer file (`_INPUT_FILES`) present.

    Libraries record it as the embedder's revision and refuse to mix vectors of other files.
    """
    h = hashlib.sha256((weights or weights_fingerprint(path)).encode())
    for name in _INPUT_FILES:
        file = path / name
        if file.is_file():
            data = file.read_bytes()
            h.update(name.encode() + len(data).to_bytes(8, "little") + data)
    return "files:" + h.hexdigest()[:16]


def weights_fingerprint(path: Path) -> str:
    """The content id libraries recorded before `fingerprint` covered the processor and tokenizer files: the
    config, and for each safetensors file its size, its header (every tensor's name, dtype, shape and place) and
    the first and last 4 KiB of every tensor.

    Cheap for multi-GB weights (a few MB read), yet it changes when any tensor is retrained or replaced: a
    fine-tune changes every byte of the tensors it trains, so each one's edges change too.
    """
    h = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        h.update(weights.name.encode() + weights.stat().st_size.to_bytes(8, "little"))
        with weights.open("rb") as f:
            _hash_tensor_edges(f, h)
    return "content:" + h.hexdigest()[:16]


def _hash_tensor_edges(f, h) -> None:
    """Hash a safetensors file's header and each tensor's first and last ``_EDGE_BYTES`` (the whole tensor when
    smaller); a file whose header cannot be read is hashed by its first MiB."""
    head = f.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    header = f.read(length) if 0 < length <= 100 << 20 else b""
    try:
        tensors = json.loads(header)
        spans = sorted(tuple(t["data_offsets"]) for name, t in tensors.items() if name != "__metadata__")
    except (ValueError, TypeError, KeyError):
        f.seek(0)
        h.update(f.read(1 << 20))
        return
    h.update(header)
    base = 8 + length
    for start, end in spans:
        f.seek(base + start)
        if end - start <= 2 * _EDGE_BYTES:
            h.update(f.read(end - start))
            continue
        h.update(f.read(_EDGE_BYTES))
        f.seek(base + end - _EDGE_BYTES)
        h.update(f.read(_EDGE_BYTES))


def legacy_fingerprint(path: Path) -> str:
    """The fingerprint libraries recorded before `weights_fingerprint` sampled every tensor: the config, and each
    safetensors file's size and first and last MiB (most tensors of a large checkpoint lie between). Kept to
    recognise them."""
    h = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        h.update(weights.name.encode() + size.to_bytes(8, "little"))
        with weights.open("rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return "sha256:" + h.hexdigest()[:16]


def check_embedder_config(source: ModelSource) -> dict:
    """Refuse checkpoints that cannot produce BLIP-2 ITC embeddings, naming the right kind."""
    config = source.config()
    arch = config.get("architectures") or []
    if config.get("model_type") != "blip-2":
        kind = f"is a {config['model_type']!r} checkpoint" if config.get("model_type") else "has a config.json that names no model_type"
        raise ModelLoadError("model {name!r} {kind}, not BLIP-2; pass {argument:{default}} or another BLIP-2 ITM checkpoint",
                             argument="model", name=source.name, kind=kind, default=repr(DEFAULT_EMBEDDER))
    if "Blip2ForImageTextRetrieval" not in arch:
        raise ModelLoadError(
            "model {name!r} ({arch}) has no ITC/ITM heads: its Q-Former is not in the retrieval space; "
            "pass {argument:{default}} (or another Blip2ForImageTextRetrieval checkpoint)",
            argument="model", name=source.name, arch=", ".join(arch) or "unknown architecture", default=repr(DEFAULT_EMBEDDER),
        )
    if not (config.get("qformer_config") or {}).get("use_qformer_text_input", False):
        raise ModelLoadError(f"model {source.name!r} has qformer_config.use_qformer_text_input=false, so its Q-Former cannot encode text; fix the config or use {DEFAULT_EMBEDDER}")
    return config


def check_captioner_config(source: ModelSource) -> dict:
    """Refuse checkpoints that cannot generate captions."""
    config = source.config()
    arch = config.get("architectures") or []
    if config.get("model_type") != "blip-2" or "Blip2ForConditionalGeneration" not in arch:
        raise ModelLoadError("captioner {name!r} ({arch}) is not a Blip2ForConditionalGeneration checkpoint; pass {argument:{default}}",
                             argument="captioner", name=source.name, arch=", ".join(arch) or config.get("model_type"), default=repr(DEFAULT_CAPTIONER))
    return config
