"""Loss classes a recipe can name: st_bitnet's own, then sentence-transformers'."""

from __future__ import annotations

from .errors import RecipeError


def loss_class(name: str):
    import st_bitnet.losses as ours
    from sentence_transformers.sentence_transformer import losses as theirs

    for namespace in (ours, theirs):
        if hasattr(namespace, name):
            return getattr(namespace, name)
    raise RecipeError(f"unknown loss type {name!r}: use a class of st_bitnet.losses or sentence-transformers' losses")
