"""Corpus-scale encoding: a corpus to resumable Parquet shards of packed multi-precision codes.

- :func:`encode_corpus`: JSONL / Parquet / BEIR folder -> ``shards/*.parquet`` + ``manifest.json`` (+ an index),
  on one process, sentence-transformers' multi-process pool, or Ray Data (many machines).
- :class:`CorpusSource`: how rows are read (id / text fields, fixed order).
- :func:`load_codes`: read a finished run back as ``(ids, QuantizedEmbeddings)``.
- :func:`read_manifest`: the run's settings, calibration, shards and counts.

Command line: ``st-bitnet encode-corpus MODEL SOURCE OUTPUT_DIR``. User guide: ``docs/deploy.md``.
"""

from .encode_corpus import ENGINES, build_index, encode_corpus, verify_shard
from .manifest import read_manifest
from .shards import load_codes, read_shard
from .sources import CorpusSource

__all__ = ["ENGINES", "CorpusSource", "build_index", "encode_corpus", "load_codes", "read_manifest", "read_shard", "verify_shard"]
