"""Loading guard installed by ``import st_bitnet``: BitNet folders load right through stock calls, or fail loudly.

``PreTrainedModel.from_pretrained`` (so ``AutoModel.from_pretrained`` and ``SentenceTransformer(path)``) gets a
wrapper that

* routes a folder in Microsoft's bitnet-embedding layout (plain ``qwen3`` / ``gemma3_text`` config, float latent
  weights, per-projection norms) to :func:`st_bitnet.microsoft.load_microsoft_model` (the stock loader would drop
  the norms and run the projections unquantized), and refuses folders whose per-projection norms the config
  contradicts (:func:`st_bitnet.microsoft.projection_norm_layout`);
* checks every loaded model with BitLinear layers: no checkpoint tensor left unused (e.g. a config with fewer
  layers than the weights), no parameter left uninitialised (a missing packed weight), finite positive weight
  scales and finite norms and biases. Each failure raises :class:`BitNetCheckpointError`.

sentence-transformers' default pipeline for a folder without ``modules.json`` gets last-token pooling plus L2
normalization for the bitnet-embedding format, as :func:`st_bitnet.load` builds it. Other models load exactly as
before.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

_ST_MODEL_MODULE = "sentence_transformers.sentence_transformer.model"
_WRAPPED_MARK = "_st_bitnet_guard"


class BitNetCheckpointError(ValueError):
    """A BitNet checkpoint that would load into wrong numbers (corrupt, mismatched or misdeclared)."""


def _resolve_dtype(kwargs: dict) -> torch.dtype:
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype is None or dtype == "auto":
        return torch.float32  # integer products stay exact; what st_bitnet.load uses
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, a dtype name or 'auto', got {kwargs.get('dtype')!r}")
    return dtype


def _local_checkpoint_folder(name, kwargs: dict) -> Path | None:
    """The local folder holding ``config.json`` and the safetensors of ``name`` (a path or a Hub id), else None.

    For a Hub id this fetches ``config.json`` and, when the config could be Microsoft's format, the safetensors that
    the stock loader would download right after (so nothing is downloaded twice). Any failure returns None and
    leaves the checkpoint to the stock loader (whose result is still checked).
    """
    if name is None or kwargs.get("gguf_file") or kwargs.get("state_dict") is not None:
        return None
    subfolder = kwargs.get("subfolder") or ""
    local = Path(name) / subfolder
    if local.is_dir():
        return local
    if kwargs.get("use_safetensors") is False or kwargs.get("variant"):
        return None  # weights the stock loader picks differently: its result is still checked
    try:
        from transformers.utils import cached_file

        hub = {key: kwargs[key] for key in ("cache_dir", "force_download", "local_files_only", "token", "revision")
               if kwargs.get(key) is not None}
        hub["subfolder"] = subfolder
        fetch = functools.partial(cached_file, str(name), _raise_exceptions_for_missing_entries=False, **hub)
        config_file = fetch("config.json")
        if config_file is None:
            return None
        config = json.loads(Path(config_file).read_text())
        if config.get("model_type") == "bitembed" or "quantization_config" in config:
            return None  # st_bitnet's own formats: their checks run on the loaded model
        index = fetch("model.safetensors.index.json")
        if index is not None:
            for shard in sorted(set(json.loads(Path(index).read_text())["weight_map"].values())):
                fetch(shard)
        elif fetch("model.safetensors") is None:
            return None
        return Path(config_file).parent
    except Exception:  # offline, private, unusual layout: the post-load check still runs
        return None


def _load_bitnet_embedding(cls, folder: Path, kwargs: dict):
    from .microsoft import load_microsoft_model
    from .modeling_bitembed import BitEmbedModel

    for unsupported in ("quantization_config", "device_map", "tp_plan"):
        if kwargs.get(unsupported) is not None:
            raise BitNetCheckpointError(
                f"{folder} is Microsoft's bitnet-embedding format, which st_bitnet quantizes itself: "
                f"{unsupported}= is not supported for it (load it with st_bitnet.load(path))"
            )
    config = kwargs.get("config")
    config = config if config is not None and not isinstance(config, (str, os.PathLike)) else None
    model = load_microsoft_model(folder, dtype=_resolve_dtype(kwargs), config=config)
    backbone = model.model if isinstance(model, BitEmbedModel) else model
    if not (isinstance(model, cls) or isinstance(backbone, cls)):
        raise BitNetCheckpointError(
            f"{folder} is Microsoft's bitnet-embedding format: it loads as an embedding backbone "
            f"({type(backbone).__name__}), not as {cls.__name__}. Use st_bitnet.load(path) or AutoModel."
        )
    if kwargs.get("output_loading_info"):
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


def _is_bitnet_model(model) -> bool:
    """st_bitnet's BitLinear layers, or transformers' own (``ST_BITNET_TRANSFORMERS_HOOK=0``) in a bitnet config."""
    from .bitlinear import BitLinear

    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return getattr(method, "value", method) == "bitnet" or bool(getattr(config, "st_bitnet", None)) or any(
        isinstance(m, BitLinear) for m in model.modules())


def _in_backbone(model, key: str) -> bool:
    """Whether a state-dict key belongs to the backbone (a freshly initialised task head is legitimate)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    return base is None or base is model or key.startswith(prefix + ".")


def check_loaded_bitnet_model(model, loading_info: dict, source) -> None:
    """Raise :class:`BitNetCheckpointError` when a loaded model would compute wrong numbers.

    Args:
        model: the loaded transformers model.
        loading_info: transformers' ``output_loading_info`` dict (``missing_keys``, ``unexpected_keys``...).
        source: the path or Hub id it came from (for the messages).
    """
    from .introspection import BLOCK_NAME_RE as _BLOCK_RE
    from .microsoft import _PROJ_NORM_RE

    unexpected = sorted(loading_info.get("unexpected_keys") or [])
    missing = sorted(loading_info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in loading_info.get("mismatched_keys") or [])
    dropped_norms = [k for k in unexpected if _PROJ_NORM_RE.match(k)]
    if dropped_norms and not any(getattr(m, "rms_norm", None) is not None for m in model.modules()):
        raise BitNetCheckpointError(
            f"{source} holds per-projection BitNet norms ({dropped_norms[0]}, ...) that {type(model).__name__} "
            "does not use: loading it this way gives wrong embeddings. Load it with st_bitnet.load(path)."
        )
    if not _is_bitnet_model(model):
        return
    problems = []
    # Tensors of transformer blocks or BitNet layers with no place in the model; a checkpoint's head
    # (lm_head...) loaded into a backbone is fine.
    unexpected = [k for k in unexpected if _BLOCK_RE.search(k) or k.endswith(("weight_scale", "rms_norm.weight"))]
    missing = [k for k in missing if _in_backbone(model, k)]
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) the config has no place for ({', '.join(unexpected[:4])}"
                        f"{' ...' if len(unexpected) > 4 else ''}; e.g. fewer layers in config.json than in the weights)")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint, left uninitialised "
                        f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    if mismatched:
        problems.append(f"tensor(s) of the wrong shape ({', '.join(mismatched[:4])})")
    for name, layer in model.named_modules():  # st_bitnet's packed BitLinear and transformers' own share these names
        scale = getattr(layer, "weight_scale", None)
        if not isinstance(scale, torch.Tensor) or scale.is_meta:
            continue
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            problems.append(f"{name}.weight_scale is {scale.flatten()[:4].tolist()} (must be finite and > 0)")
        norm = getattr(getattr(layer, "rms_norm", None), "weight", None)
        for part, tensor in (("bias", getattr(layer, "bias", None)), ("rms_norm.weight", norm)):
            if isinstance(tensor, torch.Tensor) and not torch.isfinite(tensor).all():
                problems.append(f"{name}.{part} holds NaN or inf")
        if len(problems) > 8:
            break
    if problems:
        raise BitNetCheckpointError(f"{source} is not a loadable BitNet checkpoint: " + "; ".join(problems))


def _guarded_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, **kwargs):
        from .microsoft import CHECKPOINT_FORMAT, projection_norm_layout

        folder = _local_checkpoint_folder(pretrained_model_name_or_path, kwargs)
        if folder is not None:
            try:
                layout = projection_norm_layout(folder)
            except ValueError as err:
                raise BitNetCheckpointError(str(err)) from None
            if layout == CHECKPOINT_FORMAT:
                return _load_bitnet_embedding(cls, folder, kwargs)
        wants_info = bool(kwargs.pop("output_loading_info", False))
        model, info = original(cls, pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        check_loaded_bitnet_model(model, info, pretrained_model_name_or_path)
        return (model, info) if wants_info else model

    setattr(from_pretrained, _WRAPPED_MARK, True)
    return from_pretrained


def _guard_transformers() -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"].__func__
    if getattr(original, _WRAPPED_MARK, False):
        return
    PreTrainedModel.from_pretrained = classmethod(_guarded_from_pretrained(original))


def _patch_default_modules(st_model_module) -> None:
    """Give a bitnet-embedding folder without ``modules.json`` the pipeline st_bitnet.load builds."""
    cls = getattr(st_model_module, "SentenceTransformer", None)
    original = getattr(cls, "_load_default_modules", None)
    if original is None or getattr(original, _WRAPPED_MARK, False):
        return

    @functools.wraps(original)
    def _load_default_modules(self, *args, **kwargs):
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

        from .microsoft import CHECKPOINT_FORMAT

        modules, config = original(self, *args, **kwargs)
        transformer = modules[0] if isinstance(modules, list) and modules else None
        if getattr(getattr(transformer, "model", None), "st_bitnet_checkpoint_format", None) == CHECKPOINT_FORMAT:
            pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
            modules = [transformer, pooling, Normalize()]
        return modules, config

    setattr(_load_default_modules, _WRAPPED_MARK, True)
    cls._load_default_modules = _load_default_modules


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Patches sentence-transformers' model module when it is first imported (``import st_bitnet`` stays light)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _ST_MODEL_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _patch_default_modules(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def install() -> None:
    """Install the guard on transformers and sentence-transformers (idempotent)."""
    _guard_transformers()
    if _ST_MODEL_MODULE in sys.modules:
        _patch_default_modules(sys.modules[_ST_MODEL_MODULE])
    elif not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
