"""Capture the output hidden states of transformer blocks with forward hooks.

Hooks on the blocks themselves (``layers.N`` in Llama / Qwen / Gemma, ``encoder.layer.N`` in BERT / MiniLM)
work for any attention kernel and any wrapper that keeps the module names (a SentenceTransformer, DDP,
``torch.compile``), and need nothing from the model's ``output_hidden_states`` plumbing.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from st_bitnet.introspection import transformer_layers


def find_transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (a SentenceTransformer, a backbone, or a wrapped one) in depth order."""
    try:
        return list(transformer_layers(model))
    except LookupError as error:
        raise ValueError(str(error)) from None


def resolve_layers(layers, depth: int) -> list[int]:
    """Layer indices (negative ones count from the end; None: every block) checked against ``depth``."""
    chosen = list(range(depth)) if layers is None else [int(i) for i in layers]
    out = []
    for layer in chosen:
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise ValueError(f"layer {layer} is out of range for a model with {depth} transformer blocks")
        out.append(index)
    return out


class HiddenStateCapture:
    """Context manager recording the output hidden states of chosen blocks during the forward passes inside it.

    Args:
        model: the model (a SentenceTransformer, a transformers model, or a wrapped one) whose blocks to hook.
        layers: block indices to record (negative indices count from the end); None records every block.

    After a forward pass, :meth:`pop` returns ``{layer: (batch, seq, hidden)}`` for that pass and clears the
    buffer. Gradients flow through the recorded tensors.

    Example::

        with HiddenStateCapture(student, layers=None) as capture:
            student(features)
            states = capture.pop()
    """

    def __init__(self, model: nn.Module, layers=None):
        blocks = find_transformer_blocks(model)
        self.depth = len(blocks)
        self.layers = resolve_layers(layers, self.depth)
        self._blocks = {i: blocks[i] for i in self.layers}
        self._handles: list = []
        self._buffer: dict[int, Tensor] = {}

    def _hook(self, layer: int):
        def record(module, args, output):
            self._buffer[layer] = output[0] if isinstance(output, (tuple, list)) else output

        return record

    def __enter__(self) -> "HiddenStateCapture":
        for layer, block in self._blocks.items():
            self._handles.append(block.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pop(self) -> dict[int, Tensor]:
        missing = [i for i in self.layers if i not in self._buffer]
        if missing:
            raise RuntimeError(f"no hidden states recorded for blocks {missing}: run a forward pass inside the context")
        out, self._buffer = self._buffer, {}
        return out
