"""The recipe's ``loss`` section built into loss objects: one component as is, several as a
:class:`~st_bitnet.losses.WeightedCombinationLoss`; ``multi_precision`` on a component wraps it in
:class:`~st_bitnet.losses.MultiPrecisionLoss`."""

from __future__ import annotations

import inspect

from .loss_types import loss_class
from .errors import RecipeError
from .recipe import Recipe
from .recipe_specs import LossComponentSpec, MultiPrecisionSpec


def _instantiate_loss(name: str, component: LossComponentSpec, student, teacher, model_spec: MultiPrecisionSpec | None = None):
    """One loss from its recipe component; a nested ``{type: ...}`` argument (a wrapper's inner loss) is built too,
    and ``multi_precision`` wraps the component in ``MultiPrecisionLoss``."""
    from .recipe_sections import parse_loss_multi_precision

    wrap = parse_loss_multi_precision(name, component, model_spec)
    cls = loss_class(component.type)
    params = dict(component.options)
    if component.teacher is not None:
        params["teacher"] = component.teacher  # "self" (self-distillation, checked by parse_recipe): no teacher model
    elif "teacher" in inspect.signature(cls.__init__).parameters:
        precomputed = component.precompute_teacher_scores or component.precompute_teacher_embeddings
        params["teacher"] = None if precomputed else teacher
    for key, value in params.items():
        if isinstance(value, dict) and "type" in value:
            if "weight" in value:
                raise RecipeError(f"loss component {name!r}: the inner loss {key!r} takes no weight (only components do)")
            inner = LossComponentSpec.from_component(value)
            params[key] = _instantiate_loss(f"{name}.{key}", inner, student, teacher, model_spec)
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
    for name, component in recipe.loss.items():
        weights[name] = component.weight
        components[name] = _instantiate_loss(name, component, student, teacher, recipe.model.multi_precision)
    if len(components) == 1 and next(iter(weights.values())) == 1.0:
        only = next(iter(components.values()))
        if not _runs_its_own_teacher_per_precision(only):
            return only
    return WeightedCombinationLoss(student, components, weights)

