"""Safetensors-only persistence shared by the multi-precision sentence-transformers modules.

sentence-transformers' ``Module.load_torch_weights`` falls back to ``pytorch_model.bin`` (a pickle); these
helpers never do.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file

WEIGHTS_NAME = "model.safetensors"


def save_module(module, output_path: str) -> None:
    """Write the module's config and (if it has any) its tensors as ``model.safetensors``."""
    module.save_config(output_path)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if state:
        save_safetensors_file(state, os.path.join(output_path, WEIGHTS_NAME))


def load_module(
    cls,
    model_name_or_path: str,
    subfolder: str = "",
    token: bool | str | None = None,
    cache_folder: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
):
    """``(module built from its saved config, its saved tensors or None)``, from a folder or the Hub."""
    hub_kwargs = {
        "subfolder": subfolder,
        "token": token,
        "cache_folder": cache_folder,
        "revision": revision,
        "local_files_only": local_files_only,
    }
    module = cls(**cls.load_config(model_name_or_path, **hub_kwargs))
    if not module.state_dict():
        return module, None
    weights_path = cls.load_file_path(model_name_or_path, filename=WEIGHTS_NAME, **hub_kwargs)
    if weights_path is None:
        raise FileNotFoundError(f"No {WEIGHTS_NAME} for {cls.__name__} in {model_name_or_path}/{subfolder}.")
    state: dict[str, torch.Tensor] = load_safetensors_file(weights_path)
    return module, state
