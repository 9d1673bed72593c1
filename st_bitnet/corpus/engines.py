"""Encoding engines on one machine: a single process, or sentence-transformers' multi-process pool.

Every engine encodes the same *batch plan* (:func:`batch_plan`: a shard's rows sorted by text length, cut into
``batch_size`` batches) one batch per forward pass, and quantizes with the run's single quantizer
(:func:`quantize_columns`). The batches, and so the padding every row sees, are the same whatever engine or
worker runs them, which is what makes the codes of every engine identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..multi_precision import MultiPrecisionQuantizer

# (shard index, ids, texts) in; (shard index, ids, {bits: array}, quantizer digest) out.
ShardInput = tuple[int, list[str], list[str]]
ShardOutput = tuple[int, list[str], dict[int, np.ndarray], str]


def batch_plan(texts: list[str], batch_size: int) -> list[np.ndarray]:
    """Row positions of each batch: longest texts first (less padding), ties in row order, ``batch_size`` each."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = np.argsort(-np.array([len(t) for t in texts], dtype=np.int64), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def quantize_columns(embeddings: np.ndarray, quantizer: MultiPrecisionQuantizer | None, bits: list[int]) -> dict[int, np.ndarray]:
    """``{bits: packed codes (uint8) or float16 values}`` of float32 embeddings, with the run's quantizer."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    columns = {}
    for width in bits:
        if width == 16:
            columns[16] = embeddings.astype(np.float16)
        else:
            if quantizer is None:
                raise ValueError(f"{width}-bit codes need a quantizer.")
            columns[width] = quantizer.quantize(embeddings, width).codes
    return columns


def encode_planned(encode_batch, texts: list[str], batch_size: int) -> np.ndarray:
    """float32 embeddings of ``texts`` in row order, one ``encode_batch(list_of_texts)`` call per planned batch."""
    result = None
    for positions in batch_plan(texts, batch_size):
        embeddings = np.asarray(encode_batch([texts[i] for i in positions]), dtype=np.float32)
        if result is None:
            result = np.empty((len(texts), embeddings.shape[1]), dtype=np.float32)
        result[positions] = embeddings
    return result


class SingleProcessEngine:
    """``model.encode`` in this process.

    Args:
        model: A loaded ``SentenceTransformer``.
        quantizer: The run's quantizer (None when only 16 bits are stored).
        digest: Its digest (recorded with every shard).
        bits: Stored bit widths.
        batch_size: Texts per forward pass.
        encode_kwargs: Extra ``model.encode`` options (``prompt_name``, ...).
    """

    name = "single"

    def __init__(self, model, quantizer, digest: str, bits: list[int], batch_size: int, encode_kwargs: dict) -> None:
        self.model, self.quantizer, self.digest = model, quantizer, digest
        self.bits, self.batch_size, self.encode_kwargs = bits, batch_size, dict(encode_kwargs)

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 embeddings in row order (also used for calibration)."""
        return encode_planned(self._encode_batch, texts, self.batch_size)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False, **self.encode_kwargs
        )

    def encode_shards(self, shards: Iterable[ShardInput]) -> Iterator[ShardOutput]:
        for index, ids, texts in shards:
            yield index, ids, quantize_columns(self.embed(texts), self.quantizer, self.bits), self.digest

    def close(self) -> None:
        pass


class MultiProcessEngine(SingleProcessEngine):
    """sentence-transformers' multi-process pool (``start_multi_process_pool`` / ``encode(pool=...)``).

    One chunk of the pool is one planned batch, so each worker runs exactly the forward passes a single
    process would. Quantization stays in this process (the codes are a cheap function of the embeddings).

    Args:
        devices: Target devices, e.g. ``["cpu", "cpu"]`` or ``["cuda:0", "cuda:1"]``.
        (the others as :class:`SingleProcessEngine`)
    """

    name = "multiprocess"

    def __init__(self, model, quantizer, digest, bits, batch_size, encode_kwargs, devices: list[str]) -> None:
        super().__init__(model, quantizer, digest, bits, batch_size, encode_kwargs)
        if not devices:
            raise ValueError("The multi-process engine needs at least one device.")
        self.devices = list(devices)
        self.pool = None

    def embed(self, texts: list[str]) -> np.ndarray:
        if self.pool is None:
            self.pool = self.model.start_multi_process_pool(self.devices)
        plan = batch_plan(texts, self.batch_size)
        order = np.concatenate(plan)
        embeddings = self.model.encode(
            [texts[i] for i in order], pool=self.pool, batch_size=self.batch_size, chunk_size=self.batch_size,
            convert_to_numpy=True, show_progress_bar=False, **self.encode_kwargs,
        )
        result = np.empty((len(texts), embeddings.shape[1]), dtype=np.float32)
        result[order] = embeddings
        return result

    def close(self) -> None:
        if self.pool is not None:
            self.model.stop_multi_process_pool(self.pool)
            self.pool = None
