"""LanceDB adapter: 1-bit codes as ``fixed_size_list<uint8>`` vectors searched with LanceDB's native ``hamming``.

LanceDB is embedded (a folder of Lance files, no server), so the same code runs on a laptop, in CI and against
object storage (``s3://...`` URIs). The table has one row per document: ``row`` (int64 position), ``id``,
``vector`` (the packed 1-bit code, ``dim / 8`` bytes) and ``payload`` (the rescoring codes as
``fixed_size_binary``). A query returns its Hamming candidates *with* their payloads in one call, so rescoring
needs no second lookup. Without an index LanceDB scans exactly (flat Hamming); :meth:`LanceDBStore.create_index`
builds its ``IVF_FLAT`` Hamming index for large tables (approximate; ``nprobes`` trades recall for speed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .store import Candidates, CodeStore

INFO_KEY = b"st_bitnet.code_store"


class LanceDBStore(CodeStore):
    """A :class:`CodeStore` in a LanceDB table.

    Args:
        uri: LanceDB database folder (or URI).
        table: Table name.
        rescore_precision: Payload precision for a new table (``"8bit"`` default; ``"16bit"`` stores float16).
        dim: Embedding dimension for a new table.
        calibration_sha256: Digest of the quantizer of the codes (recorded in the table's schema metadata).
        nprobes: IVF partitions searched once :meth:`create_index` has run.

    Example:
        ::

            from st_bitnet.vectordb import LanceDBStore

            store = LanceDBStore("scifact.lancedb", dim=384)
            store.add_corpus("scifact_codes")          # an encode_corpus output folder (8bit + 1bit)
            results, _ = store.search(encode(model, queries, precision="8bit", quantizer=q), top_k=10)
    """

    engine = "lancedb"

    def __init__(self, uri: str | os.PathLike, table: str = "codes", rescore_precision: str | int = "8bit",
                 dim: int | None = None, calibration_sha256: str = "", nprobes: int = 20) -> None:
        import lancedb

        self.uri, self.table_name, self.nprobes = os.fspath(uri), table, nprobes
        self._db = lancedb.connect(self.uri)
        if table in self._db.list_tables().tables:
            self._table = self._db.open_table(table)
            info = json.loads((self._table.schema.metadata or {}).get(INFO_KEY, b"{}"))
            if not info:
                raise ValueError(f"Table {table!r} in {self.uri} was not written by st_bitnet (no {INFO_KEY.decode()}).")
            if dim is not None and int(dim) != info["dim"]:
                raise ValueError(f"Table {table!r} holds {info['dim']}-d codes, not {dim}-d.")
            self._set_info(info["rescore_bits"], info["dim"], info["calibration_sha256"])
            self._rows = self._table.count_rows()
        else:
            if dim is None:
                raise ValueError(f"{self.uri} has no table {table!r}; pass dim= to create it.")
            self._set_info(rescore_precision, dim, calibration_sha256)
            self._table, self._rows = None, 0

    def __len__(self) -> int:
        return self._rows

    def _arrow(self, rows, ids, first_stage, payload):
        import pyarrow as pa

        vectors = pa.FixedSizeListArray.from_arrays(pa.array(first_stage.reshape(-1), type=pa.uint8()), first_stage.shape[1])
        payloads = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(payload.shape[1]), len(payload), [None, pa.py_buffer(np.ascontiguousarray(payload).tobytes())]
        )
        table = pa.table({"row": pa.array(rows, pa.int64()), "id": pa.array(ids, pa.string()), "vector": vectors,
                          "payload": payloads})
        return table.replace_schema_metadata({INFO_KEY: json.dumps(self.info)})

    def _append(self, rows, ids, first_stage, payload) -> None:
        data = self._arrow(rows, ids, first_stage, payload)
        if self._table is None:
            self._table = self._db.create_table(self.table_name, data)
        else:
            self._table.add(data)
        self._rows += len(rows)

    def _first_stage(self, queries: np.ndarray, k: int) -> list[Candidates]:
        empty = (np.zeros(0, np.int64), [], np.zeros((0, self.payload_width), np.uint8), np.zeros(0))
        if self._table is None or not len(queries):
            return [empty for _ in range(len(queries))]
        query = self._table.search(list(queries), vector_column_name="vector").distance_type("hamming")
        if self._has_index():
            query = query.nprobes(self.nprobes)
        result = query.limit(min(k, self._rows)).select(["row", "id", "payload", "_distance"]).to_arrow()
        if len(queries) == 1 and "query_index" not in result.column_names:
            query_index = np.zeros(len(result), dtype=np.int64)
        else:
            query_index = result.column("query_index").to_numpy()
        rows, ids = result.column("row").to_numpy(), result.column("id").to_pylist()
        distances = result.column("_distance").to_numpy()
        payload_column = result.column("payload").combine_chunks()
        width = self.payload_width
        payloads = np.frombuffer(payload_column.buffers()[1], dtype=np.uint8, count=len(result) * width,
                                 offset=payload_column.offset * width).reshape(len(result), width)
        out = []
        for q in range(len(queries)):
            picked = np.flatnonzero(query_index == q)
            # Best first; equal distances by row so ties resolve like an exact scan in row order.
            picked = picked[np.lexsort((rows[picked], distances[picked]))]
            out.append((rows[picked], [ids[i] for i in picked], payloads[picked], distances[picked]))
        return out

    def _has_index(self) -> bool:
        return self._table is not None and any(idx.columns == ["vector"] for idx in self._table.list_indices())

    def create_index(self, num_partitions: int | None = None) -> None:
        """Build LanceDB's ``IVF_FLAT`` Hamming index on the 1-bit vectors (approximate first stage)."""
        if self._table is None:
            raise ValueError("The store is empty: add vectors before building an index.")
        partitions = num_partitions or max(1, int(np.sqrt(self._rows)))
        self._table.create_index(metric="hamming", vector_column_name="vector", index_type="IVF_FLAT",
                                 num_partitions=partitions)

    def disk_bytes(self) -> int:
        folder = Path(self.uri) / f"{self.table_name}.lance"
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0
