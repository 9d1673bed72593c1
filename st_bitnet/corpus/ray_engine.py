"""Encoding on many machines with Ray Data: ``from_items`` -> ``map_batches(EncoderActor, concurrency=N)``.

The driver streams the source and turns every missing shard into its planned batches (one Ray row per batch, so
the forward passes are the ones a single process would run). ``concurrency`` actors each load the model once
(from a folder or Hub id every node can read), rebuild the run's quantizer from its state, and return packed codes;
the driver writes each shard as soon as all its batches are back, and checks every batch was quantized with the
manifest's quantizer (its digest travels with the codes).

The same code runs on a local instance (``ray.init(num_cpus=2)``) or a cluster (``ray.init(address="auto")`` on
a node of the cluster, or ``RAY_ADDRESS=...``): only the ``ray.init`` call differs. Output is written by the
driver, so the output folder needs to be on the driver's disk only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..multi_precision import packed_width
from .engines import ShardInput, ShardOutput, batch_plan, quantize_columns


class EncoderActor:
    """A Ray Data actor: loads the model and the quantizer once, encodes planned batches.

    Args:
        model_path: Folder or Hub id, loaded with :func:`st_bitnet.load` (plain sentence-transformers folders too).
        load_kwargs: Extra loading options (``trust_remote_code``, ``device``...).
        quantizer_state: :func:`st_bitnet.corpus.calibration.quantizer_state` of the run's quantizer, or None.
        bits: Stored bit widths.
        batch_size: Texts per forward pass.
        encode_kwargs: Extra ``model.encode`` options.
    """

    def __init__(self, model_path, load_kwargs, quantizer_state, bits, batch_size, encode_kwargs) -> None:
        from ..sentence_transformer import load
        from .calibration import quantizer_digest, quantizer_from_state

        self.model = load(model_path, **(load_kwargs or {}))
        self.quantizer = quantizer_from_state(quantizer_state) if quantizer_state is not None else None
        self.digest = quantizer_digest(self.quantizer) if self.quantizer is not None else ""
        self.bits, self.batch_size, self.encode_kwargs = list(bits), batch_size, dict(encode_kwargs or {})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "batch": [], "digest": [], **{f"b{w}": [] for w in self.bits}}
        for shard, number, texts in zip(batch["shard"], batch["batch"], batch["texts"]):
            embeddings = self.model.encode(
                [str(t) for t in texts], batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False,
                **self.encode_kwargs,
            )
            columns = quantize_columns(embeddings, self.quantizer, self.bits)
            out["shard"].append(int(shard))
            out["batch"].append(int(number))
            out["digest"].append(self.digest)
            for width, values in columns.items():
                out[f"b{width}"].append(np.ascontiguousarray(values).tobytes())
        return out


class RayEngine:
    """Encode shards through Ray Data (see the module docstring).

    Args:
        model_path: Folder or Hub id every Ray worker can load.
        load_kwargs: Passed to :func:`st_bitnet.load` in the actors.
        quantizer_state / digest: The run's quantizer and its digest.
        bits, batch_size, encode_kwargs: As for the local engines.
        dim: Embedding dimension (to unpack the returned bytes).
        concurrency: Number of encoder actors.
        num_cpus / num_gpus: Resources per actor.
        window_rows: Rows handed to one Ray Data run (bounds the driver's and object store's memory; the actors
            are started once per window).
    """

    name = "ray"

    def __init__(self, model_path, load_kwargs, quantizer_state, digest, bits, batch_size, encode_kwargs, dim,
                 concurrency: int = 2, num_cpus: float = 1, num_gpus: float = 0, window_rows: int = 1_000_000) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError(
                "Ray is not initialized: call ray.init() (local) or ray.init(address='auto') (cluster) first."
            )
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}.")
        self.model_path, self.load_kwargs = model_path, dict(load_kwargs or {})
        self.quantizer_state, self.digest = quantizer_state, digest
        self.bits, self.batch_size, self.encode_kwargs, self.dim = list(bits), batch_size, dict(encode_kwargs), dim
        self.concurrency, self.num_cpus, self.num_gpus, self.window_rows = concurrency, num_cpus, num_gpus, window_rows

    def _decode(self, width: int, payload: bytes, rows: int) -> np.ndarray:
        if width == 16:
            return np.frombuffer(payload, dtype=np.float16).reshape(rows, self.dim)
        return np.frombuffer(payload, dtype=np.uint8).reshape(rows, packed_width(self.dim, width))

    def _run_window(self, window: list[ShardInput]) -> Iterator[ShardOutput]:
        import ray

        plans, items = {}, []
        for index, ids, texts in window:
            plans[index] = (ids, batch_plan(texts, self.batch_size))
            for number, positions in enumerate(plans[index][1]):
                items.append({"shard": index, "batch": number, "texts": [texts[i] for i in positions]})
        dataset = ray.data.from_items(items).map_batches(
            EncoderActor,
            batch_size=1,  # one Ray row is one planned batch already
            concurrency=self.concurrency,
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            fn_constructor_kwargs={
                "model_path": self.model_path, "load_kwargs": self.load_kwargs, "quantizer_state": self.quantizer_state,
                "bits": self.bits, "batch_size": self.batch_size, "encode_kwargs": self.encode_kwargs,
            },
        )
        pending: dict[int, dict[int, dict]] = {index: {} for index in plans}
        for row in dataset.iter_rows():
            index, number = int(row["shard"]), int(row["batch"])
            if row["digest"] != self.digest:
                raise RuntimeError(
                    f"A Ray worker quantized shard {index} with quantizer {row['digest'][:12]}, not the run's "
                    f"{self.digest[:12]}; refusing to write codes from a different calibration."
                )
            pending[index][number] = row
            ids, plan = plans[index]
            if len(pending[index]) == len(plan):
                columns = {}
                for width in self.bits:
                    first = self._decode(width, pending[index][0][f"b{width}"], len(plan[0]))
                    values = np.empty((len(ids),) + first.shape[1:], dtype=first.dtype)
                    for batch_number, positions in enumerate(plan):
                        values[positions] = self._decode(width, pending[index][batch_number][f"b{width}"], len(positions))
                    columns[width] = values
                del pending[index]
                yield index, ids, columns, self.digest

    def encode_shards(self, shards: Iterable[ShardInput]) -> Iterator[ShardOutput]:
        window, rows = [], 0
        for shard in shards:
            window.append(shard)
            rows += len(shard[1])
            if rows >= self.window_rows:
                yield from self._run_window(window)
                window, rows = [], 0
        if window:
            yield from self._run_window(window)

    def close(self) -> None:
        pass
