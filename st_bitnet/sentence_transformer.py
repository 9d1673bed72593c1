"""sentence-transformers side: build a BitNet embedder from a backbone, save it for stock loaders, load any format.

* :func:`build_sentence_transformer` - backbone name/path -> ``SentenceTransformer`` (Transformer + Pooling
  + Normalize, all stock sentence-transformers modules) with BitLinear projections (latent, trainable).
* :func:`save_pretrained` - pack and save: the folder loads with stock ``SentenceTransformer(path)``
  (stock transformers ``bitnet`` format; needs accelerate) or ``SentenceTransformer(path, trust_remote_code=True)``
  (st_bitnet's ``bitembed`` class or st_bitnet's output modules, whose code ships in the folder).
* :func:`load` - a saved st_bitnet folder / Hub repo, or Microsoft's bitnet-embedding format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import BitNetConversionConfig
from .calibration import calibrate_norms
from .convert import convert, pack
from .introspection import backbones, conversion_record, is_decoder_config

DECODER_POOLING = "lasttoken"
ENCODER_POOLING = "mean"


def _ensure_eos_appended(tokenizer) -> None:
    """Last-token pooling reads the EOS position: make the tokenizer append EOS where it can.

    A BOS the tokenizer already prepends is kept explicit too (``add_bos_token``): some tokenizers (Gemma's built
    from a GGUF file) prepend it through their post-processor while reporting ``add_bos_token=False``, and a saved
    copy is rebuilt from those flags at load, which would silently drop BOS (Gemma embeds badly without it).
    """
    if tokenizer is None or getattr(tokenizer, "eos_token", None) is None:
        return
    bos_id = getattr(tokenizer, "bos_token_id", None)
    try:
        prepends_bos = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
    except Exception:  # a processor or an unusual tokenizer: leave BOS handling as it is
        prepends_bos = False
    for flag, wanted in (("add_eos_token", True), ("add_bos_token", prepends_bos)):
        if wanted and hasattr(tokenizer, flag):
            try:
                setattr(tokenizer, flag, True)
            except Exception:  # some tokenizers expose it read-only
                pass


def _cache_dir() -> Path:
    return Path(os.environ.get("ST_BITNET_CACHE", Path.home() / ".cache" / "st_bitnet"))


def materialize_gguf(folder: str | os.PathLike, gguf_file: str) -> Path:
    """Dequantize a GGUF backbone once (transformers' gguf loading) into a cached safetensors folder.

    transformers re-dequantizes GGUF tensors and rebuilds the tokenizer on every load (minutes for a
    262k-token vocabulary); the cached folder loads in seconds and is a plain full-precision checkpoint.
    """
    from transformers import AutoModel, AutoTokenizer

    source = Path(folder) / gguf_file
    if not source.exists():
        raise FileNotFoundError(f"GGUF file not found: {source}")
    stat = source.stat()
    target = _cache_dir() / f"{source.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    model = AutoModel.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    # The weights are dequantized floats now: drop the GGUF quantizer so the folder saves as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def build_sentence_transformer(
    model_name_or_path: str,
    config: BitNetConversionConfig | None = None,
    *,
    pooling: str | None = None,
    normalize: bool = True,
    max_seq_length: int | None = None,
    prompts: dict[str, str] | None = None,
    convert_model: bool = True,
    calibration_sentences: list[str] | None = None,
    gguf_file: str | None = None,
    model_kwargs: dict | None = None,
    device: str | None = None,
):
    """A SentenceTransformer around ``model_name_or_path`` with its projections converted to BitLinear.

    Args:
        model_name_or_path: Hub id or folder of a transformers backbone (``"Qwen/Qwen3-0.6B"``...).
        config: conversion settings (default :class:`BitNetConversionConfig`).
        pooling: sentence-transformers pooling mode; default ``"lasttoken"`` for decoders, ``"mean"`` for encoders.
        normalize: append ``Normalize`` (L2) - the default for cosine-similarity embedders.
        max_seq_length: truncation length.
        prompts: sentence-transformers prompts, e.g. ``{"query": "Instruct: ...\\nQuery: "}``.
        convert_model: ``False`` builds the full-precision embedder (a teacher) from the same backbone.
        calibration_sentences: fit the added norms on these texts (:func:`st_bitnet.calibrate_norms`); without
            them the norms start at ones, which changes a pretrained backbone's function a lot.
        gguf_file: load the backbone from this GGUF file inside ``model_name_or_path`` (transformers dequantizes
            it once; see :func:`materialize_gguf`).
        model_kwargs: extra ``from_pretrained`` arguments for the backbone.
        device: where to put the model.

    Example::

        import st_bitnet
        model = st_bitnet.build_sentence_transformer("Qwen/Qwen3-0.6B")
        model.encode(["BitNet embeddings are cheap to store."])
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    model_kwargs = dict(model_kwargs or {})
    if gguf_file is not None:
        model_name_or_path = str(materialize_gguf(model_name_or_path, gguf_file))
    model_kwargs.setdefault("dtype", torch.float32)
    transformer = Transformer(model_name_or_path, model_kwargs=model_kwargs, max_seq_length=max_seq_length)
    backbone_config = transformer.model.config
    decoder = is_decoder_config(backbone_config)
    pooling = pooling or (DECODER_POOLING if decoder else ENCODER_POOLING)
    if pooling == "lasttoken":
        _ensure_eos_appended(getattr(transformer, "tokenizer", None) or getattr(transformer, "processor", None))
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    st_model = SentenceTransformer(modules=modules, prompts=prompts, device=device)
    if convert_model:
        convert(st_model, config)
        if calibration_sentences and (config is None or config.norm != "none"):
            calibrate_norms(st_model, calibration_sentences)
    return st_model


def save_pretrained(st_model, path: str | os.PathLike, *, model_card: bool = True, **card_kwargs) -> Path:
    """Pack every BitLinear (in place) and save ``st_model`` to ``path`` for stock loaders.

    Embeddings after packing are identical to before in float32. Returns the folder. With ``model_card``, a
    README.md describing the conversion is written (st_bitnet.model_card, when available).
    """
    path = Path(path)
    if not backbones(st_model):
        raise ValueError("save_pretrained expects a SentenceTransformer with a transformers module")
    pack(st_model)
    st_model.save(str(path))
    from .shipped_modules import ship_module_code

    ship_module_code(path)  # st_bitnet modules (MultiPrecisionQuantizer...) load with trust_remote_code=True
    if model_card:
        try:
            from .model_card import write_model_card
        except ImportError:
            pass
        else:
            write_model_card(path, conversion=conversion_record(st_model), **card_kwargs)
    return path


def needs_trust_remote_code(path: str | os.PathLike) -> bool:
    """True when the saved folder uses st_bitnet's ``bitembed`` class (stock users need trust_remote_code=True)."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        return False
    return json.loads(config_path.read_text()).get("model_type") == "bitembed"


def validate_packed_checkpoint(folder: str | os.PathLike) -> None:
    """Check the packed projections of a saved st_bitnet folder against its architecture, with clear errors.

    Catches truncated/corrupt safetensors and packed tensors of the wrong shape before transformers does
    (whose messages do not say what is wrong with a packed weight).
    """
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    config_path = folder / "config.json"
    weights = folder / "model.safetensors"
    if not config_path.exists() or not weights.exists():
        return
    raw = json.loads(config_path.read_text())
    record = raw.get("st_bitnet") or {}
    if not record.get("packed"):
        return
    try:
        handle = safe_open(str(weights), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    config = AutoConfig.from_pretrained(str(folder))
    if raw.get("model_type") == "bitembed":
        config, prefix = config.backbone_config(), "model."
    else:
        prefix = ""
    with torch.device("meta"):
        skeleton = AutoModel.from_config(config)
    with handle:
        keys = set(handle.keys())
        for name in record.get("converted_modules", []):
            linear = skeleton.get_submodule(name)
            key = prefix + name + ".weight"
            if key not in keys:
                raise ValueError(f"{weights} lacks the packed weight {key!r}")
            tensor_slice = handle.get_slice(key)
            shape, dtype = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
            expected = ((linear.out_features + 3) // 4, linear.in_features)
            if dtype != "U8" or shape != expected:
                raise ValueError(
                    f"{key} is {dtype} {shape}, but a packed {linear.in_features}->{linear.out_features} projection "
                    f"must be U8 {expected} (4 ternary values per byte along the output dimension)"
                )


def load(model_name_or_path: str, *, device: str | None = None, revision: str | None = None, **st_kwargs):
    """Load any BitNet embedder as a SentenceTransformer running on st_bitnet's kernels.

    Accepts a folder or Hub repo saved by st_bitnet (stock ``bitnet`` format or ``bitembed``, with or without
    st_bitnet's output modules such as ``MultiPrecisionQuantizer``) and Microsoft's bitnet-embedding format (plain
    ``qwen3`` / ``gemma3_text`` config, latent bf16 weights and ``*_proj.norm.weight`` norms), which is quantized
    to W1.58A8 at load. No ``trust_remote_code`` is needed: st_bitnet's own classes are used, no folder code runs.
    """
    from sentence_transformers import SentenceTransformer

    local = Path(model_name_or_path)
    if not local.exists():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(model_name_or_path, revision=revision))
    from .microsoft import is_microsoft_format, load_microsoft_sentence_transformer

    if is_microsoft_format(local):
        return load_microsoft_sentence_transformer(local, device=device, **st_kwargs)
    validate_packed_checkpoint(local)
    # st_bitnet is imported here, so a ``bitembed`` folder resolves to the registered local class and st_bitnet's
    # sentence-transformers modules to the installed classes: trust_remote_code is not needed, no folder code runs.
    from .shipped_modules import installed_module_classes

    module_classes = installed_module_classes(local)
    if not module_classes:
        return SentenceTransformer(str(local), device=device, **st_kwargs)
    if not hasattr(SentenceTransformer, "_load_with_module_classes"):
        raise RuntimeError(f"{local} has st_bitnet modules ({', '.join(module_classes)}): loading them without "
                           "trust_remote_code needs sentence-transformers >= 6.0.1 (or pass trust_remote_code=True)")
    return SentenceTransformer._load_with_module_classes(str(local), module_classes, device=device, **st_kwargs)
