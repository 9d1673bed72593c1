"""Parquet shards of packed codes: atomic writes, verification, reading back.

A shard holds the rows ``[start, stop)`` of the source: an ``id`` column, one ``fixed_size_binary`` column of
packed codes per low precision (``codes_8bit``, ``codes_1bit``, ... laid out as
:func:`st_bitnet.multi_precision.pack_codes`), and ``float16`` (a ``fixed_size_list<halffloat>``) when 16 bits is
asked for. The schema metadata records the shard's range, the sha256 of its ids and the quantizer digest, so a
resumed run can prove a shard on disk is exactly the one it would write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..multi_precision import PRECISION_NAMES, QuantizedEmbeddings, packed_width
from .files import TEMP_SUFFIX, atomic_write_bytes, fsync_directory  # noqa: F401 (re-exported)

SHARD_DIR = "shards"
SHARD_METADATA_KEY = b"st_bitnet.shard"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def column_name(bits: int) -> str:
    """``float16`` for 16 bits, else ``codes_<n>bit``."""
    return "float16" if bits == 16 else f"codes_{PRECISION_NAMES[bits]}"


def write_shard(path: Path, ids: list[str], columns: dict[int, np.ndarray], dim: int, metadata: dict) -> None:
    """Write one shard atomically (temporary file, fsync, rename).

    Args:
        path: Final shard path.
        ids: Document ids, one per row.
        columns: ``bits -> array``: packed ``uint8`` codes ``(n, packed_width)`` or ``float16`` ``(n, dim)`` for 16.
        dim: Embedding dimension.
        metadata: JSON-serialisable shard record stored in the schema metadata.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, names = [pa.array(ids, type=pa.string())], ["id"]
    for bits in sorted(columns, reverse=True):
        values = np.ascontiguousarray(columns[bits])
        if len(values) != len(ids):
            raise ValueError(f"{len(values)} {bits}-bit rows for {len(ids)} ids.")
        if bits == 16:
            array = pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float16).reshape(-1)), dim)
        else:
            width = packed_width(dim, bits)
            array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values.tobytes())])
        arrays.append(array)
        names.append(column_name(bits))
    table = pa.Table.from_arrays(arrays, names=names).replace_schema_metadata({SHARD_METADATA_KEY: json.dumps(metadata)})
    temp = path.with_name(path.name + TEMP_SUFFIX)
    with open(temp, "wb") as handle:
        pq.write_table(table, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_directory(path.parent)


def read_shard_metadata(path: Path) -> dict:
    """The shard record written by :func:`write_shard` (raises ``ValueError`` for an unreadable / foreign file)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"{path} is not a readable Parquet file: {err}") from err
    raw = (schema.metadata or {}).get(SHARD_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not an st_bitnet corpus shard (no {SHARD_METADATA_KEY.decode()} metadata).")
    return json.loads(raw)


def read_shard(path: Path, bits: int | None = None, dim: int | None = None) -> tuple[list[str], np.ndarray | None]:
    """``(ids, values)`` of one shard; ``values`` is the packed ``uint8`` / ``float16`` array at ``bits`` (None if not asked)."""
    import pyarrow.parquet as pq

    columns = ["id"] + ([column_name(bits)] if bits is not None else [])
    table = pq.read_table(path, columns=columns)
    ids = table.column("id").to_pylist()
    if bits is None:
        return ids, None
    column = table.column(column_name(bits)).combine_chunks()
    if bits == 16:
        values = np.asarray(column.flatten(), dtype=np.float16).reshape(len(ids), dim)
    else:
        width = column.type.byte_width
        buffer = column.buffers()[1]
        values = np.frombuffer(buffer, dtype=np.uint8, count=len(ids) * width, offset=column.offset * width)
        values = values.reshape(len(ids), width).copy()
    return ids, values


def load_codes(output_dir: str | os.PathLike, precision: str | int) -> tuple[list[str], QuantizedEmbeddings]:
    """All ids and codes of a finished encoding run at one precision, in source order.

    Args:
        output_dir: The folder written by :func:`st_bitnet.corpus.encode_corpus`.
        precision: A stored precision (``"8bit"``, ``"1bit"``, ``"16bit"``, ...).

    Returns:
        ``(ids, QuantizedEmbeddings)``.

    Raises:
        ValueError: If the run is not complete or the precision was not stored.

    Example:
        ::

            from st_bitnet.corpus import load_codes

            ids, codes = load_codes("corpus_codes", "8bit")
    """
    from ..multi_precision import resolve_bits
    from .manifest import read_manifest

    manifest = read_manifest(output_dir)
    if manifest["status"] != "complete":
        raise ValueError(f"The encoding run in {output_dir} is {manifest['status']!r}, not complete; rerun it to finish.")
    bits = resolve_bits(precision)
    if bits not in manifest["bits"]:
        raise ValueError(f"{output_dir} stores {manifest['precisions']}, not {PRECISION_NAMES[bits]}.")
    dim = manifest["dim"]
    all_ids, parts = [], []
    for record in manifest["shards"]:
        ids, values = read_shard(Path(output_dir) / SHARD_DIR / record["file"], bits, dim)
        all_ids.extend(ids)
        parts.append(values)
    width = dim if bits == 16 else packed_width(dim, bits)
    dtype = np.float16 if bits == 16 else np.uint8
    values = np.concatenate(parts) if parts else np.zeros((0, width), dtype=dtype)
    return all_ids, QuantizedEmbeddings(values, bits, dim)
