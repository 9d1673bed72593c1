"""The frozen full-precision teacher used by the distillation losses.

The teacher is the same backbone before BitNet conversion (optionally first fine-tuned as an embedder).
It shares the student's tokenizer, so the student's tokenized batch is fed to it unchanged: no second
tokenization, and token positions line up for the attention-relation loss.

:class:`FrozenTeacher` is deliberately *not* an ``nn.Module``: the trainer moves losses to the student's
device and collects parameters from modules, and the teacher must stay out of both (it may live on
another device, and it is never trained).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from . import introspection
from .bitlinear import BitLinear

# A probe that exercises casing, accents, digits, punctuation and sub-word splits.
_TOKENIZER_PROBE = "Ternary weights: 1.58 bits! Héllo, naïve café; query: what's BitNet? 42 tokenizers."


class TokenizerMismatchError(ValueError):
    """The teacher does not tokenize text like the student, so token-level distillation is meaningless."""


def _tokenizer_of(model):
    try:
        return introspection.tokenizer(model)
    except ValueError:
        return None


def check_same_tokenizer(student, teacher) -> None:
    """Raise :class:`TokenizerMismatchError` unless ``student`` and ``teacher`` tokenize text identically.

    Compares vocabulary size, the vocabulary itself, the special-token ids and the ids of a probe sentence.
    """
    s_tok, t_tok = _tokenizer_of(student), _tokenizer_of(teacher)
    if s_tok is None or t_tok is None:
        raise TokenizerMismatchError("could not find a tokenizer on the student or the teacher to compare")
    problems = []
    if len(s_tok) != len(t_tok):
        problems.append(f"vocabulary sizes differ ({len(s_tok)} vs {len(t_tok)})")
    elif s_tok.get_vocab() != t_tok.get_vocab():
        problems.append("vocabularies differ")
    for attr in ("pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id"):
        if getattr(s_tok, attr, None) != getattr(t_tok, attr, None):
            problems.append(f"{attr} differs ({getattr(s_tok, attr, None)} vs {getattr(t_tok, attr, None)})")
    if not problems:
        s_ids = s_tok(_TOKENIZER_PROBE)["input_ids"]
        t_ids = t_tok(_TOKENIZER_PROBE)["input_ids"]
        if list(s_ids) != list(t_ids):
            problems.append("the same text tokenizes to different ids")
    if problems:
        raise TokenizerMismatchError(
            "the teacher's tokenizer differs from the student's: "
            + "; ".join(problems)
            + ". Distillation feeds the student's token ids to the teacher (and the attention-relation loss "
            "compares token positions), so the teacher must be the same backbone family with the same tokenizer."
        )


class FrozenTeacher:
    """A frozen, no-grad SentenceTransformer teacher, optionally on its own device.

    Args:
        model: a ``SentenceTransformer`` or a path / Hub id to load as one (unconverted, full precision).
        device: where the teacher runs (e.g. ``"cuda:1"`` to keep it off the student's GPU); defaults to
            the model's current device. Inputs are moved there and outputs moved back.
        dtype: optional dtype to cast the teacher to (e.g. ``torch.bfloat16`` to halve its memory).
        student: if given, the tokenizers are compared at once (:func:`check_same_tokenizer`).

    Example::

        from sentence_transformers import SentenceTransformer
        import st_bitnet
        from st_bitnet.teacher import FrozenTeacher

        student = st_bitnet.convert(SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2"))
        teacher = FrozenTeacher("sentence-transformers/all-MiniLM-L6-v2", student=student)
    """

    def __init__(self, model, device: str | torch.device | None = None, dtype: torch.dtype | None = None, student=None):
        if isinstance(model, (str, os.PathLike)):
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(model), device=str(device) if device is not None else None)
        if not hasattr(model, "forward"):
            raise TypeError(f"the teacher must be a SentenceTransformer or a path, got {type(model).__name__}")
        if any(isinstance(m, BitLinear) for m in model.modules()):
            raise ValueError("the teacher is a converted BitNet model: distill from the full-precision backbone")
        if device is not None:
            model.to(device)
        if dtype is not None:
            model.to(dtype)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        if student is not None:
            check_same_tokenizer(student, model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _move(self, features: dict) -> dict:
        device = self.device
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in features.items()}

    @torch.no_grad()
    def forward(self, features: dict) -> dict:
        """The teacher's output dict for an already tokenized batch (inputs are not modified)."""
        out = self.model(self._move(dict(features)))
        return out

    __call__ = forward

    @torch.no_grad()
    def embed(self, features: dict, device: torch.device | None = None) -> Tensor:
        """Sentence embeddings for a tokenized batch, as float32 on ``device`` (default: the inputs' device)."""
        if device is None:
            device = next((v.device for v in features.values() if isinstance(v, Tensor)), self.device)
        return self.forward(features)["sentence_embedding"].float().to(device)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, **kwargs) -> Tensor:
        return self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True, **kwargs).float()


def with_prompt(texts: list[str], prompt: str) -> list[str]:
    return [prompt + text for text in texts] if prompt else list(texts)


def precompute_teacher_scores(
    dataset,
    teacher: FrozenTeacher,
    columns: Iterable[str] | None = None,
    batch_size: int = 64,
    label_column: str = "label",
    prompts: Mapping[str, str] | None = None,
):
    """Add the teacher's per-row similarity scores to a ``datasets.Dataset`` (query column first).

    Each row gets ``label = [sim(query, candidate_1), ..., sim(query, candidate_n)]`` from the teacher, the
    format :class:`~st_bitnet.losses.SimilarityDistributionDistillationLoss` reads when it has no live
    teacher. Precomputed scores only cover each row's own candidates (the batch composition is unknown in
    advance); a live teacher also scores the in-batch negatives. ``prompts`` ({column: prompt}) are prepended as
    the trainer prepends them to the student's input, so the teacher scores the texts the student sees.
    """
    columns = list(columns) if columns is not None else [c for c in dataset.column_names if c != label_column]
    if len(columns) < 2:
        raise ValueError(f"need a query column and at least one candidate column, got {columns}")
    similarity = teacher.model.similarity_pairwise
    prompts = prompts or {}

    def texts(batch, column):
        return with_prompt(batch[column], prompts.get(column, ""))

    def add_scores(batch):
        query = teacher.encode(texts(batch, columns[0]), batch_size=batch_size)
        scores = [similarity(query, teacher.encode(texts(batch, c), batch_size=batch_size)) for c in columns[1:]]
        return {label_column: torch.stack(scores, dim=1).cpu().tolist()}

    if label_column in dataset.column_names:
        dataset = dataset.remove_columns(label_column)
    return dataset.map(add_scores, batched=True, batch_size=1024)


def precompute_teacher_embeddings(
    dataset,
    teacher: FrozenTeacher,
    columns: Iterable[str] | None = None,
    max_seq_length: int | None = None,
    batch_size: int = 64,
    label_column: str = "label",
    cpu_bf16_autocast: bool = False,
    prompts: Mapping[str, str] | None = None,
):
    """Add the teacher's sentence embeddings of every text column to a ``datasets.Dataset`` as ``label``.

    Each row gets ``label = [E(column_1), ..., E(column_n)]`` (float32, ``(n_columns, dim)``), which
    :class:`~st_bitnet.losses.SimilarityDistributionDistillationLoss` and
    :class:`~st_bitnet.losses.EmbeddingMSEDistillationLoss` read when they have no live teacher: the same losses (the
    in-batch similarity matrix is built from these embeddings) without a teacher forward at every step, so a run
    over several epochs embeds each text once. The embeddings are stored in float32; they are computed in float32
    unless ``cpu_bf16_autocast`` asks for the targets a live teacher gives under the training's bf16 autocast.

    Args:
        dataset: a ``datasets.Dataset`` of text columns.
        teacher: the frozen teacher.
        columns: the text columns, in the order the loss receives them (default: every column but ``label_column``).
        max_seq_length: truncation (give the student's, so both see the same tokens; default: the teacher's).
        batch_size: texts per teacher forward.
        label_column: the column written (an existing one is replaced).
        cpu_bf16_autocast: run a CPU teacher under bf16 autocast (2-3x faster where the CPU multiplies bf16
            natively; the same targets as a live teacher in a bf16-autocast run).
        prompts: {column: prompt} prepended to that column's texts, as the trainer's ``prompts`` are prepended to
            the student's input (a live teacher reads the student's prompted tokens).

    Example::

        from st_bitnet.teacher import FrozenTeacher, precompute_teacher_embeddings
        train = precompute_teacher_embeddings(train, FrozenTeacher(teacher_path), max_seq_length=student.max_seq_length)
        loss = SimilarityDistributionDistillationLoss(student, teacher=None)
    """
    columns = list(columns) if columns is not None else [c for c in dataset.column_names if c != label_column]
    if not columns:
        raise ValueError("no text column to embed")
    prompts = prompts or {}
    saved = teacher.model.max_seq_length
    if max_seq_length is not None:
        teacher.model.max_seq_length = int(max_seq_length)

    def add_embeddings(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16_autocast):
            per_column = [teacher.encode(with_prompt(batch[c], prompts.get(c, "")), batch_size=batch_size)
                          for c in columns]  # fmt: skip
        return {label_column: torch.stack(per_column, dim=1).float().cpu().numpy()}

    try:
        if label_column in dataset.column_names:
            dataset = dataset.remove_columns(label_column)
        return dataset.map(add_embeddings, batched=True, batch_size=1024)
    finally:
        teacher.model.max_seq_length = saved
