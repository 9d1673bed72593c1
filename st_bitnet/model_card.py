"""Model cards for saved / pushed BitEmbed models: ``write_model_card(model_dir, ...)`` -> ``README.md``.

The card is rendered from the Jinja2 template ``model_cards/bitembed.md.j2`` and holds: YAML front matter
(``library_name: sentence-transformers``, ``pipeline_tag: sentence-similarity``, tags incl. ``bitnet``,
``base_model`` when known), the conversion settings, the training recipe, storage per vector at each output
precision, the evaluation table per precision with the trade-off plot, and usage snippets (tested to run).

Example::

    import st_bitnet
    from st_bitnet.model_card import write_model_card
    from st_bitnet.evaluation import run_evaluation

    folder = st_bitnet.save_pretrained(model, "my-bitembed")
    results = run_evaluation(str(folder), "my-bitembed-eval", teacher="sentence-transformers/all-MiniLM-L6-v2")
    write_model_card(folder, eval_results=results, repo_id="me/my-bitembed")
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

TEMPLATE_NAME = "bitembed.md.j2"
PLOT_ASSET = "assets/precision_tradeoff.png"
BASE_TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "bitnet", "ternary", "1.58-bit",
             "st_bitnet", "bitembed"]


def template_path() -> Path:
    """The card template: ``<repo>/model_cards/`` (source checkouts, editable installs), else the copy a wheel
    installs under ``<prefix>/share/st_bitnet/model_cards/``."""
    import sys

    here = Path(__file__).resolve().parent
    candidates = (
        here / "model_cards" / TEMPLATE_NAME,
        here.parent / "model_cards" / TEMPLATE_NAME,
        Path(sys.prefix) / "share" / "st_bitnet" / "model_cards" / TEMPLATE_NAME,
    )
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"Model card template {TEMPLATE_NAME} not found next to st_bitnet or in <repo>/model_cards/.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _folder_facts(model_dir: Path) -> dict[str, Any]:
    """What the saved folder says about itself (all optional: a card must render for any folder)."""
    config = _read_json(model_dir / "config.json")
    modules = _read_json(model_dir / "modules.json")
    modules = modules if isinstance(modules, list) else []
    facts: dict[str, Any] = {"config": config, "dimension": None, "pooling": None, "quantizer": False}
    # sentence-transformers < 6 keeps max_seq_length in sentence_bert_config.json; 6.x in the tokenizer config.
    facts["max_seq_length"] = _read_json(model_dir / "sentence_bert_config.json").get("max_seq_length") or _read_json(
        model_dir / "tokenizer_config.json").get("model_max_length")
    for module in modules:
        module_type = str(module.get("type", ""))
        module_config = _read_json(model_dir / module.get("path", "") / "config.json") if module.get("path") else {}
        if "Pooling" in module_type:
            facts["dimension"] = facts["dimension"] or module_config.get("word_embedding_dimension") or module_config.get(
                "embedding_dimension")
            mode = module_config.get("pooling_mode") or next(
                (k.replace("pooling_mode_", "").replace("_tokens", "") for k, v in module_config.items()
                 if k.startswith("pooling_mode_") and v is True), None)
            facts["pooling"] = mode
        if "Dense" in module_type and module_config.get("out_features"):
            facts["dimension"] = module_config["out_features"]
        if "MultiPrecisionQuantizer" in module_type:
            facts["quantizer"] = True
    backbone_config = config.get("backbone_config", config) if isinstance(config.get("backbone_config"), dict) else config
    facts["dimension"] = facts["dimension"] or backbone_config.get("hidden_size")
    facts["backbone"] = backbone_config.get("model_type") or config.get("model_type")
    if backbone_config.get("num_hidden_layers"):
        facts["backbone"] = (f"{facts['backbone']}, {backbone_config['num_hidden_layers']} layers, hidden size "
                             f"{backbone_config.get('hidden_size')}")
    facts["record"] = config.get("st_bitnet") or backbone_config.get("st_bitnet") or {}
    facts["bitembed"] = config.get("model_type") == "bitembed"
    facts["name_or_path"] = config.get("_name_or_path")
    return facts


def _looks_like_hub_id(name: Any) -> bool:
    return isinstance(name, str) and name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/"))


def _as_recipe_text(recipe: Any) -> str | None:
    if recipe is None:
        return None
    if isinstance(recipe, (str, os.PathLike)) and Path(recipe).is_file():
        return Path(recipe).read_text(encoding="utf-8").strip()
    if isinstance(recipe, str):
        return recipe.strip()
    if hasattr(recipe, "to_dict"):
        recipe = recipe.to_dict()
    elif hasattr(recipe, "__dataclass_fields__"):
        import dataclasses

        recipe = dataclasses.asdict(recipe)
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False).strip()


def _load_eval_results(eval_results: Any) -> dict[str, Any] | None:
    if eval_results is None or isinstance(eval_results, dict):
        return eval_results
    from st_bitnet.evaluation.report import load_results

    return load_results(eval_results)


def _conversion_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, value in record.items():
        if key in ("converted_modules", "unconverted_linears"):
            value = f"{len(value)} module{'s' if len(value) != 1 else ''}" + (f": {', '.join(value[:6])}{' ...' if len(value) > 6 else ''}" if value else "")
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "(none)"
        rows.append((key, str(value)))
    return rows


def _storage_rows(dimension: int | None) -> list[dict[str, str]]:
    if not dimension:
        return []
    from .multi_precision.precision import BITS, FLOAT32_BITS, bytes_per_vector

    reference = bytes_per_vector(dimension, FLOAT32_BITS)
    rows = []
    for bits in (FLOAT32_BITS, *BITS):
        size = bytes_per_vector(dimension, bits)
        rows.append({
            "label": "float32" if bits == FLOAT32_BITS else f"{bits}-bit",
            "bytes": str(size),
            "ratio": "1x" if bits == FLOAT32_BITS else f"{reference / size:.3g}x smaller",
        })
    return rows


def write_model_card(
    model_dir: str | os.PathLike,
    *,
    conversion: dict[str, Any] | None = None,
    recipe: Any = None,
    eval_results: dict[str, Any] | str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    extra_tags: list[str] | None = None,
) -> Path:
    """Write ``README.md`` (the model card) into a saved model folder and return its path.

    Args:
        model_dir: the saved folder (``st_bitnet.save_pretrained`` / ``SentenceTransformer.save``).
        conversion: the conversion record (``config.st_bitnet``); read from the folder's config when None.
        recipe: the training recipe: a dict, a recipe object (``to_dict`` / dataclass), YAML text or a YAML path.
        eval_results: a precision-sweep result (``st_bitnet.evaluation.run_evaluation``) or its JSON path / folder.
        plot_path: a PNG to embed (copied to ``assets/``); defaults to the sweep's trade-off plot when it exists.
        repo_id: the Hub id the card's snippets load (default: the folder path).
        base_model: the model it was converted from (front matter ``base_model``); guessed from the recipe /
            config when None.
        license: front matter licence (e.g. the base model's).
        extra_tags: more front matter tags.

    Returns:
        Path of the written ``README.md``.
    """
    import jinja2

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model_dir {model_dir} is not a folder; save the model first.")
    facts = _folder_facts(model_dir)
    record = dict(conversion if conversion is not None else facts["record"])
    recipe_text = _as_recipe_text(recipe)
    recipe_dict = recipe if isinstance(recipe, dict) else {}
    if base_model is None:
        for candidate in (recipe_dict.get("base_model"), recipe_dict.get("model"), record.get("base_model"),
                          facts.get("name_or_path")):
            if _looks_like_hub_id(candidate):
                base_model = candidate
                break
    results = _load_eval_results(eval_results)
    if plot_path is None and results:
        candidate = (results.get("files") or {}).get("tradeoff_plot")
        plot_path = candidate if candidate and Path(candidate).exists() else None
    plot_file = None
    if plot_path is not None:
        target = model_dir / PLOT_ASSET
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(plot_path).resolve() != target.resolve():
            shutil.copyfile(plot_path, target)
        plot_file = PLOT_ASSET

    eval_table = eval_intro = None
    if results:
        from st_bitnet.evaluation.report import format_table

        eval_table = format_table(results).strip()
        task_list = ", ".join(t["name"] for t in results["tasks"])
        eval_intro = (
            f"Main score per task (x100) at each output precision on {task_list} "
            f"({'st_bitnet dev protocol: dev splits and fixed held-out slices, never trained on' if results.get('protocol') == 'st_bitnet-dev-v1' else 'mteb tasks'})"
            + (", next to the teacher (float32 reference and post-hoc quantized)." if results.get("teacher") else ".")
            + " These are development numbers, not MTEB test-set results."
        )

    front = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
             "tags": BASE_TAGS + [t for t in (extra_tags or []) if t not in BASE_TAGS]}
    if base_model:
        front["base_model"] = base_model
    if license:
        front["license"] = license
    if facts["bitembed"]:
        front["tags"].append("custom_code")

    model_ref = repo_id or str(model_dir.resolve())
    from .multi_precision.precision import bytes_per_vector
    from .version import __version__ as st_bitnet_version

    dimension = facts["dimension"]
    if dimension is None and results:
        dimension = results["model"].get("embedding_dim")
    quantizer_description = (
        "trained per-dimension ranges stored in the model's MultiPrecisionQuantizer" if facts["quantizer"]
        else "post-hoc per-dimension ranges, as sentence-transformers' quantize_embeddings"
    )
    converted = record.get("converted_modules") or []
    unconverted = record.get("unconverted_linears") or []
    context = {
        "front_matter": yaml.safe_dump(front, sort_keys=False, default_flow_style=False),
        "title": repo_id.split("/")[-1] if repo_id else model_dir.resolve().name,
        "base_model": base_model if _looks_like_hub_id(base_model) else None,
        "st_bitnet_version": st_bitnet_version,
        "dimension": dimension,
        "max_seq_length": facts["max_seq_length"],
        "pooling": facts["pooling"],
        "backbone": facts["backbone"],
        "n_converted": len(converted) if converted else "unknown",
        "n_unconverted": len(unconverted),
        "unconverted": ", ".join(f"`{u}`" for u in unconverted[:8]) + (" ..." if len(unconverted) > 8 else ""),
        "packed": bool(record.get("packed")),
        "loading_note": (
            "`SentenceTransformer(..., trust_remote_code=True)` (own `bitembed` class) or `st_bitnet.load(...)`"
            if facts["bitembed"] else
            "`SentenceTransformer(...)` (transformers' `bitnet` quantization format) or `st_bitnet.load(...)`"
        ),
        "trust_remote_code": facts["bitembed"],
        "has_quantizer": facts["quantizer"],
        "conversion_rows": _conversion_rows(record) or [("(not recorded)", "")],
        "recipe_text": recipe_text,
        "storage_rows": _storage_rows(dimension),
        "one_bit_bytes": str(bytes_per_vector(dimension, 1)) if dimension else "ceil(dim/8)",
        "quantizer_description": quantizer_description,
        "eval_table": eval_table,
        "eval_intro": eval_intro,
        "plot_file": plot_file,
        "model_ref": model_ref,
    }
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_path().parent)), keep_trailing_newline=True,
        autoescape=False, undefined=jinja2.StrictUndefined,
    )
    text = environment.get_template(TEMPLATE_NAME).render(**context)
    readme = model_dir / "README.md"
    readme.write_text(text, encoding="utf-8")
    return readme


def card_code_blocks(readme: str | os.PathLike, language: str = "python") -> list[str]:
    """The fenced code blocks of one language in a card (used by the tests that run the snippets)."""
    text = Path(readme).read_text(encoding="utf-8")
    blocks, current, inside = [], [], False
    for line in text.splitlines():
        if not inside and line.strip() == f"```{language}":
            inside, current = True, []
        elif inside and line.strip() == "```":
            inside = False
            blocks.append("\n".join(current) + "\n")
        elif inside:
            current.append(line)
    return blocks
