"""A length-grouped batch sampler: batches of similar-length rows, so a CPU step pads less.

A transformer's cost grows with the padded length of its batch. Drawn at random, a batch of 32 STS-B pairs pads to
its longest sentence, about twice the tokens it holds; grouping rows of similar length cuts the padded tokens of
the MiniLM recipe's training data by ~20% (``docs/recipes.md``). Randomness is kept where it matters: rows are
shuffled, sorted by length only within windows of ``window_batches`` batches, and the batches are shuffled again,
so every batch is still a random draw from one stretch of lengths. Like sentence-transformers'
``NoDuplicatesBatchSampler``, no text appears twice in a batch (in-batch negatives stay negatives).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Batches of rows of similar total text length, without duplicate texts inside a batch.

    Args:
        dataset: a ``datasets.Dataset`` of text columns (label columns are ignored).
        batch_size / drop_last / valid_label_columns / generator / seed: as in ``DefaultBatchSampler``; the order
            depends on ``seed + epoch`` only.
        window_batches: rows are sorted by length within windows of this many batches (1: no grouping beyond
            one batch; the dataset's size: a global sort, then shuffled batches).
        tokenizer / max_length: measure rows in the model's tokens, truncated at its ``max_seq_length`` (the
            runner's trainer passes both); without a tokenizer, in characters (a long document's characters keep
            counting past the truncation, so the grouping is coarser).

    Example::

        from sentence_transformers import SentenceTransformerTrainingArguments
        from st_bitnet.training.samplers import LengthGroupedBatchSampler

        args = SentenceTransformerTrainingArguments("out", batch_sampler=LengthGroupedBatchSampler)
        # recipes: training.batch_sampler: length_grouped
    """

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns: list[str] | None = None,
                 generator: torch.Generator | None = None, seed: int = 0, window_batches: int = 50,
                 tokenizer=None, max_length: int | None = None) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)  # fmt: skip
        if window_batches < 1:
            raise ValueError(f"window_batches must be >= 1, got {window_batches}")
        skip = set(valid_label_columns or []) | {"label", "labels", "score", "scores"}
        columns = [c for c in dataset.column_names if c not in skip]
        if not columns:
            raise ValueError("LengthGroupedBatchSampler needs at least one text column")
        self.texts = list(zip(*(dataset[c] for c in columns)))  # one tuple of texts per row
        if tokenizer is not None:
            cap = max_length or 10**9
            per_column = [[min(len(ids), cap) for ids in tokenizer([str(t) for t in texts])["input_ids"]]
                          for texts in zip(*self.texts)]  # fmt: skip
            self.lengths = torch.tensor([sum(row) for row in zip(*per_column)], dtype=torch.float64)
        else:
            self.lengths = torch.tensor([sum(len(str(t)) for t in row) for row in self.texts], dtype=torch.float64)
        self.window_batches = window_batches
        self.dropped_rows = 0  # rows the last epoch left out (see _without_single_rows)
        self._cached_epoch: tuple[int, list[list[int]], torch.Tensor] | None = None  # (epoch, batches, rng state)

    def __len__(self) -> int:
        # Clash splits and merged one-row tails move the count off ceil(rows / batch): count this epoch's batches.
        return len(self._batches_of_epoch()[0])

    def _batches_of_epoch(self) -> tuple[list[list[int]], torch.Generator]:
        """This epoch's batches, built once per epoch for ``__len__`` and ``__iter__``, and the generator the final
        shuffle draws from (where building them left it)."""
        epoch = int(getattr(self, "epoch", 0))
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            generator = self._generator()
            batches = self._epoch_batches(generator)
            self._cached_epoch = (epoch, batches, generator.get_state())
        generator = torch.Generator()
        generator.set_state(self._cached_epoch[2])
        return self._cached_epoch[1], generator

    def _generator(self) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(int(self.seed or 0) + int(getattr(self, "epoch", 0)))
        return generator

    def grouped_order(self, generator: torch.Generator) -> list[int]:
        """Row indices shuffled, then sorted by length inside each window (ties keep the shuffled order)."""
        order = torch.randperm(len(self.texts), generator=generator)
        window = self.window_batches * self.batch_size
        out: list[int] = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            out.extend(chunk[torch.argsort(self.lengths[chunk], stable=True)].tolist())
        return out

    def _without_single_rows(self, batches: list[list[int]]) -> list[list[int]]:
        """One-row batches (left by duplicate-text clashes) join the smallest batch they do not clash with.

        In-batch losses need two rows at least (a softmax over one candidate is constant). A row that clashes with
        every batch opens a batch other such rows may join; one still alone at the end sits this epoch out
        (``self.dropped_rows`` counts them), as a duplicate text in its batch would make a false negative.
        """
        kept = [batch for batch in batches if len(batch) > 1]
        for batch in batches:
            if len(batch) != 1:
                continue
            values = set(self.texts[batch[0]])
            fits = [b for b in kept if all(values.isdisjoint(self.texts[other]) for other in b)]
            if fits:
                min(fits, key=len).append(batch[0])
            else:
                kept.append(list(batch))
        out = [batch for batch in kept if len(batch) > 1]
        self.dropped_rows = len(kept) - len(out)
        return out

    def _epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        """This epoch's batches in grouped order; ``generator`` is left where the final shuffle draws from."""
        batches: list[list[int]] = []
        batch: list[int] = []
        seen: set[str] = set()
        deferred: list[int] = []  # rows that clashed with the batch being filled: they open the next one
        for index in self.grouped_order(generator):
            pending, deferred = [*deferred, index], []
            for row in pending:
                values = set(self.texts[row])
                if seen.isdisjoint(values):
                    batch.append(row)
                    seen |= values
                    if len(batch) == self.batch_size:
                        batches.append(batch)
                        batch, seen = [], set()
                else:
                    deferred.append(row)
        for row in deferred:  # clashes left at the end: each opens a new batch when it cannot join this one
            values = set(self.texts[row])
            if not seen.isdisjoint(values):
                batches.append(batch)
                batch, seen = [], set()
            batch.append(row)
            seen |= values
            if len(batch) == self.batch_size:
                batches.append(batch)
                batch, seen = [], set()
        if batch:
            batches.append(batch)
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        else:  # a full batch grown by a leftover row would fall to drop_last: merge only when keeping partial ones
            batches = self._without_single_rows(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches, generator = self._batches_of_epoch()
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[position]
