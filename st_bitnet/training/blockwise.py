"""Block-wise reconstruction warm start: each ternary block trained alone to reproduce its full-precision block.

Before end-to-end distillation, every transformer block of the converted student is trained on its own to map
its input to the teacher block's output (mean squared error relative to the teacher's energy, over real
tokens), block after block from the bottom. A block's step costs a fraction of a full-model step and needs no
gradient through the rest of the network, so a few thousand sentences bring every block close to its
full-precision function before the first end-to-end step. This is EfficientQAT's Block-AP / OmniQuant's
block-wise reconstruction applied to a W1.58A8 student (all of a block's latent weights and norms are trained).

The reconstruction loss is either the relative error above (``loss="relative"``) or the error per channel in units
of the teacher's spread of that channel over the batch's tokens (``loss="channel_normalized"``). The second
matters for backbones with massive, nearly constant channels (Gemma3's residual stream): there the relative error
is dominated by those channels, which a block can fit while the sentence-dependent channels the embedding is
pooled from stay wrong. Their sum (``loss="relative_plus_channel_normalized"``) asks for both: the massive
channels at their scale, which the layers above read, and the sentence-dependent channels in their own units.

Inputs of block ``i`` are, with ``inputs="student"`` (default), the outputs of the already warm-started student
blocks below it, so each block also learns to undo the error that reaches it; with ``inputs="teacher"`` they are
the teacher's own (every block independent of the others). The extra arguments a block is called with (attention
masks, rotary position embeddings, per-layer sliding-window masks) are recorded from the teacher's forward with
hooks, so any architecture whose blocks are ``layers.N`` / ``layer.N`` modules works unchanged.

References:
    - EfficientQAT: Efficient Quantization-Aware Training for Large Language Models, https://arxiv.org/abs/2407.11047
    - OmniQuant: Omnidirectionally Calibrated Quantization for LLMs, https://arxiv.org/abs/2308.13137
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from st_bitnet.losses.hidden_state_capture import find_transformer_blocks

logger = logging.getLogger(__name__)

INPUT_MODES = ("student", "teacher")
LOSS_MODES = ("relative", "channel_normalized", "relative_plus_channel_normalized")


@dataclass
class BlockwiseConfig:
    """Settings of :func:`blockwise_warm_start` (the recipe's ``warm_start`` section).

    Args:
        texts: how many training texts to reconstruct on.
        steps_per_block: optimizer steps per block.
        batch_size: texts per step.
        learning_rate: AdamW learning rate of each block's latent weights.
        max_seq_length: truncation of the warm-start texts (None: the student's).
        inputs: ``"student"`` (outputs of the warm-started blocks below) or ``"teacher"``.
        held_out_batches: batches kept out of training to report each block's error before/after.
        loss: ``"relative"`` (:func:`relative_error`), ``"channel_normalized"`` (:func:`channel_normalized_error`)
            or ``"relative_plus_channel_normalized"`` (their sum: the massive channels' scale and the others' shape).
    """

    texts: int = 2048
    steps_per_block: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-4
    max_seq_length: int | None = None
    inputs: str = "student"
    held_out_batches: int = 2
    loss: str = "relative"

    def __post_init__(self):
        if self.inputs not in INPUT_MODES:
            raise ValueError(f"warm_start.inputs must be one of {INPUT_MODES}, got {self.inputs!r}")
        if self.loss not in LOSS_MODES:
            raise ValueError(f"warm_start.loss must be one of {LOSS_MODES}, got {self.loss!r}")
        for name in ("texts", "steps_per_block", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"warm_start.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not float(self.learning_rate) > 0:
            raise ValueError(f"warm_start.learning_rate must be positive, got {self.learning_rate!r}")
        if self.held_out_batches < 0:
            raise ValueError("warm_start.held_out_batches must be >= 0")


@dataclass
class _Batch:
    mask: Tensor  # (B, L) real tokens
    inputs: list[Tensor]  # per block: the hidden state it receives
    targets: list[Tensor]  # per block: the teacher block's output
    args: list[tuple]  # per block: the positional arguments after the hidden state
    kwargs: list[dict]  # per block: keyword arguments (masks, position embeddings...)


def _hidden_of(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict, bool]:
    """Split a block call into (hidden state, other args, kwargs, whether hidden was passed by keyword)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), False
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs, True


def _output_of(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def relative_error(output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``sum |output - target|^2 / sum |target|^2`` over the real tokens of ``mask``."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return ((output.float() - target.float()) ** 2 * m).sum() / ((target.float() ** 2) * m).sum().clamp(min=1e-12)


def channel_normalized_error(output: Tensor, target: Tensor, mask: Tensor, magnitude_floor: float = 0.01) -> Tensor:
    """Mean over real tokens and channels of ``(output - target)^2 / s_c``, with ``s_c = var_c + magnitude_floor *
    mean_sq_c``: the teacher's variance of channel ``c`` over the batch's real tokens plus a small share of its mean
    square. A channel is measured against its spread over tokens; a (nearly) constant channel, however large,
    against a tenth of its size (the default floor), so it cannot outweigh the channels that differ per sentence."""
    m = mask.to(torch.float32).unsqueeze(-1)
    t, o = target.float(), output.float()
    count = m.sum().clamp(min=1.0)
    mean = (t * m).sum(dim=(0, 1)) / count
    var = (((t - mean) ** 2) * m).sum(dim=(0, 1)) / count
    scale = (var + float(magnitude_floor) * (t * t * m).sum(dim=(0, 1)) / count).clamp(min=1e-12)
    return (((o - t) ** 2 / scale) * m).sum() / (count * t.shape[-1])


def relative_plus_channel_normalized_error(output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """:func:`relative_error` + :func:`channel_normalized_error`, each with its defaults."""
    return relative_error(output, target, mask) + channel_normalized_error(output, target, mask)


RECONSTRUCTION_LOSSES = {"relative": relative_error, "channel_normalized": channel_normalized_error,
                         "relative_plus_channel_normalized": relative_plus_channel_normalized_error}


def _call_block(block: nn.Module, hidden: Tensor, args: tuple, kwargs: dict, by_keyword: bool) -> Tensor:
    if by_keyword:
        return _output_of(block(*args, hidden_states=hidden, **kwargs))
    return _output_of(block(hidden, *args, **kwargs))


@torch.no_grad()
def _record_teacher(teacher_model, features_list: list[dict]) -> tuple[list[_Batch], list[bool]]:
    blocks = find_transformer_blocks(teacher_model)
    records: dict[int, dict] = {}
    handles = []
    by_keyword = [False] * len(blocks)

    def pre_hook(index):
        def hook(module, args, kwargs):
            hidden, rest, kw, keyword = _hidden_of(args, kwargs)
            by_keyword[index] = keyword
            records[index] = {"input": hidden.detach(), "args": rest, "kwargs": kw}

        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            records[index]["target"] = _output_of(output).detach()

        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
    batches = []
    try:
        for features in features_list:
            records.clear()
            teacher_model(dict(features))
            batches.append(_Batch(
                mask=features["attention_mask"],
                inputs=[records[i]["input"] for i in range(len(blocks))],
                targets=[records[i]["target"] for i in range(len(blocks))],
                args=[records[i]["args"] for i in range(len(blocks))],
                kwargs=[records[i]["kwargs"] for i in range(len(blocks))],
            ))
    finally:
        for handle in handles:
            handle.remove()
    return batches, by_keyword


def blockwise_warm_start(student, teacher_model, texts: list[str], config: BlockwiseConfig | None = None,
                         seed: int = 0) -> list[dict]:
    """Train each transformer block of ``student`` alone to reproduce ``teacher_model``'s block (in place).

    Args:
        student: the converted (latent BitLinear) SentenceTransformer.
        teacher_model: the full-precision SentenceTransformer with the same architecture and tokenizer.
        texts: training texts (deduplicated, the first ``config.texts`` after a seeded shuffle are used).
        config: :class:`BlockwiseConfig`.
        seed: shuffling and batch order.

    Returns:
        One dict per block: relative output error on held-out batches before and after, steps, seconds.

    Example::

        import st_bitnet
        from sentence_transformers import SentenceTransformer
        teacher = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
        student = st_bitnet.convert(SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2"),
                                    st_bitnet.BitNetConversionConfig(norm="none"))
        blockwise_warm_start(student, teacher, my_texts, BlockwiseConfig(steps_per_block=100))
    """
    config = config or BlockwiseConfig()
    s_blocks = find_transformer_blocks(student)
    t_blocks = find_transformer_blocks(teacher_model)
    if len(s_blocks) != len(t_blocks):
        raise ValueError(f"the student has {len(s_blocks)} blocks and the teacher {len(t_blocks)}: block-wise "
                         "reconstruction needs the same architecture")
    unique = list(dict.fromkeys(t for t in texts if isinstance(t, str) and t.strip()))
    random.Random(seed).shuffle(unique)
    unique = unique[: config.texts]
    n_batches = (len(unique) + config.batch_size - 1) // config.batch_size
    if n_batches <= config.held_out_batches:
        raise ValueError(f"warm_start: {len(unique)} texts give {n_batches} batches of {config.batch_size}, not more "
                         f"than the {config.held_out_batches} held-out ones; give more texts")
    unique.sort(key=len)  # batches of similar length: little padding
    saved_length = student.max_seq_length
    if config.max_seq_length:
        student.max_seq_length = int(config.max_seq_length)
    try:
        features_list = [dict(student.tokenize(unique[i : i + config.batch_size]))
                         for i in range(0, len(unique), config.batch_size)]
    finally:
        student.max_seq_length = saved_length
    device = next(student.parameters()).device
    features_list = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in f.items()} for f in features_list]
    order = list(range(len(features_list)))
    random.Random(seed + 1).shuffle(order)
    held_out, train_ids = order[: config.held_out_batches], order[config.held_out_batches :]

    was_training = teacher_model.training
    teacher_model.eval()
    batches, by_keyword = _record_teacher(teacher_model, features_list)
    teacher_model.train(was_training)
    inputs = [b.inputs[0] for b in batches]  # the embedding output: the student's is the same (not converted)

    student_was_training = student.training
    student.eval()  # no dropout: a deterministic reconstruction target
    report = []
    reconstruction = RECONSTRUCTION_LOSSES[config.loss]
    rng = random.Random(seed + 2)
    try:
        for index, block in enumerate(s_blocks):
            source = inputs if config.inputs == "student" else [b.inputs[index] for b in batches]

            def probe_errors(ids) -> tuple[float, float]:
                """(relative error, training loss) on batches ``ids``: each block output computed once for both."""
                relative, losses = [], []
                with torch.no_grad():
                    for j in ids:
                        out = _call_block(block, source[j], batches[j].args[index], batches[j].kwargs[index],
                                          by_keyword[index])
                        relative.append(relative_error(out, batches[j].targets[index], batches[j].mask))
                        losses.append(relative[-1] if reconstruction is relative_error
                                      else reconstruction(out, batches[j].targets[index], batches[j].mask))
                if not relative:
                    return float("nan"), float("nan")
                return float(torch.stack(relative).mean()), float(torch.stack(losses).mean())

            probe = held_out or train_ids[:2]
            before, loss_before = probe_errors(probe)
            params = [p for p in block.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=float(config.learning_rate), weight_decay=0.0)
            start = time.perf_counter()
            for _ in range(config.steps_per_block):
                j = rng.choice(train_ids)
                out = _call_block(block, source[j], batches[j].args[index], batches[j].kwargs[index], by_keyword[index])
                loss = reconstruction(out, batches[j].targets[index], batches[j].mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            seconds = time.perf_counter() - start
            after, loss_after = probe_errors(probe)
            entry = {"block": index, "relative_error_before": round(before, 5),
                     "relative_error_after": round(after, 5), "steps": config.steps_per_block,
                     "seconds": round(seconds, 1)}
            if config.loss != "relative":
                entry.update(loss=config.loss, loss_before=round(loss_before, 5), loss_after=round(loss_after, 5))
            report.append(entry)
            logger.info("warm start block %d: relative error %.4f -> %.4f (%d steps, %.0f s)", index, before, after,
                        config.steps_per_block, seconds)
            if config.inputs == "student":
                with torch.no_grad():
                    inputs = [_call_block(block, inputs[j], batches[j].args[index], batches[j].kwargs[index],
                                          by_keyword[index]).detach() for j in range(len(batches))]
    finally:
        student.train(student_was_training)
    return report


def warm_start_from_recipe(recipe, student, teacher, train_dataset, cpu_bf16: bool) -> list[dict]:
    """The recipe's ``warm_start`` stage: texts drawn from the training data, bf16 autocast when the run uses it on
    the CPU (``cpu_bf16``), the report written to ``<output_dir>/warm_start.json``."""
    import contextlib
    import json
    from pathlib import Path

    from .output_quantizer import calibration_texts

    config = recipe.warm_start
    texts = calibration_texts(train_dataset, 2 * config.texts, recipe.prompts)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else contextlib.nullcontext()
    with autocast:
        report = blockwise_warm_start(student, teacher.model, texts, config, seed=recipe.seed)
    Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(recipe.output_dir) / "warm_start.json").write_text(json.dumps(report, indent=2))
    return report
