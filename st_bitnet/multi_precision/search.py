"""Two-stage search over multi-precision codes: a 1-bit (or 2-bit) first stage, then exact 8/16-bit rescoring."""

from __future__ import annotations

import json
import os
import time
from typing import Literal

import numpy as np

from .packing import centered_codes
from .precision import PRECISION_NAMES, resolve_bits
from .quantized_embeddings import QuantizedEmbeddings, as_quantized, similarity

Backend = Literal["faiss", "usearch", "numpy"]
BACKENDS = ("faiss", "usearch", "numpy")
INDEX_CONFIG = "multi_precision_index.json"
QUANTIZER_FOLDER = "quantizer"


class MultiPrecisionIndex:
    """A corpus index: low-bit codes for candidate generation, wider codes for exact rescoring.

    The first stage ranks the whole corpus by Hamming distance (1 bit; FAISS ``IndexBinaryFlat`` /
    ``IndexBinaryHNSW``, usearch ``b1`` or numpy popcount) or by the integer dot of 2-bit codes (numpy). The
    ``top_k * rescore_multiplier`` candidates are then rescored with the code-space cosine of the rescoring store
    (8-bit integer dot or 16-bit float), which is exact for that precision.

    With an 8-bit store from a trained (nested) quantizer the first-stage codes are the top bits of the stored
    codes, so only one index is kept; a 16-bit store needs its first-stage codes passed explicitly.

    Queries must be quantized with the corpus' ranges. A model with a trained :class:`MultiPrecisionQuantizer`
    always uses its own; for a model without one, build the index with :meth:`from_model` (post-hoc ranges
    measured once, on the corpus) and encode queries with :meth:`encode_queries` (the same ranges). Codes carry a
    fingerprint of their ranges, and :meth:`search` refuses queries quantized with other ranges (e.g. calibrated on
    the query batch itself), which would silently change every score.

    Args:
        corpus: The rescoring store: 8-bit (or 16-bit, 4-bit) :class:`QuantizedEmbeddings`.
        first_stage_bits: 1 or 2.
        first_stage: The corpus' first-stage codes if they cannot be derived from ``corpus`` (16-bit stores, or
            post-hoc 1-bit signs that are not nested in post-hoc 8-bit codes).
        backend: ``"faiss"``, ``"usearch"`` or ``"numpy"`` for the 1-bit stage (2 bits always uses numpy).
        exact: Exhaustive search (True) or an approximate HNSW graph (False; faiss / usearch).
        quantizer: The quantizer that produced the corpus codes (kept for :meth:`encode_queries` and saved).

    Example:
        ::

            from st_bitnet.multi_precision import MultiPrecisionIndex

            index = MultiPrecisionIndex.from_model(model, documents, precision="8bit", first_stage_bits=1)
            results, seconds = index.search(index.encode_queries(model, queries), top_k=10)
            index.save("scifact_index")
            index = MultiPrecisionIndex.load("scifact_index")
    """

    def __init__(
        self,
        corpus: QuantizedEmbeddings,
        first_stage_bits: int | str = 1,
        first_stage: QuantizedEmbeddings | None = None,
        backend: Backend = "faiss",
        exact: bool = True,
        quantizer=None,
    ) -> None:
        corpus = as_quantized(corpus, "corpus")
        first_stage_bits = resolve_bits(first_stage_bits)
        if first_stage_bits not in (1, 2):
            raise ValueError(f"first_stage_bits must be 1 or 2, got {first_stage_bits}.")
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS}.")
        if first_stage is None:
            if corpus.bits == 16:
                raise ValueError(
                    "A 16-bit store has no nested codes: pass first_stage=encode(model, documents, precision='1bit')."
                )
            first_stage = corpus.to_bits(first_stage_bits)
        first_stage = as_quantized(first_stage, "first_stage")
        if first_stage.bits != first_stage_bits:
            raise ValueError(f"first_stage holds {first_stage.precision} codes, expected {PRECISION_NAMES[first_stage_bits]}.")
        if len(first_stage) != len(corpus) or first_stage.dim != corpus.dim:
            raise ValueError(
                f"first_stage ({len(first_stage)} x {first_stage.dim}) must match the corpus ({len(corpus)} x {corpus.dim})."
            )
        if corpus.bits <= first_stage_bits:
            raise ValueError(f"The rescoring store ({corpus.precision}) must be wider than the first stage.")
        if quantizer is not None and corpus.bits != 16 and corpus.calibration not in (None, quantizer.fingerprint()):
            raise ValueError("the corpus codes were not quantized by the given quantizer (their range fingerprints differ)")
        self.quantizer = quantizer
        self.corpus = corpus
        self.first_stage = first_stage
        self.first_stage_bits = first_stage_bits
        self.backend = backend if first_stage_bits == 1 else "numpy"
        self.exact = exact
        self._index = self._build_first_stage()

    @classmethod
    def from_model(
        cls,
        model,
        documents: list[str],
        precision: int | str = "8bit",
        first_stage_bits: int | str = 1,
        backend: Backend = "faiss",
        exact: bool = True,
        **encode_kwargs,
    ) -> MultiPrecisionIndex:
        """Encode ``documents`` and index them with one calibration: the model's trained quantizer, or post-hoc
        ranges measured on these documents (kept as ``index.quantizer`` for :meth:`encode_queries`).

        Args:
            model: A SentenceTransformer.
            documents: The corpus texts.
            precision: The rescoring store's precision (8bit, 4bit; 16bit also encodes the first-stage codes, and its
                searches then need ``first_stage_queries=encode(model, texts, precision="1bit",
                quantizer=index.quantizer)``).
            first_stage_bits / backend / exact: As for the constructor.
            **encode_kwargs: Passed to ``model.encode`` (``batch_size``, ``prompt_name``...).
        """
        from .encode import _float_embeddings, find_quantizer, posthoc_quantizer

        quantizer = find_quantizer(model)
        if quantizer is None:
            floats = _float_embeddings(model, documents, dict(encode_kwargs), has_quantizer=False)
            quantizer = posthoc_quantizer(floats)
        else:
            floats = _float_embeddings(model, documents, dict(encode_kwargs), has_quantizer=True)
        store = quantizer.quantize(floats, precision)
        # 8/4-bit stores derive the first stage from their top bits (queries too); 16-bit stores need its codes
        first_stage = quantizer.quantize(floats, first_stage_bits) if store.bits == 16 else None
        return cls(store, first_stage_bits, first_stage=first_stage, backend=backend, exact=exact, quantizer=quantizer)

    def encode_queries(self, model, queries: list[str], **encode_kwargs) -> QuantizedEmbeddings:
        """Queries at the store's precision, quantized with the corpus' ranges (``self.quantizer``)."""
        from .encode import encode

        if self.quantizer is None:
            raise ValueError(
                "this index does not know the corpus' quantizer: build it with MultiPrecisionIndex.from_model, or pass "
                "quantizer= to the constructor"
            )
        return encode(model, queries, precision=self.corpus.precision, quantizer=self.quantizer, **encode_kwargs)

    def _check_calibration(self, name: str, queries: QuantizedEmbeddings, stored: QuantizedEmbeddings) -> None:
        if queries.bits == 16 or queries.calibration is None or stored.calibration is None:
            return  # float values, or codes from before fingerprints: nothing to compare
        if queries.calibration != stored.calibration:
            raise ValueError(
                f"{name} were quantized with other ranges than the index (fingerprint {queries.calibration} vs "
                f"{stored.calibration}): their scores would silently change. Encode them with the corpus' quantizer: "
                "index.encode_queries(model, texts), or encode(model, texts, precision=..., quantizer=index.quantizer)."
            )

    # ---- first stage ---------------------------------------------------------------------------------------------
    def _build_first_stage(self):
        if self.backend == "faiss" and self.first_stage_bits == 1:
            import faiss

            nbits = self.first_stage.codes.shape[1] * 8
            index = faiss.IndexBinaryFlat(nbits) if self.exact else faiss.IndexBinaryHNSW(nbits, 32)
            index.add(self.first_stage.codes)
            return index
        if self.backend == "usearch" and self.first_stage_bits == 1:
            from usearch.index import Index

            index = Index(ndim=self.first_stage.codes.shape[1] * 8, metric="hamming", dtype="b1")
            index.add(np.arange(len(self.first_stage)), self.first_stage.codes)
            return index
        if self.first_stage_bits == 2:
            # Centered 2-bit codes as float32: every partial sum (|m| <= 3) is an exact integer.
            return centered_codes(self.first_stage.unpacked(), 2).astype(np.float32)
        return None  # numpy popcount over self.first_stage

    def _first_stage_search(self, queries: QuantizedEmbeddings, k: int) -> np.ndarray:
        """``(n_queries, k)`` candidate ids (``-1`` pads when the corpus is smaller than ``k``)."""
        k_eff = min(k, len(self.corpus))
        if self.backend == "faiss" and self.first_stage_bits == 1:
            _, ids = self._index.search(queries.codes, k_eff)
        elif self.backend == "usearch" and self.first_stage_bits == 1:
            matches = self._index.search(queries.codes, k_eff, exact=self.exact)
            ids = np.atleast_2d(matches.keys).astype(np.int64)
            counts = np.reshape(getattr(matches, "counts", ids.shape[1]), (-1, 1))
            ids = np.where(np.arange(ids.shape[1]) < counts, ids, -1)
        else:
            if self.first_stage_bits == 1:
                scores = similarity(queries, self.first_stage, metric="dot")
            else:
                scores = centered_codes(queries.unpacked(), 2).astype(np.float32) @ self._index.T
            ids = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
            order = np.argsort(-np.take_along_axis(scores, ids, axis=1), axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)
        if ids.shape[1] < k:
            ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
        return ids

    # ---- search --------------------------------------------------------------------------------------------------
    def _rescore(self, queries: QuantizedEmbeddings, candidates: np.ndarray) -> np.ndarray:
        valid = candidates >= 0
        safe = np.where(valid, candidates, 0)
        if self.corpus.bits == 16:
            q = queries.codes.astype(np.float32)
            docs = self.corpus.codes[safe].astype(np.float32)
        else:
            q = queries.centered().astype(np.float32 if self.corpus.bits <= 4 else np.float64)
            docs = centered_codes(unpack_rows(self.corpus, safe), self.corpus.bits).astype(q.dtype)
        dots = np.einsum("qd,qkd->qk", q, docs).astype(np.float64)
        norms = np.linalg.norm(q.astype(np.float64), axis=1)[:, None] * np.linalg.norm(docs.astype(np.float64), axis=2)
        scores = dots / norms.clip(min=1e-12)
        scores[~valid] = -np.inf
        return scores

    def search(
        self,
        queries: QuantizedEmbeddings,
        top_k: int = 10,
        rescore_multiplier: int = 4,
        first_stage_queries: QuantizedEmbeddings | None = None,
        rescore: bool = True,
    ) -> tuple[list[list[dict[str, int | float]]], dict[str, float]]:
        """Search the corpus.

        Args:
            queries: Queries at the store's precision (e.g. ``encode(model, queries, precision="8bit")``).
            top_k: Results per query.
            rescore_multiplier: First-stage candidates per result (``top_k * rescore_multiplier`` are rescored).
            first_stage_queries: The queries' first-stage codes when they cannot be derived (16-bit stores).
            rescore: If False, return the first-stage ranking (scores are first-stage cosines).

        Returns:
            ``(results, timings)``: ``results[i]`` is a list of ``{"corpus_id", "score"}`` (best first, like
            sentence-transformers' ``semantic_search``); ``timings`` holds ``first_stage_s`` and ``rescore_s``.

        Raises:
            TypeError / ValueError: If queries are not :class:`QuantizedEmbeddings` at the store's precision and
                dimension (mixed precisions in one search), or ``top_k`` / ``rescore_multiplier`` < 1.
        """
        queries = as_quantized(queries, "queries")
        if queries.bits != self.corpus.bits or queries.dim != self.corpus.dim:
            raise ValueError(
                f"Queries are {queries.precision} x {queries.dim} but the index stores {self.corpus.precision} x "
                f"{self.corpus.dim}: mixed precisions in one search. Encode the queries with "
                f"precision={self.corpus.precision!r}."
            )
        if top_k < 1 or rescore_multiplier < 1:
            raise ValueError("top_k and rescore_multiplier must be >= 1.")
        self._check_calibration("queries", queries, self.corpus)
        if first_stage_queries is None:
            if queries.bits == 16:
                raise ValueError("16-bit queries need first_stage_queries (their 1-bit / 2-bit codes).")
            first_stage_queries = queries.to_bits(self.first_stage_bits)
        first_stage_queries = as_quantized(first_stage_queries, "first_stage_queries")
        if first_stage_queries.bits != self.first_stage_bits or len(first_stage_queries) != len(queries):
            raise ValueError(
                f"first_stage_queries must be {len(queries)} {PRECISION_NAMES[self.first_stage_bits]} codes, got "
                f"{len(first_stage_queries)} {first_stage_queries.precision}."
            )
        self._check_calibration("first_stage_queries", first_stage_queries, self.first_stage)
        start = time.perf_counter()
        n_candidates = top_k * rescore_multiplier if rescore else top_k
        candidates = self._first_stage_search(first_stage_queries, n_candidates)
        first_stage_s = time.perf_counter() - start
        start = time.perf_counter()
        if rescore:
            scores = self._rescore(queries, candidates)
        else:
            valid = candidates >= 0
            scores = np.full(candidates.shape, -np.inf)
            for row, (query_ids, query_valid) in enumerate(zip(candidates, valid)):
                ids = query_ids[query_valid]
                scores[row, query_valid] = similarity(first_stage_queries[row], self.first_stage[ids])[0] if len(ids) else []
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        ids = np.take_along_axis(candidates, order, axis=1)
        top_scores = np.take_along_axis(scores, order, axis=1)
        rescore_s = time.perf_counter() - start
        results = [
            [{"corpus_id": int(i), "score": float(s)} for i, s in zip(row_ids, row_scores) if i >= 0]
            for row_ids, row_scores in zip(ids, top_scores)
        ]
        return results, {"first_stage_s": first_stage_s, "rescore_s": rescore_s}

    # ---- sizes and persistence -----------------------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the first-stage codes and of the rescoring store."""
        return {"first_stage": self.first_stage.nbytes, "rescore_store": self.corpus.nbytes}

    def save(self, folder: str | os.PathLike) -> None:
        """Save the codes (safetensors) and settings (json); the FAISS / usearch structure is rebuilt on load."""
        os.makedirs(folder, exist_ok=True)
        self.corpus.save(os.path.join(folder, "rescore_store.safetensors"))
        self.first_stage.save(os.path.join(folder, "first_stage.safetensors"))
        config = {"first_stage_bits": self.first_stage_bits, "backend": self.backend, "exact": self.exact}
        if self.quantizer is not None:
            config["quantizer"] = QUANTIZER_FOLDER
            os.makedirs(os.path.join(folder, QUANTIZER_FOLDER), exist_ok=True)
            self.quantizer.save(os.path.join(folder, QUANTIZER_FOLDER))
        with open(os.path.join(folder, INDEX_CONFIG), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)

    @classmethod
    def load(cls, folder: str | os.PathLike, backend: Backend | None = None) -> MultiPrecisionIndex:
        config_path = os.path.join(folder, INDEX_CONFIG)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{folder} holds no {INDEX_CONFIG}; was it written by MultiPrecisionIndex.save?")
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        quantizer = None
        if config.get("quantizer"):
            from .quantizer import MultiPrecisionQuantizer

            quantizer = MultiPrecisionQuantizer.load(os.path.join(folder, config["quantizer"]))
        return cls(
            QuantizedEmbeddings.load(os.path.join(folder, "rescore_store.safetensors")),
            first_stage_bits=config["first_stage_bits"],
            first_stage=QuantizedEmbeddings.load(os.path.join(folder, "first_stage.safetensors")),
            backend=backend or config["backend"],
            exact=config["exact"],
            quantizer=quantizer,
        )


def unpack_rows(codes: QuantizedEmbeddings, rows: np.ndarray) -> np.ndarray:
    """Unpacked codes of ``rows`` (any shape of ids) -> ``rows.shape + (dim,)``."""
    flat = codes.codes[rows.reshape(-1)]
    unpacked = QuantizedEmbeddings(np.ascontiguousarray(flat), codes.bits, codes.dim).unpacked()
    return unpacked.reshape(*rows.shape, codes.dim)


def semantic_search_multi_precision(
    query_embeddings: QuantizedEmbeddings,
    corpus_embeddings: QuantizedEmbeddings,
    top_k: int = 10,
    first_stage_bits: int = 1,
    rescore_multiplier: int = 4,
    backend: Backend = "faiss",
    exact: bool = True,
) -> tuple[list[list[dict[str, int | float]]], float]:
    """One-call two-stage search, shaped like sentence-transformers' ``semantic_search_faiss``: ``(results, seconds)``."""
    index = MultiPrecisionIndex(corpus_embeddings, first_stage_bits=first_stage_bits, backend=backend, exact=exact)
    results, timings = index.search(query_embeddings, top_k=top_k, rescore_multiplier=rescore_multiplier)
    return results, timings["first_stage_s"] + timings["rescore_s"]
