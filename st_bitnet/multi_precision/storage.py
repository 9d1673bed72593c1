"""Storage report: bytes per vector and index size of every precision for N vectors."""

from __future__ import annotations

from .precision import BITS, FLOAT32_BITS, PRECISION_NAMES, bytes_per_vector, resolve_bits

__all__ = ["bytes_per_vector", "format_storage_report", "storage_report"]


def storage_report(dim: int, n_vectors: int, rescore_bits: int | None = 8) -> list[dict]:
    """One row per precision (float32 reference, then 16/8/4/2/1 bits) for an index of ``n_vectors``.

    Args:
        dim: Embedding dimension.
        n_vectors: Number of stored vectors.
        rescore_bits: If set, add rows for a 1-bit and a 2-bit first stage plus a ``rescore_bits`` rescoring store
            (both kept; with nested 8-bit codes the first stage could be derived on the fly instead).

    Returns:
        ``[{"precision", "bytes_per_vector", "index_bytes", "index_mib", "compression_vs_float32"}, ...]``.
    """
    if n_vectors < 0:
        raise ValueError(f"n_vectors must be >= 0, got {n_vectors}.")
    float_bytes = bytes_per_vector(dim, FLOAT32_BITS)
    rows = []

    def row(name: str, per_vector: int) -> dict:
        return {
            "precision": name,
            "bytes_per_vector": per_vector,
            "index_bytes": per_vector * n_vectors,
            "index_mib": round(per_vector * n_vectors / 2**20, 3),
            "compression_vs_float32": round(float_bytes / per_vector, 2),
        }

    rows.append(row("float32", float_bytes))
    for bits in BITS:
        rows.append(row(PRECISION_NAMES[bits], bytes_per_vector(dim, bits)))
    if rescore_bits is not None:
        rescore = bytes_per_vector(dim, rescore_bits)
        for first in (1, 2):
            name = f"{PRECISION_NAMES[first]} first stage + {PRECISION_NAMES[resolve_bits(rescore_bits)]} rescore"
            rows.append(row(name, bytes_per_vector(dim, first) + rescore))
    return rows


def format_storage_report(rows: list[dict]) -> str:
    """A markdown table of :func:`storage_report` rows."""
    lines = ["| precision | bytes / vector | index size (MiB) | vs float32 |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['bytes_per_vector']} | {r['index_mib']} | {r['compression_vs_float32']}x |")
    return "\n".join(lines)
