"""Microsoft's bitnet-embedding checkpoint format (bitnet-embedding-0.6b / -270m).

Their repos hold a plain ``qwen3`` / ``gemma3_text`` config, latent (bf16) projection weights that are
quantized at load (absmean ternary weights, per-token absmax int8 activations), and one RMSNorm per
projection named ``<proj>.norm.weight``. Stock transformers would load them as a plain full-precision model
and silently drop those norms, so st_bitnet reads them itself and packs them to W1.58A8.

Assumption (documented, not checkable offline): the per-projection norms use the plain ``weight * x / rms(x)``
form (transformers' LlamaRMSNorm, as in its bitnet integration), also inside Gemma3 models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .bitlinear import BitLinear
from .config import BitNetConversionConfig
from .convert import convert, pack
from .introspection import transformer_modules
from .modeling_bitembed import BitEmbedModel

_PROJ_NORM_RE = re.compile(r"^(?:model\.)?(.*\.(?:q|k|v|o|gate|up|down)_proj)\.norm\.weight$")
_PREFIX = "model."


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.exists() else []


def _tensor_names(folder: Path) -> list[str]:
    names = []
    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            names.extend(handle.keys())
    return names


def is_microsoft_format(folder: str | Path) -> bool:
    """A plain qwen3/gemma3 folder whose safetensors hold ``*_proj.norm.weight`` per-projection norms."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.exists():
        return False
    cfg = json.loads(config.read_text())
    if cfg.get("model_type") == "bitembed" or "quantization_config" in cfg:
        return False
    return any(_PROJ_NORM_RE.match(n) for n in _tensor_names(folder))


def load_microsoft_model(folder: str | Path, *, dtype: torch.dtype = torch.float32, bidirectional: bool | None = None):
    """Build the packed W1.58A8 transformers model from a Microsoft bitnet-embedding folder.

    Args:
        folder: local folder with ``config.json`` and safetensors.
        dtype: dtype of the full-precision parts (embeddings, norms); float32 keeps the integer products exact.
        bidirectional: attention direction; ``None`` keeps the architecture's (causal for both released models).
    """
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    files = _safetensors_files(folder)
    if not files:
        raise FileNotFoundError(f"no model.safetensors (or index) in {folder}: only safetensors checkpoints are loaded")
    config = AutoConfig.from_pretrained(str(folder))
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
    return model


def load_microsoft_sentence_transformer(folder: str | Path, *, device: str | None = None, **st_kwargs):
    """Microsoft's folder as a SentenceTransformer (last-token pooling + L2 normalization, as they document)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    folder = Path(folder)
    if (folder / "modules.json").exists():
        st_model = SentenceTransformer(str(folder), device=device, **st_kwargs)
        transformer_modules(st_model)[0].model = load_microsoft_model(folder)
        return st_model.to(st_model.device)
    transformer = Transformer(str(folder))
    transformer.model = load_microsoft_model(folder)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken"), Normalize()]
    return SentenceTransformer(modules=modules, device=device, **st_kwargs)
