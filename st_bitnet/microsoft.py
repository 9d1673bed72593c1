"""Microsoft's bitnet-embedding checkpoint format (bitnet-embedding-0.6b / -270m).

Their repos hold a plain ``qwen3`` / ``gemma3_text`` config, latent (bf16) projection weights that are
quantized at load (absmean ternary weights, per-token absmax int8 activations), and one RMSNorm per
projection named ``<proj>.norm.weight``. Stock transformers would load them as a plain full-precision model
and silently drop those norms, so st_bitnet reads them itself and packs them to W1.58A8; with st_bitnet imported,
stock ``AutoModel.from_pretrained`` / ``SentenceTransformer`` calls come here too (:mod:`st_bitnet.load_guard`).

Assumption (documented, not checkable offline): the per-projection norms use the plain ``weight * x / rms(x)``
form (transformers' LlamaRMSNorm, as in its bitnet integration), also inside Gemma3 models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .bitlinear import BitLinear
from .config import BitNetConversionConfig
from .convert import convert, pack
from .introspection import transformer_modules
from .modeling_bitembed import BitEmbedModel

# Microsoft names a projection's norm ``<proj>.norm.weight``; st_bitnet / transformers' bitnet format
# ``<proj>.rms_norm.weight``. Either name in a folder whose config does not declare them means per-projection norms
# that a stock loader would drop.
_PROJ_NORM_RE = re.compile(r"^(?:model\.)?(.*\.(?:q|k|v|o|gate|up|down)_proj)\.(?:rms_)?norm\.weight$")
_PREFIX = "model."
# Marks a model built from this format (``model.st_bitnet_checkpoint_format``), e.g. for the pooling it needs.
CHECKPOINT_FORMAT = "bitnet-embedding"


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.exists() else []


def _tensor_dtypes(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype string (``"BF16"``, ``"U8"``...), read from the headers only."""
    dtypes = {}
    for f in _safetensors_files(folder):
        try:
            handle = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {err}") from err
        with handle:
            for name in handle.keys():
                dtypes[name] = handle.get_slice(name).get_dtype()
    return dtypes


def projection_norm_layout(folder: str | Path) -> str | None:
    """How a folder's per-projection norms must be loaded.

    Returns:
        ``"bitnet-embedding"`` when the folder is Microsoft's format (a plain config, float projection weights and
        ``<proj>.norm.weight`` / ``<proj>.rms_norm.weight`` tensors): only :func:`load_microsoft_model` reads it
        right. ``None`` when the folder has no per-projection norms, is st_bitnet's ``bitembed`` type, or declares
        its norms in a ``bitnet`` quantization_config (stock loading reads those).

    Raises:
        ValueError: the folder holds per-projection norms that its config contradicts (a stock loader would
            silently drop them or leave packed weights unquantized).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists() or not _safetensors_files(folder):
        return None
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "bitembed":
        return None
    dtypes = _tensor_dtypes(folder)
    norms = sorted(n for n in dtypes if _PROJ_NORM_RE.match(n))
    if not norms:
        return None
    quantization = config.get("quantization_config")
    if quantization is not None:
        declared = quantization.get("quant_method") == "bitnet" and quantization.get("use_rms_norm")
        if declared and all(n.endswith(".rms_norm.weight") for n in norms):
            return None
        raise ValueError(
            f"{folder} holds per-projection norm tensors ({norms[0]}, ...) that its quantization_config "
            f"({quantization.get('quant_method')!r}, use_rms_norm={quantization.get('use_rms_norm')!r}) does not "
            "declare: loading it would drop them and give wrong embeddings. Fix config.json, or load the folder "
            "with st_bitnet.load(path) if it is Microsoft's bitnet-embedding format (then remove quantization_config)."
        )
    weights = [dtypes.get(m.group(1) + ".weight") or dtypes.get(_PREFIX + m.group(1) + ".weight")
               for n in norms if (m := _PROJ_NORM_RE.match(n))]
    if "U8" in weights:
        raise ValueError(
            f"{folder} holds packed ternary projections (uint8) and per-projection norms but its config.json has no "
            "quantization_config: the config does not belong to these weights (re-save the model with "
            "st_bitnet.save_pretrained, or restore the config written with it)."
        )
    return CHECKPOINT_FORMAT


def is_microsoft_format(folder: str | Path) -> bool:
    """A plain qwen3/gemma3 folder whose safetensors hold ``*_proj.norm.weight`` per-projection norms.

    Raises ValueError like :func:`projection_norm_layout` (unreadable safetensors, contradicted norms).
    """
    return projection_norm_layout(folder) == CHECKPOINT_FORMAT


def load_microsoft_model(
    folder: str | Path, *, dtype: torch.dtype = torch.float32, bidirectional: bool | None = None, config=None
):
    """Build the packed W1.58A8 transformers model from a Microsoft bitnet-embedding folder.

    With st_bitnet imported, ``AutoModel.from_pretrained(folder)`` (and so ``SentenceTransformer(folder)``) comes
    here too (:mod:`st_bitnet.load_guard`).

    Args:
        folder: local folder with ``config.json`` and safetensors.
        dtype: dtype of the full-precision parts (embeddings, norms); float32 keeps the integer products exact.
        bidirectional: attention direction; ``None`` keeps the architecture's (causal for both released models).
        config: the folder's transformers config when already loaded (default: read from ``folder``).

    Returns:
        The backbone (``Qwen3Model``, ``Gemma3TextModel``...; wrapped in ``BitEmbedModel`` when only some
        projections carry norms) with packed BitLinear projections, in eval mode.
    """
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    files = _safetensors_files(folder)
    if not files:
        raise FileNotFoundError(f"no model.safetensors (or index) in {folder}: only safetensors checkpoints are loaded")
    config = config if config is not None else AutoConfig.from_pretrained(str(folder))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                state[name] = handle.get_tensor(name)
    normed = {m.group(1) for n in state if (m := _PROJ_NORM_RE.match(n))}
    if not normed:
        raise ValueError(f"{folder} has no '<proj>.norm.weight' tensors: not Microsoft's bitnet-embedding format")

    model = AutoModel.from_config(config, dtype=dtype)
    all_projections = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(r"_proj$", n)
    }
    placement = "per_projection" if normed >= all_projections else "subln"
    model = convert(
        model,
        BitNetConversionConfig(norm=placement, bidirectional=bidirectional, rms_norm_eps=getattr(config, "rms_norm_eps", None)),
    )
    target = model.model if isinstance(model, BitEmbedModel) else model

    remapped = {}
    for name, tensor in state.items():
        key = name[len(_PREFIX):] if name.startswith(_PREFIX) and not name.startswith("model.model.") else name
        match = _PROJ_NORM_RE.match(name)
        if match:
            key = match.group(1) + ".rms_norm.weight"
        remapped[key] = tensor
    expected = set(target.state_dict().keys())
    extra = sorted(k for k in remapped if k not in expected and not k.startswith("lm_head."))
    missing = sorted(k for k in expected if k not in remapped and not k.endswith("rotary_emb.inv_freq"))
    if extra or missing:
        raise ValueError(
            f"checkpoint does not match the {config.model_type} architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    target.load_state_dict({k: v for k, v in remapped.items() if k in expected}, strict=False)
    for module in target.modules():
        if isinstance(module, BitLinear) and not module.is_packed:
            module.weight.data = module.weight.data.to(dtype)
    pack(model)
    model.eval()
    model.st_bitnet_checkpoint_format = CHECKPOINT_FORMAT
    return model


def load_microsoft_sentence_transformer(folder: str | Path, *, device: str | None = None, **st_kwargs):
    """Microsoft's folder as a SentenceTransformer (last-token pooling + L2 normalization, as they document).

    The transformers model loads once, straight into W1.58A8 (st_bitnet's from_pretrained guard routes the folder
    to :func:`load_microsoft_model`), so no stock load report lists the norms as unexpected.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    folder = Path(folder)
    if (folder / "modules.json").exists():
        st_model = SentenceTransformer(str(folder), device=device, **st_kwargs)
    else:
        transformer = Transformer(str(folder))
        modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken"), Normalize()]
        st_model = SentenceTransformer(modules=modules, device=device, **st_kwargs)
    models = [m.model for m in transformer_modules(st_model)]
    if not models or getattr(models[0], "st_bitnet_checkpoint_format", None) != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{folder} did not load through st_bitnet's bitnet-embedding reader (is st_bitnet's "
                           "from_pretrained guard disabled?)")
    return st_model
