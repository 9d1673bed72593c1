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


def looks_local(name: str | os.PathLike) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub id (``./x``, ``../x``, ``/x``, ``~/x``, ``x\\y``,
    or a path whose first folder exists here)."""
    text = str(name)
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or text in (".", "..") or "\\" in text:
        return True
    first = Path(text).parts[0] if Path(text).parts else ""
    return bool(first) and len(Path(text).parts) > 1 and Path(first).is_dir()


def check_model_path(name: str | os.PathLike) -> None:
    """Raise ``FileNotFoundError("folder not found ...")`` for a local-looking path that does not exist.

    Without this a mistyped folder reaches the Hub client, which reports an invalid repository id.
    """
    path = Path(str(name)).expanduser()
    if looks_local(name) and not path.exists():
        existing = next((p for p in path.parents if p.exists()), None)
        hint = f" ({existing} exists, {path.relative_to(existing)} does not)" if existing is not None else ""
        raise FileNotFoundError(f"folder not found: {name}{hint}")


def sentence_transformer_source(model_name_or_path: str) -> bool:
    """Whether ``model_name_or_path`` is a sentence-transformers model (a folder or Hub repo with ``modules.json``)."""
    local = Path(model_name_or_path).expanduser()
    if local.exists():
        return (local / "modules.json").is_file()
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(model_name_or_path, "modules.json")
    except Exception:  # offline, private, a plain transformers repo: build the modules ourselves
        return False
    return True


def _backbone_modules(model_name_or_path, *, pooling, normalize, max_seq_length, model_kwargs, device):
    """Modules and prompts for the embedder: a sentence-transformers source keeps its own modules and settings
    (pooling mode, Normalize, max_seq_length, prompts) unless an argument overrides them; a raw backbone gets
    Transformer + Pooling (last token for decoders, mean for encoders) + Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    if sentence_transformer_source(model_name_or_path):
        source = SentenceTransformer(model_name_or_path, model_kwargs=model_kwargs, device=device)
        modules = list(source)
        if not modules or not isinstance(modules[0], Transformer):
            raise ValueError(f"{model_name_or_path}: expected a Transformer as the first sentence-transformers module")
        transformer = modules[0]
        if max_seq_length is not None:
            transformer.max_seq_length = max_seq_length
        pools = [i for i, m in enumerate(modules) if isinstance(m, Pooling)]
        if pooling is not None:
            replacement = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
            if pools:
                modules[pools[0]] = replacement
            else:
                modules.insert(1, replacement)
        has_normalize = any(isinstance(m, Normalize) for m in modules)
        if normalize is True and not has_normalize:
            modules.append(Normalize())
        elif normalize is False and has_normalize:
            modules = [m for m in modules if not isinstance(m, Normalize)]
        mode = next((m.pooling_mode for m in modules if isinstance(m, Pooling)), None)
        return modules, dict(source.prompts or {}), mode
    transformer = Transformer(model_name_or_path, model_kwargs=model_kwargs, max_seq_length=max_seq_length)
    decoder = is_decoder_config(transformer.model.config)
    pooling = pooling or (DECODER_POOLING if decoder else ENCODER_POOLING)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize is None or normalize:
        modules.append(Normalize())
    return modules, {}, pooling


def build_sentence_transformer(
    model_name_or_path: str,
    config: BitNetConversionConfig | None = None,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
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
        model_name_or_path: Hub id or folder of a transformers backbone (``"Qwen/Qwen3-0.6B"``...) or of a
            sentence-transformers model, whose own modules and settings (pooling mode, Normalize,
            max_seq_length, prompts) are kept unless the arguments below override them.
        config: conversion settings (default :class:`BitNetConversionConfig`).
        pooling: sentence-transformers pooling mode; default: the source's, else ``"lasttoken"`` for decoders and
            ``"mean"`` for encoders.
        normalize: ``True`` appends ``Normalize`` (L2), ``False`` drops it; default: the source's, else ``True``.
        max_seq_length: truncation length (default: the source's).
        prompts: sentence-transformers prompts, e.g. ``{"query": "Instruct: ...\\nQuery: "}``, added to the source's.
        convert_model: ``False`` builds the full-precision embedder (a teacher) from the same backbone.
        calibration_sentences: fit the added norms on these texts (:func:`st_bitnet.calibrate_norms`); without
            them the norms start at ones, which changes a pretrained backbone's function a lot.
        gguf_file: load the backbone from this GGUF file inside ``model_name_or_path`` (transformers dequantizes
            it once; see :func:`materialize_gguf`).
        model_kwargs: extra ``from_pretrained`` arguments for the backbone.
        device: where to put the model.

    Returns:
        The ``SentenceTransformer`` (BitLinear layers latent, trainable).

    Raises:
        FileNotFoundError: a local-looking path that does not exist ("folder not found").

    Example::

        import st_bitnet
        model = st_bitnet.build_sentence_transformer("Qwen/Qwen3-0.6B")
        model.encode(["BitNet embeddings are cheap to store."])
    """
    from sentence_transformers import SentenceTransformer

    check_model_path(model_name_or_path)
    model_kwargs = dict(model_kwargs or {})
    if gguf_file is not None:
        model_name_or_path = str(materialize_gguf(model_name_or_path, gguf_file))
    model_kwargs.setdefault("dtype", torch.float32)
    modules, source_prompts, pooling_mode = _backbone_modules(
        model_name_or_path, pooling=pooling, normalize=normalize, max_seq_length=max_seq_length,
        model_kwargs=model_kwargs, device=device,
    )
    if pooling_mode == "lasttoken":
        transformer = modules[0]
        _ensure_eos_appended(getattr(transformer, "tokenizer", None) or getattr(transformer, "processor", None))
    st_model = SentenceTransformer(modules=modules, prompts={**source_prompts, **(prompts or {})} or None, device=device)
    if convert_model:
        convert(st_model, config)
        if calibration_sentences and (config is None or config.norm != "none"):
            calibrate_norms(st_model, calibration_sentences)
    return st_model


def model_source_folders(st_model) -> list[Path]:
    """The local folders ``st_model``'s transformers backbones were loaded from (outputs must not go there)."""
    folders = []
    for model in backbones(st_model):
        name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        if name and Path(name).expanduser().is_dir():
            folders.append(Path(name).expanduser())
    return folders


def is_st_bitnet_save(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a model written by :func:`save_pretrained` (its config carries the st_bitnet record)."""
    config_path = Path(folder) / "config.json"
    try:
        return "st_bitnet" in json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False


EMBEDDING_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def _store_token_embeddings(folder: Path, st_model, dtype_name: str) -> None:
    """Rewrite the saved token-embedding table(s) of ``folder`` in ``dtype_name`` (transformers casts them back to
    the model's dtype at load, so stock loaders read the folder unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = EMBEDDING_DTYPES[dtype_name]
    if dtype is None:
        return
    names = []
    for model in backbones(st_model):
        embedding = model.get_input_embeddings()
        names += [n for n, p in model.named_parameters() if p is embedding.weight]
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    changed = 0
    for file_name in files:
        path = folder / file_name
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        hits = [k for k in tensors if any(k == n or k.endswith("." + n) for n in names)]
        if not hits:
            continue
        for key in hits:
            tensors[key] = tensors[key].to(dtype)
        changed += len(hits)
        save_file(tensors, str(path), metadata=metadata)
    if not changed:
        raise ValueError(f"embedding_dtype={dtype_name!r}: found no token-embedding table among the saved tensors")


def save_pretrained(
    st_model,
    path: str | os.PathLike,
    *,
    model_card: bool = True,
    overwrite: bool | None = None,
    embedding_dtype: str = "float32",
    **card_kwargs,
) -> Path:
    """Pack every BitLinear (in place) and save ``st_model`` to ``path`` for stock loaders.

    Embeddings after packing are identical to before in float32. With ``model_card``, a README.md describing the
    conversion is written (st_bitnet.model_card, when available). The folder is written under a temporary name
    next to ``path`` and renamed into place at the end, so an interrupted save never leaves a half-written
    folder and a replaced folder keeps no stale files; the folder the model was loaded from is never written.

    Args:
        st_model: a SentenceTransformer with a transformers module (BitLinear layers get packed).
        path: the output folder.
        model_card: write README.md.
        overwrite: ``True`` replaces any non-empty folder; ``False`` refuses every non-empty folder; ``None``
            (default) replaces a previous st_bitnet save only and refuses any other non-empty folder.
        embedding_dtype: ``"float32"`` (default, exact) or ``"bfloat16"``: the token-embedding table stored at half
            the bytes (often most of a small model's folder); loaders cast it back to float32, so embeddings change
            by the bf16 rounding of the table only (relative error <= 2**-9 per entry).
        card_kwargs: passed to :func:`st_bitnet.model_card.write_model_card`.

    Returns:
        The folder.

    Raises:
        st_bitnet.atomic_folder.OutputExistsError: ``path`` is not empty (see ``overwrite``) or is the source.
    """
    from .atomic_folder import atomic_folder

    path = Path(path)
    if not backbones(st_model):
        raise ValueError("save_pretrained expects a SentenceTransformer with a transformers module")
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding_dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {embedding_dtype!r}")
    if overwrite is None:
        overwrite = is_st_bitnet_save(path)
    with atomic_folder(path, overwrite=overwrite, sources=model_source_folders(st_model)) as tmp:
        pack(st_model)
        st_model.save(str(tmp))
        _store_token_embeddings(tmp, st_model, embedding_dtype)
        from .shipped_modules import ship_module_code

        ship_module_code(tmp)  # st_bitnet modules (MultiPrecisionQuantizer...) load with trust_remote_code=True
        if model_card:
            try:
                from .model_card import write_model_card
            except ImportError:
                pass
            else:
                card_kwargs.setdefault("repo_id", str(path.resolve()))  # the card names the final folder
                write_model_card(tmp, conversion=conversion_record(st_model), **card_kwargs)
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

    check_model_path(model_name_or_path)
    local = Path(model_name_or_path).expanduser()
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
