"""Multi-precision codes in a real vector database: 1-bit Hamming first stage in the database, exact rescoring.

- :class:`CodeStore`: the engine-independent part (writing codes + ids + payload, two-stage search).
- :class:`LanceDBStore`: the LanceDB adapter (embedded, native ``hamming`` on ``uint8`` vectors; needs
  ``pip install st_bitnet[vectordb]``, imported when a store is opened).

Adding an engine is one file: subclass :class:`CodeStore` and implement its storage hooks. Why LanceDB, and how
the alternatives compare: ``docs/deploy.md``.
"""

from .lancedb_store import LanceDBStore
from .store import CodeStore

__all__ = ["CodeStore", "LanceDBStore"]
