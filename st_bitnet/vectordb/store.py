"""The engine-independent half of a vector database of multi-precision codes.

A :class:`CodeStore` keeps, per document, its id, its 1-bit code (searched natively by the database with Hamming
distance) and a rescoring payload (8-bit codes or float16 values) returned with every candidate. A search asks the
database for ``top_k * rescore_multiplier`` Hamming candidates per query and rescores them here, in numpy, with
the exact code-space cosine of the payload (:func:`st_bitnet.multi_precision.similarity`), the same score
:class:`~st_bitnet.multi_precision.MultiPrecisionIndex` uses. An engine adapter (one file per database) implements
only storage and the first stage: :meth:`_create`, :meth:`_append`, :meth:`_first_stage`, :meth:`_info`,
:meth:`__len__` and :meth:`disk_bytes`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

from ..multi_precision import PRECISION_NAMES, QuantizedEmbeddings, packed_width, resolve_bits, similarity
from ..multi_precision.quantized_embeddings import as_quantized

# Candidates of one query, best first: (row numbers, document ids, raw payload rows, Hamming distances).
Candidates = tuple[np.ndarray, list[str], np.ndarray, np.ndarray]


class CodeStore(ABC):
    """A 1-bit first stage in a database plus exact rescoring from a stored payload.

    Subclasses open or create their table in ``__init__`` and call :meth:`_set_info` with what :meth:`_info`
    returns for an existing table.

    Args (of every adapter):
        rescore_precision: ``"8bit"`` (default), ``"4bit"``, ``"2bit"`` or ``"16bit"`` payload.
        dim: Embedding dimension (needed when the table is created).
        calibration_sha256: The digest of the quantizer that made the codes (an encoding run's manifest records
            it); queries must be encoded with the same quantizer, and :meth:`search` cannot check that, so it is
            stored for the caller to compare.
    """

    engine = "abstract"

    def _set_info(self, rescore_bits: int, dim: int, calibration_sha256: str) -> None:
        rescore_bits = resolve_bits(rescore_bits)
        if rescore_bits == 1:
            raise ValueError("The rescoring payload must be wider than the 1-bit first stage.")
        self.rescore_bits, self.dim, self.calibration_sha256 = rescore_bits, int(dim), calibration_sha256

    @property
    def info(self) -> dict:
        """What the table records about its codes."""
        return {"rescore_bits": self.rescore_bits, "dim": self.dim, "calibration_sha256": self.calibration_sha256}

    @property
    def payload_width(self) -> int:
        """Bytes of the rescoring payload per vector."""
        return 2 * self.dim if self.rescore_bits == 16 else packed_width(self.dim, self.rescore_bits)

    # ---- adapter hooks -------------------------------------------------------------------------------------------
    @abstractmethod
    def _append(self, rows: np.ndarray, ids: list[str], first_stage: np.ndarray, payload: np.ndarray) -> None:
        """Store rows: ``first_stage`` ``(n, dim/8)`` packed signs, ``payload`` ``(n, payload_width)`` bytes."""

    @abstractmethod
    def _first_stage(self, queries: np.ndarray, k: int) -> list[Candidates]:
        """The ``k`` nearest rows by Hamming distance of each packed 1-bit query, with ids, payloads, distances."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def disk_bytes(self) -> int:
        """Bytes the table takes on disk (codes, payload, ids and the database's own overhead)."""

    # ---- writing -------------------------------------------------------------------------------------------------
    def add(self, ids: list[str], first_stage: QuantizedEmbeddings, rescore: QuantizedEmbeddings) -> None:
        """Append documents.

        Args:
            ids: Document ids.
            first_stage: Their 1-bit codes.
            rescore: Their codes at the store's rescoring precision.

        Raises:
            ValueError / TypeError: Wrong precision, dimension or lengths.
        """
        first_stage, rescore = as_quantized(first_stage, "first_stage"), as_quantized(rescore, "rescore")
        if first_stage.bits != 1:
            raise ValueError(f"first_stage must be 1-bit codes, got {first_stage.precision}.")
        if rescore.bits != self.rescore_bits:
            raise ValueError(f"This store rescores with {PRECISION_NAMES[self.rescore_bits]}, got {rescore.precision} codes.")
        if first_stage.dim != self.dim or rescore.dim != self.dim:
            raise ValueError(f"Codes of dimension {first_stage.dim}/{rescore.dim} for a store of dimension {self.dim}.")
        if not len(ids) == len(first_stage) == len(rescore):
            raise ValueError(f"{len(ids)} ids, {len(first_stage)} 1-bit codes and {len(rescore)} rescoring codes.")
        if not len(ids):
            return
        payload = rescore.codes.view(np.uint8).reshape(len(rescore), -1)
        rows = np.arange(len(self), len(self) + len(ids), dtype=np.int64)
        self._append(rows, [str(i) for i in ids], first_stage.codes, payload)

    def add_corpus(self, output_dir, batch_rows: int = 100_000) -> int:
        """Load a finished :func:`st_bitnet.corpus.encode_corpus` run (shard by shard); returns rows added.

        Raises:
            ValueError: If the run lacks ``1bit`` or the rescoring precision, or was made with another quantizer
                than the one this store records.
        """
        from pathlib import Path

        from ..corpus import read_manifest, read_shard
        from ..corpus.shards import SHARD_DIR

        manifest = read_manifest(output_dir)
        if manifest["status"] != "complete":
            raise ValueError(f"The encoding run in {output_dir} is not complete.")
        for needed in (1, self.rescore_bits):
            if needed not in manifest["bits"]:
                raise ValueError(f"{output_dir} stores {manifest['precisions']}; the store needs {PRECISION_NAMES[needed]}.")
        digest = manifest["calibration"]["sha256"]
        if self.calibration_sha256 and digest != self.calibration_sha256:
            raise ValueError(
                f"{output_dir} was quantized with {digest[:12]}, this store holds codes of {self.calibration_sha256[:12]}: "
                "their scores are not comparable."
            )
        self.calibration_sha256 = self.calibration_sha256 or digest
        added = 0
        for record in manifest["shards"]:
            path = Path(output_dir) / SHARD_DIR / record["file"]
            ids, first = read_shard(path, 1, self.dim)
            _, payload = read_shard(path, self.rescore_bits, self.dim)
            self.add(ids, QuantizedEmbeddings(first, 1, self.dim), QuantizedEmbeddings(payload, self.rescore_bits, self.dim))
            added += len(ids)
        return added

    # ---- searching -----------------------------------------------------------------------------------------------
    def _payload_codes(self, payload: np.ndarray) -> QuantizedEmbeddings:
        payload = np.ascontiguousarray(payload, dtype=np.uint8)
        if self.rescore_bits == 16:
            return QuantizedEmbeddings(payload.view(np.float16).reshape(len(payload), self.dim), 16, self.dim)
        return QuantizedEmbeddings(payload, self.rescore_bits, self.dim)

    def search(
        self,
        queries: QuantizedEmbeddings,
        top_k: int = 10,
        rescore_multiplier: int = 4,
        first_stage_queries: QuantizedEmbeddings | None = None,
        rescore: bool = True,
    ) -> tuple[list[list[dict]], dict[str, float]]:
        """1-bit Hamming candidates from the database, then exact rescoring with the stored payload.

        Args:
            queries: Queries at the store's rescoring precision.
            top_k: Results per query.
            rescore_multiplier: ``top_k * rescore_multiplier`` candidates are rescored.
            first_stage_queries: The queries' 1-bit codes when they cannot be derived from ``queries`` (16-bit
                payloads, or post-hoc codes whose 1-bit sign is not nested in the 8-bit code).
            rescore: False returns the database's Hamming ranking (score = ``-distance``).

        Returns:
            ``(results, timings)``: ``results[i]`` is ``[{"corpus_id": row, "id": doc id, "score"}, ...]`` best first;
            ``timings`` holds ``first_stage_s`` and ``rescore_s``.
        """
        queries = as_quantized(queries, "queries")
        if queries.bits != self.rescore_bits or queries.dim != self.dim:
            raise ValueError(
                f"Queries are {queries.precision} x {queries.dim}, the store rescores {PRECISION_NAMES[self.rescore_bits]} "
                f"x {self.dim}: encode the queries with precision={PRECISION_NAMES[self.rescore_bits]!r}."
            )
        if top_k < 1 or rescore_multiplier < 1:
            raise ValueError("top_k and rescore_multiplier must be >= 1.")
        if first_stage_queries is None:
            if queries.bits == 16:
                raise ValueError("16-bit queries need first_stage_queries (their 1-bit codes).")
            first_stage_queries = queries.to_bits(1)
        first_stage_queries = as_quantized(first_stage_queries, "first_stage_queries")
        if first_stage_queries.bits != 1 or len(first_stage_queries) != len(queries):
            raise ValueError(f"first_stage_queries must be {len(queries)} 1-bit codes.")
        start = time.perf_counter()
        candidates = self._first_stage(first_stage_queries.codes, top_k * rescore_multiplier if rescore else top_k)
        first_stage_s = time.perf_counter() - start
        start = time.perf_counter()
        results = []
        for row, (rows, ids, payload, distances) in enumerate(candidates):
            if not rescore or not len(rows):
                results.append([{"corpus_id": int(r), "id": i, "score": -float(d)} for r, i, d in zip(rows, ids, distances)])
                continue
            scores = similarity(queries[row], self._payload_codes(payload))[0]
            order = np.argsort(-scores, kind="stable")[:top_k]  # ties keep the first stage's order
            results.append([{"corpus_id": int(rows[j]), "id": ids[j], "score": float(scores[j])} for j in order])
        return results, {"first_stage_s": first_stage_s, "rescore_s": time.perf_counter() - start}

    def bytes_per_vector(self) -> float:
        """Disk bytes per stored vector, everything included (0 for an empty store)."""
        return self.disk_bytes() / len(self) if len(self) else 0.0
