"""The error a malformed recipe raises (its own module: every training module raises it)."""


class RecipeError(ValueError):
    """The recipe is malformed; raised before any model or dataset is loaded."""
