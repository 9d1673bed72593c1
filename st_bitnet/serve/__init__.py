"""An OpenAI-compatible embeddings server for any SentenceTransformer (BitNet or not).

- :func:`create_app`: the FastAPI app (``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``).
- :class:`ServeLimits`: request-size bounds and the dynamic-batching settings.
- :class:`DynamicBatcher`: gathers concurrent requests into one ``model.encode`` call.
- :class:`OutputCodec`: the served precisions (float32, float16, int8, binary, 8/4/2/1-bit codes), calibrated once.

Run it with ``st-bitnet serve MODEL`` (needs ``pip install "st_bitnet[serve]"``); see ``docs/serve.md``.
Importing this package does not import FastAPI: the names above load on first access.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "create_app": "app",
    "ServeLimits": "limits",
    "DynamicBatcher": "batcher",
    "ServerOverloaded": "batcher",
    "OutputCodec": "codec",
    "SERVED_PRECISIONS": "codec",
    "DEFAULT_CALIBRATION_TEXTS": "calibration",
    "read_calibration_texts": "calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
