"""The recipe's ``loss`` section built into loss objects: one component as is, several as a
:class:`~st_bitnet.losses.WeightedCombinationLoss`; ``multi_precision`` on a component wraps it in
:class:`~st_bitnet.losses.MultiPrecisionLoss`."""

from __future__ import annotations

import inspect

from .loss_types import loss_class
from .recipe import Recipe, RecipeError, multi_precision_spec

def _instantiate_loss(name: str, params: dict, student, teacher, model_spec=None):
    """One loss from its recipe entry; a nested ``{type: ...}`` argument (a wrapper's inner loss) is built too, and
    ``multi_precision: true`` wraps the component in ``MultiPrecisionLoss``."""
    from .recipe import parse_loss_multi_precision

    params = dict(params)
    wrap = parse_loss_multi_precision(name, params, model_spec)
    params.pop("multi_precision", None)
    cls = loss_class(params.pop("type"))
    precomputed = params.pop("precompute_teacher_scores", False)
    # teacher: self (self-distillation, checked by parse_recipe) needs no teacher model
    if params.get("teacher") != "self" and "teacher" in inspect.signature(cls.__init__).parameters:
        params["teacher"] = None if precomputed else teacher
    for key, value in params.items():
        if isinstance(value, dict) and "type" in value:
            params[key] = _instantiate_loss(f"{name}.{key}", value, student, teacher, model_spec)
        elif isinstance(value, list) and key in ("directions", "relations"):
            params[key] = tuple(value)
    from st_bitnet.losses import MultiPrecisionLoss

    if cls is MultiPrecisionLoss and "precisions" not in params and model_spec is not None:
        params["precisions"] = list(model_spec.precisions)  # default: every precision the quantizer serves
    try:
        loss = cls(student, **params)
    except TypeError as error:
        raise RecipeError(f"loss component {name!r}: {error}") from None
    if wrap is not None:
        loss = MultiPrecisionLoss(student, loss, **wrap)
    return loss


def _runs_its_own_teacher_per_precision(loss) -> bool:
    """A standalone MultiPrecisionLoss over a teacher loss would run the teacher once per precision."""
    from st_bitnet.losses import MultiPrecisionLoss

    runs_inner_forward = isinstance(loss, MultiPrecisionLoss) and type(loss).forward is MultiPrecisionLoss.forward
    return runs_inner_forward and getattr(loss.loss, "teacher", None) is not None  # (a subclass may embed once)


def build_loss(recipe: Recipe, student, teacher):
    """The recipe's loss: one component as is, several as a :class:`WeightedCombinationLoss`."""
    from st_bitnet.losses import WeightedCombinationLoss

    components, weights = {}, {}
    for name, spec in recipe.loss.items():
        params = dict(spec)
        weights[name] = float(params.pop("weight", 1.0))
        components[name] = _instantiate_loss(name, params, student, teacher, multi_precision_spec(recipe))
    if len(components) == 1 and next(iter(weights.values())) == 1.0:
        only = next(iter(components.values()))
        if not _runs_its_own_teacher_per_precision(only):
            return only
    return WeightedCombinationLoss(student, components, weights)

