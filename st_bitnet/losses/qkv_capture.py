"""Capture the query/key/value projection outputs of chosen attention layers with forward hooks.

The attention-relation loss needs Q, K and V per layer. Reading them from the q/k/v linear layers keeps
the loss independent of the attention kernel: SDPA and flash attention never materialise attention
probabilities, and nothing here asks them to.
"""

from __future__ import annotations

import re

import torch.nn as nn
from torch import Tensor

from st_bitnet.introspection import unwrap

# layer index, then the projection: Llama/Qwen/Gemma/Mistral ``layers.N.self_attn.{q,k,v}_proj``,
# BERT/RoBERTa/MiniLM ``layer.N.attention.self.{query,key,value}``, a few other common spellings.
_PROJECTION_RE = re.compile(
    r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\."
    r"(?:self_attn|attn|attention\.self|self_attention|attention)\."
    r"(q_proj|k_proj|v_proj|query|key|value|q|k|v)$"
)
_KIND = {"q_proj": "query", "query": "query", "q": "query",
         "k_proj": "key", "key": "key", "k": "key",
         "v_proj": "value", "value": "value", "v": "value"}  # fmt: skip
RELATIONS = ("query", "key", "value")


def find_qkv_projections(model: nn.Module) -> dict[int, dict[str, nn.Module]]:
    """``{layer_index: {"query": module, "key": module, "value": module}}`` for every attention layer."""
    found: dict[int, dict[str, nn.Module]] = {}
    for name, module in unwrap(model).named_modules():
        match = _PROJECTION_RE.search(name)
        if match:
            found.setdefault(int(match.group(1)), {})[_KIND[match.group(2)]] = module
    incomplete = [i for i, kinds in found.items() if set(kinds) != set(RELATIONS)]
    if not found or incomplete:
        raise ValueError(
            f"could not find separate query/key/value projections in {type(unwrap(model)).__name__} "
            "(looked for layers.N.self_attn.{q,k,v}_proj and layer.N.attention.self.{query,key,value}). "
            "Fused QKV projections are not supported by the attention-relation loss."
        )
    return dict(sorted(found.items()))


def num_attention_layers(model: nn.Module) -> int:
    return len(find_qkv_projections(model))


class QKVCapture:
    """Context manager recording Q/K/V projection outputs of ``layers`` during the forward passes inside it.

    Args:
        model: the model (or a SentenceTransformer, or a DDP-wrapped one) whose projections to hook.
        layers: the layer indices to record (negative indices count from the end).

    After each forward pass, :meth:`pop` returns ``{layer: {"query": (B, L, Dq), "key": (B, L, Dk),
    "value": (B, L, Dv)}}`` for that pass and clears the buffer. Gradients flow through the recorded
    tensors, so a loss on them trains the projections.

    Example::

        with QKVCapture(student, layers=[-1]) as capture:
            student(features)
            projections = capture.pop()
    """

    def __init__(self, model: nn.Module, layers: list[int]):
        projections = find_qkv_projections(model)
        depth = len(projections)
        self.layers = []
        for layer in layers:
            index = layer + depth if layer < 0 else layer
            if not 0 <= index < depth or index not in projections:
                raise ValueError(f"layer {layer} is out of range for a model with {depth} attention layers")
            self.layers.append(index)
        self._modules = {i: projections[i] for i in self.layers}
        self._handles: list = []
        self._buffer: dict[int, dict[str, Tensor]] = {}

    def _hook(self, layer: int, kind: str):
        def record(module, args, output):
            self._buffer.setdefault(layer, {})[kind] = output[0] if isinstance(output, tuple) else output

        return record

    def __enter__(self) -> "QKVCapture":
        for layer, kinds in self._modules.items():
            for kind, module in kinds.items():
                self._handles.append(module.register_forward_hook(self._hook(layer, kind)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pop(self) -> dict[int, dict[str, Tensor]]:
        missing = [i for i in self.layers if set(self._buffer.get(i, {})) != set(RELATIONS)]
        if missing:
            raise RuntimeError(f"no query/key/value recorded for layers {missing}: run a forward pass inside the context")
        out, self._buffer = self._buffer, {}
        return out
