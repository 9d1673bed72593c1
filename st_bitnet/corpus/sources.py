"""Corpus sources: JSONL, Parquet and BEIR corpus folders, read as ``(id, text)`` rows in a fixed order.

Every source numbers its rows ``0 .. count - 1`` in file order; shard ``i`` of an encoding run covers the rows
``[i * shard_size, (i + 1) * shard_size)``, so the same file always gives the same shards (what makes a run
resumable). Rows are streamed, never all held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..data import beir_doc_text

SOURCE_FORMATS = ("jsonl", "parquet", "beir")


@dataclass(frozen=True)
class CorpusSource:
    """A corpus file (or BEIR folder) and the fields that hold the id and the text.

    Args:
        path: A ``.jsonl`` file, a ``.parquet`` file, or a BEIR folder holding ``corpus.jsonl``.
        format: ``"jsonl"``, ``"parquet"`` or ``"beir"``; ``None`` infers it from ``path``.
        id_field: The column / key holding the document id (BEIR: ``"_id"``).
        text_field: The column / key holding the text (BEIR: ignored, the text is ``title + " " + text`` as in
            :func:`st_bitnet.data.beir_doc_text`).

    Example:
        ::

            from st_bitnet.corpus import CorpusSource

            source = CorpusSource("docs.jsonl", id_field="doc_id", text_field="body")
            for doc_id, text in source.iter_rows(start=1000, stop=2000):
                ...
    """

    path: str
    format: str | None = None
    id_field: str = "id"
    text_field: str = "text"
    _count: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        path = Path(self.path)
        fmt = self.format or infer_format(path)
        if fmt not in SOURCE_FORMATS:
            raise ValueError(f"Unknown corpus format {fmt!r}; expected one of {SOURCE_FORMATS}.")
        if fmt == "beir":
            object.__setattr__(self, "id_field", "_id")
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "path", os.fspath(path))
        if not self.data_file.exists():
            raise FileNotFoundError(f"Corpus file {self.data_file} does not exist.")

    @property
    def data_file(self) -> Path:
        """The file rows are read from (``corpus.jsonl`` inside a BEIR folder)."""
        return Path(self.path) / "corpus.jsonl" if self.format == "beir" else Path(self.path)

    def describe(self) -> dict:
        """What the manifest records about the source (checked again when a run resumes)."""
        stat = self.data_file.stat()
        return {
            "path": str(Path(self.path).resolve()),
            "format": self.format,
            "id_field": self.id_field,
            "text_field": self.text_field,
            "bytes": stat.st_size,
        }

    # ---- reading -------------------------------------------------------------------------------------------------
    def count(self) -> int:
        """Number of rows (one pass over a JSONL file; Parquet metadata)."""
        if not self._count:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                self._count.append(pq.ParquetFile(self.data_file).metadata.num_rows)
            else:
                with open(self.data_file, "rb") as handle:
                    self._count.append(sum(1 for line in handle if line.strip()))
        return self._count[0]

    def iter_rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, str]]:
        """``(id, text)`` of the rows ``[start, stop)`` in file order.

        Raises:
            ValueError: A row without the id / text field, with an empty id, or a text that is not a string.
        """
        stop = self.count() if stop is None else stop
        if start >= stop:
            return
        rows = self._iter_parquet(start) if self.format == "parquet" else self._iter_jsonl(start)
        for index, (doc_id, text) in enumerate(rows, start=start):
            if index >= stop:
                return
            yield doc_id, text

    def _row(self, record: dict, where: str) -> tuple[str, str]:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        if self.format == "beir":
            missing = [key for key in ("_id",) if key not in record]
            text = beir_doc_text({"title": record.get("title") or "", "text": record.get("text") or ""})
        else:
            missing = [key for key in (self.id_field, self.text_field) if key not in record]
            text = record.get(self.text_field)
        if missing:
            raise ValueError(f"{where} has no field {missing[0]!r} (fields: {sorted(record)[:10]}).")
        doc_id = record[self.id_field]
        if doc_id is None or str(doc_id) == "":
            raise ValueError(f"{where} has an empty id.")
        if not isinstance(text, str):
            raise ValueError(f"{where}: the text field {self.text_field!r} is {type(text).__name__}, not a string.")
        return str(doc_id), text

    def _iter_jsonl(self, start: int) -> Iterator[tuple[str, str]]:
        with open(self.data_file, encoding="utf-8") as handle:
            index = 0
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if index >= start:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{self.data_file}:{line_number} is not valid JSON: {err}") from err
                    yield self._row(record, f"{self.data_file}:{line_number}")
                index += 1

    def _iter_parquet(self, start: int) -> Iterator[tuple[str, str]]:
        import pyarrow.parquet as pq

        handle = pq.ParquetFile(self.data_file)
        names = handle.schema_arrow.names
        for column in (self.id_field, self.text_field):
            if column not in names:
                raise ValueError(f"{self.data_file} has no column {column!r} (columns: {names}).")
        offset = 0
        for group in range(handle.num_row_groups):
            rows = handle.metadata.row_group(group).num_rows
            if offset + rows <= start:  # skip whole row groups before the range without decoding them
                offset += rows
                continue
            table = handle.read_row_group(group, columns=[self.id_field, self.text_field])
            ids, texts = table.column(0).to_pylist(), table.column(1).to_pylist()
            for position in range(max(0, start - offset), rows):
                yield self._row({self.id_field: ids[position], self.text_field: texts[position]},
                                f"{self.data_file} row {offset + position}")
            offset += rows


def infer_format(path: Path) -> str:
    """``"beir"`` for a folder with ``corpus.jsonl``, else the file suffix (``.jsonl`` / ``.parquet``)."""
    if path.is_dir():
        if (path / "corpus.jsonl").exists():
            return "beir"
        raise ValueError(f"{path} is a folder without corpus.jsonl; pass a .jsonl / .parquet file or a BEIR folder.")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"Cannot tell the format of {path} from its name; pass format='jsonl' or 'parquet'.")


def ids_digest(ids: list[str]) -> str:
    """sha256 of a list of ids (how a written shard proves it holds exactly its rows)."""
    digest = hashlib.sha256()
    for doc_id in ids:
        digest.update(doc_id.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
