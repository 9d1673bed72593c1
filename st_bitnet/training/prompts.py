"""The prompt sentence-transformers' trainer prepends to a training column, for the code that embeds training texts
outside the trainer (teacher labels, mined negatives, calibration texts): it must see the texts the trainer feeds."""

from __future__ import annotations

from typing import Any


def prompt_for(prompts: Any, dataset_name: str | None, column: str) -> str:
    """The prompt of ``column`` under the trainer's ``prompts`` (a str, {column: str}, {dataset: str} or
    {dataset: {column: str}}); "" where none applies."""
    if isinstance(prompts, str):
        return prompts
    if not isinstance(prompts, dict):
        return ""
    if dataset_name is not None and isinstance(prompts.get(dataset_name), (dict, str)):
        return prompt_for(prompts[dataset_name], None, column)
    value = prompts.get(column)
    return value if isinstance(value, str) else ""


def column_prompts(prompts: Any, dataset_name: str | None, columns) -> dict[str, str]:
    """{column: prompt} for the columns that get a non-empty prompt."""
    found = {column: prompt_for(prompts, dataset_name, column) for column in columns}
    return {column: prompt for column, prompt in found.items() if prompt}
