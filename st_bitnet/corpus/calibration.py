"""One output quantizer per corpus: chosen or calibrated once, stored next to the shards, hashed.

Post-hoc ranges measured per batch (what ``encode(..., precision="8bit")`` does without a trained quantizer)
would give every shard and every worker different codes for the same text, and scores across shards would no
longer be comparable. An encoding run therefore fixes its quantizer before the first shard, writes it to
``<output>/calibration/`` (safetensors, no pickle) and records its digest in the manifest; every engine quantizes
with exactly that state and the driver checks the digest of what each worker used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..multi_precision import MultiPrecisionQuantizer, find_quantizer, posthoc_quantizer

CALIBRATION_DIR = "calibration"


def quantizer_state(quantizer: MultiPrecisionQuantizer) -> dict:
    """The quantizer as plain data (its config and saved tensors as numpy): what workers rebuild it from."""
    config = {key: getattr(quantizer, key) for key in quantizer.config_keys}
    config["precisions"] = list(config["precisions"])
    tensors = {name: tensor.detach().cpu().numpy().copy() for name, tensor in quantizer.saved_state().items()}
    return {"config": config, "tensors": tensors}


def quantizer_from_state(state: dict) -> MultiPrecisionQuantizer:
    """Inverse of :func:`quantizer_state`."""
    quantizer = MultiPrecisionQuantizer(**state["config"])
    quantizer.load_saved_state({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state["tensors"].items()}, "state")
    return quantizer.eval()


def quantizer_digest(quantizer: MultiPrecisionQuantizer) -> str:
    """sha256 of the quantizer's config and tensors (equal digests mean equal codes for equal embeddings)."""
    state = quantizer_state(quantizer)
    digest = hashlib.sha256(json.dumps(state["config"], sort_keys=True).encode())
    for name in sorted(state["tensors"]):
        array = np.ascontiguousarray(state["tensors"][name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def resolve_quantizer(model, quantizer: MultiPrecisionQuantizer | None, calibration_embeddings) -> tuple:
    """Pick the corpus quantizer: an explicit one, the model's trained one, or post-hoc ranges.

    Args:
        model: The SentenceTransformer (or None if only a path is known; then no trained quantizer is found).
        quantizer: An explicit quantizer, used as it is.
        calibration_embeddings: A callable returning float embeddings of calibration texts, called only when a
            post-hoc quantizer is needed.

    Returns:
        ``(quantizer, kind)``; ``kind`` is ``"given"``, ``"trained"`` or ``"posthoc"``.
    """
    if quantizer is not None:
        return quantizer, "given"
    trained = find_quantizer(model) if model is not None else None
    if trained is not None:
        return trained, "trained"
    return posthoc_quantizer(calibration_embeddings()), "posthoc"


def save_calibration(quantizer: MultiPrecisionQuantizer, output_dir: str | Path) -> Path:
    """Write the quantizer to ``<output_dir>/calibration/`` (config + ``model.safetensors``)."""
    folder = Path(output_dir) / CALIBRATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    quantizer.save(str(folder))
    return folder


def load_calibration(output_dir: str | Path, expected_digest: str) -> MultiPrecisionQuantizer:
    """Read the stored quantizer back and check it is the one the manifest recorded.

    Raises:
        FileNotFoundError: If the folder is missing.
        ValueError: If its digest differs from ``expected_digest`` (the file was changed or replaced).
    """
    folder = Path(output_dir) / CALIBRATION_DIR
    if not folder.exists():
        raise FileNotFoundError(f"{folder} is missing: the manifest names a calibration that is not on disk.")
    quantizer = MultiPrecisionQuantizer.load(str(folder)).eval()
    digest = quantizer_digest(quantizer)
    if digest != expected_digest:
        raise ValueError(
            f"The quantizer in {folder} (sha256 {digest[:12]}) is not the one recorded in the manifest "
            f"({expected_digest[:12]}); the shards already written were quantized with the recorded one."
        )
    return quantizer


def calibration_rows(count: int, size: int) -> list[int]:
    """``size`` row numbers spread evenly over ``count`` rows (all rows when the corpus is smaller)."""
    if count <= size:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, size)})
