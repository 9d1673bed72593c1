"""Calibration of the RMSNorms that conversion puts inside BitLinear layers.

A norm initialised to ones rescales every token to unit RMS, which changes the function of a pretrained
backbone (BERT's biased projections and residual branches see inputs 5-20x smaller or larger than they were
trained on). Fitting each norm's per-channel weight by least squares on a few real sentences (``w_c = E[x_c n_c] /
E[n_c^2]`` with ``n = x / rms(x)``) makes ``norm(x) ~= x`` on typical tokens, so the converted model starts
where the full-precision one was. Measured effect on all-MiniLM-L6-v2: the README's conversion table.
"""

from __future__ import annotations

import torch

from .bitlinear import BitLinear
from .introspection import backbones, is_sentence_transformer

# How many texts calibration uses by default (recipes: ``model.calibrate_norms``; ``st-bitnet convert``).
DEFAULT_CALIBRATION_SIZE = 64

# Calibration texts when the caller has none: ordinary English of the kinds embedders see (captions, news,
# questions, reviews, instructions, science and support text), short and long. The fitted weights are
# per-channel means over all their tokens, so a few dozen varied sentences are enough.
BUILTIN_CALIBRATION_SENTENCES = (
    "A man is playing a guitar on the street corner.",
    "Two dogs are running through a field of tall grass.",
    "A woman is slicing onions in a small kitchen.",
    "Children are playing football in the park after school.",
    "The train to the airport leaves every fifteen minutes.",
    "How do I reset my password if I no longer have access to my email?",
    "What is the capital city of Australia?",
    "Why does the sky look blue during the day and red at sunset?",
    "Can I cancel my order after it has been shipped?",
    "The central bank raised interest rates by a quarter of a percentage point on Wednesday.",
    "Heavy rain caused flooding in several villages along the river overnight.",
    "The company reported a sharp rise in quarterly profits, beating analysts' expectations.",
    "Scientists have discovered a new species of frog in the mountains of Peru.",
    "The city council voted to expand the bike lane network next year.",
    "Protein folding determines how a chain of amino acids takes its three-dimensional shape.",
    "Vitamin D deficiency is associated with a higher risk of bone fractures in older adults.",
    "The experiment measured the effect of temperature on the rate of the reaction.",
    "Mutations in this gene were found in a small fraction of patients with the disease.",
    "Black holes form when massive stars collapse under their own gravity.",
    "This phone has a great battery, but the camera is disappointing in low light.",
    "The hotel room was clean and quiet, and the staff were very friendly.",
    "I waited forty minutes for my food and it arrived cold.",
    "Honestly one of the best books I have read this year.",
    "The movie starts slowly but the last hour is thrilling.",
    "Preheat the oven to 200 degrees and bake the bread for thirty minutes.",
    "To install the package, run the installer and follow the instructions on the screen.",
    "Press and hold the power button for ten seconds to restart the device.",
    "Please attach a copy of your receipt when you submit the claim.",
    "My card payment was declined even though I have enough money in my account.",
    "I was charged twice for the same transaction yesterday.",
    "The exchange rate shown in the app was different from the one I was charged.",
    "I feel so happy today, everything is going right.",
    "I am really annoyed that nobody told me the meeting was cancelled.",
    "She felt nervous before giving her first speech in front of the class.",
    "If I had left earlier, I would have caught the last bus home.",
    "I wish the store had stocked the larger size of this jacket.",
    "The museum is closed on Mondays and public holidays.",
    "Paris is known for its museums, its cafes and the Eiffel Tower.",
    "The Amazon river flows through Peru, Colombia and Brazil before reaching the Atlantic.",
    "Mount Everest is the highest mountain above sea level.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "He spent the weekend repairing the fence in his back garden.",
    "A cat is sleeping on a sunny windowsill.",
    "The old bridge was replaced because it could no longer carry heavy trucks.",
    "Students must submit their essays before the end of the month.",
    "The software update fixes a bug that caused the app to crash on startup.",
    "Machine learning models can be compressed by quantizing their weights to fewer bits.",
    "The search engine returns documents ranked by their relevance to the query.",
    "Renewable energy sources such as wind and solar now supply a third of the country's electricity.",
    "The patient was treated with antibiotics and recovered within a week.",
    "The orchestra performed a symphony by Beethoven to a full concert hall.",
    "Our team won the match in the final minute with a header from a corner kick.",
    "The election results will be announced late on Sunday evening.",
    "A group of volunteers cleaned up the beach on Saturday morning.",
    "The price of coffee has risen because of poor harvests in Brazil.",
    "Who wrote the novel Pride and Prejudice?",
    "Where can I find the nearest pharmacy that is open at night?",
    "Is it safe to drink tap water in this city?",
    "The company plans to open three new factories and hire two thousand workers.",
    "The study followed ten thousand participants over a period of twenty years.",
    "The little boy laughed as the puppy licked his face.",
    "A chef is preparing sushi behind the counter of a busy restaurant.",
    "Traffic on the highway was slow because of roadworks near the exit.",
    "The library offers free language classes for adults every Thursday evening.",
)


def default_calibration_sentences(n: int = DEFAULT_CALIBRATION_SIZE) -> list[str]:
    """The first ``n`` of :data:`BUILTIN_CALIBRATION_SENTENCES` (the same texts on every machine)."""
    if n < 1:
        raise ValueError(f"need at least one calibration sentence, got n={n}")
    return list(BUILTIN_CALIBRATION_SENTENCES[:n])


def read_calibration_file(path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one calibration text per line.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no text.
    """
    from pathlib import Path

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration texts file not found: {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"calibration texts file {path} holds no text (one sentence per line)")
    return texts


@torch.no_grad()
def calibrate_norms(model, sentences: list[str], batch_size: int | None = None) -> int:
    """Set every latent BitLinear norm's weight to the mean RMS of its input on ``sentences`` (in place).

    Layers are calibrated in forward order within one pass over the first batch, so each layer sees inputs
    produced by already-calibrated upstream layers. Padding tokens are excluded.

    Args:
        model: a SentenceTransformer with latent BitLinear layers from :func:`st_bitnet.convert`.
        sentences: a few dozen representative texts.
        batch_size: encode batch size (default: all sentences in one batch, the one used for calibration).

    Returns:
        The number of norms calibrated.

    Example::

        st_bitnet.convert(model)
        st_bitnet.calibrate_norms(model, train_sentences[:64])
    """
    if not sentences:
        raise ValueError("calibrate_norms needs at least one sentence")
    if not is_sentence_transformer(model):
        raise TypeError(f"calibrate_norms expects a SentenceTransformer, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, BitLinear) and m.rms_norm is not None]
    if not layers:
        raise ValueError("no BitLinear with a norm to calibrate: convert the model with norm='per_projection' or 'subln'")
    if any(m.is_packed for m in layers):
        raise ValueError("calibrate_norms runs before packing (the norm weights are part of the packed model)")
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}
    done: set[int] = set()

    def capture_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        mask_holder["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def calibrate(module: BitLinear, args):
        if id(module) in done:
            return
        x = args[0].float()
        mask = mask_holder["mask"]
        if mask is not None and mask.shape == x.shape[:-1]:
            x = x[mask.bool()]
        x = x.reshape(-1, x.shape[-1])
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.rms_norm.variance_epsilon)
        # per-channel least squares: weight_c = argmin E[(w_c * normed_c - x_c)^2]
        weight = (x * normed).sum(0) / normed.pow(2).sum(0).clamp(min=1e-12)
        module.rms_norm.weight.copy_(weight.to(module.rms_norm.weight.dtype))
        done.add(id(module))

    handles = [b.register_forward_pre_hook(capture_mask, with_kwargs=True) for b in backbones(model)]
    handles += [m.register_forward_pre_hook(calibrate) for m in layers]
    try:
        model.encode(list(sentences), batch_size=batch_size or len(sentences), convert_to_numpy=True)
    finally:
        for h in handles:
            h.remove()
    return len(done)
