"""Safetensors-only persistence shared by the multi-precision sentence-transformers modules.

sentence-transformers' ``Module.load_torch_weights`` falls back to ``pytorch_model.bin`` (a pickle); this mixin
never does.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file

WEIGHTS_NAME = "model.safetensors"


class SafetensorsModuleIO:
    """Mixin (put it first among the bases) giving a sentence-transformers module ``save`` / ``load`` that write
    its config plus ``model.safetensors`` and read them back, locally or from the Hub.

    Subclasses check or filter the loaded tensors by overriding :meth:`load_saved_state`.
    """

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.saved_state().items()}
        if state:
            save_safetensors_file(state, os.path.join(output_path, WEIGHTS_NAME))

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs,
    ):
        hub_kwargs = {
            "subfolder": subfolder,
            "token": token,
            "cache_folder": cache_folder,
            "revision": revision,
            "local_files_only": local_files_only,
        }
        module = cls(**cls.load_config(model_name_or_path, **hub_kwargs))
        if not module.state_dict():
            return module
        weights_path = cls.load_file_path(model_name_or_path, filename=WEIGHTS_NAME, **hub_kwargs)
        if weights_path is None:
            raise FileNotFoundError(f"No {WEIGHTS_NAME} for {cls.__name__} in {model_name_or_path}/{subfolder}.")
        module.load_saved_state(load_safetensors_file(weights_path), f"{model_name_or_path}/{subfolder}")
        return module

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors written to ``model.safetensors`` (the state dict unless a subclass stores another form)."""
        return self.state_dict()

    def load_saved_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        self.load_state_dict(state, strict=True)
