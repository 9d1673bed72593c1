"""``ServeLimits``: how large a request may be and how requests are batched (one home for the defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeLimits:
    """Bounds of the embeddings server.

    Args:
        max_batch_size: Most texts one ``model.encode`` call receives (requests are gathered up to this; a single
            request with more texts runs alone, encoded in chunks of this size).
        max_wait_ms: How long the first queued request waits for companions before its batch runs.
        max_inputs: Most texts in one request (OpenAI allows 2048).
        max_input_chars: Most characters in one text (the model truncates to its ``max_seq_length`` tokens anyway;
            this bounds what a client can make the tokenizer read).
        max_body_bytes: Largest request body accepted, checked before the JSON is parsed.
        max_queued_texts: Most texts waiting for the model; beyond it requests get ``503`` (back-pressure instead of
            an unbounded queue).

    Raises:
        ValueError: If a bound is not positive (``max_wait_ms`` may be 0: no waiting).

    Example:
        ::

            from st_bitnet.serve import ServeLimits, create_app

            app = create_app(model, limits=ServeLimits(max_batch_size=64, max_wait_ms=10))
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_inputs: int = 2048
    max_input_chars: int = 16384
    max_body_bytes: int = 4 * 1024 * 1024
    max_queued_texts: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_inputs", "max_input_chars", "max_body_bytes", "max_queued_texts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_wait_ms, (int, float)) or self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if self.max_queued_texts < self.max_inputs:
            raise ValueError(
                f"max_queued_texts ({self.max_queued_texts}) must be at least max_inputs ({self.max_inputs}), "
                "otherwise a request of max_inputs texts could never be queued"
            )
