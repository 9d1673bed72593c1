"""st_bitnet's sentence-transformers modules, shipped inside saved folders for users without st_bitnet.

sentence-transformers 6 imports a module class outside its own package only with ``trust_remote_code=True``, and
then only from the folder (dynamic module) or an installed package. A saved folder therefore carries a small
shim, ``st_bitnet_modules.py``, and the source files of the classes it names; ``modules.json`` refers to
``st_bitnet_modules.<Class>``. The shim imports st_bitnet's own classes when st_bitnet is installed (same code, and
isinstance checks keep working), else the shipped copies (torch, numpy, safetensors, sentence-transformers only).

:func:`st_bitnet.load` maps those references to the installed classes itself, so it needs no
``trust_remote_code``: nothing from the folder runs.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import torch

SHIM_MODULE = "st_bitnet_modules"
# Class name -> the st_bitnet module defining it (the shipped copy keeps the file name).
SHIPPED_CLASSES = {
    "MultiPrecisionQuantizer": "st_bitnet.multi_precision.quantizer",
    "QuantizationAwarePooling": "st_bitnet.multi_precision.pooling",
}


def _shim_source(class_names: list[str]) -> str:
    installed = "\n".join(
        f"    from {SHIPPED_CLASSES[name]} import {name}  # noqa: F401" for name in class_names
    )
    shipped = "\n".join(
        f"    from .{SHIPPED_CLASSES[name].rsplit('.', 1)[1]} import {name}  # noqa: F401" for name in class_names
    )
    return (
        '"""st_bitnet modules of this model (written by st_bitnet.save_pretrained; load with trust_remote_code=True).\n\n'
        "st_bitnet's own classes when st_bitnet is installed, else the copies shipped next to this file.\n"
        '"""\n\n'
        f"try:\n{installed}\nexcept ImportError:\n{shipped}\n"
    )


def ship_module_code(folder: str | Path) -> list[str]:
    """Point ``modules.json`` entries of st_bitnet module classes at the shipped shim and copy their code.

    Args:
        folder: a folder written by ``SentenceTransformer.save``.

    Returns:
        The file names written into ``folder`` (empty when the model has no st_bitnet module).
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = Path(folder)
    modules_path = folder / "modules.json"
    if not modules_path.exists():
        return []
    modules = json.loads(modules_path.read_text())
    names = []
    for entry in modules:
        module_path, _, class_name = entry["type"].rpartition(".")
        if SHIPPED_CLASSES.get(class_name) == module_path:
            entry["type"] = f"{SHIM_MODULE}.{class_name}"
            names.append(class_name)
    if not names:
        return []
    sources = set()
    for class_name in names:
        module_file = Path(importlib.import_module(SHIPPED_CLASSES[class_name]).__file__)
        sources.update([module_file, *map(Path, get_relative_import_files(str(module_file)))])
    written = []
    for source in sorted(sources):
        shutil.copyfile(source, folder / source.name)
        written.append(source.name)
    (folder / f"{SHIM_MODULE}.py").write_text(_shim_source(sorted(set(names))), encoding="utf-8")
    modules_path.write_text(json.dumps(modules, indent=2), encoding="utf-8")
    return [f"{SHIM_MODULE}.py", *written]


def installed_module_class(class_ref: str) -> type | None:
    """st_bitnet's installed class for a ``modules.json`` type, or None when the type is not st_bitnet's.

    Covers the shim references written by :func:`ship_module_code` and the plain ``st_bitnet.*`` references of
    folders saved before it (or with ``SentenceTransformer.save``). Other types are left to sentence-transformers
    (and its ``trust_remote_code`` gate).
    """
    module_path, _, class_name = class_ref.rpartition(".")
    if module_path == SHIM_MODULE and class_name in SHIPPED_CLASSES:
        module_path = SHIPPED_CLASSES[class_name]
    elif not module_path.startswith("st_bitnet."):
        return None
    cls = getattr(importlib.import_module(module_path), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"modules.json names {class_ref!r}, which is not an st_bitnet module class")
    return cls


def installed_module_classes(folder: str | Path) -> dict[str, type]:
    """``modules.json`` type -> st_bitnet's installed class, for every st_bitnet module of a saved folder."""
    modules_path = Path(folder) / "modules.json"
    if not modules_path.exists():
        return {}
    refs = [entry["type"] for entry in json.loads(modules_path.read_text())]
    return {ref: cls for ref in refs if (cls := installed_module_class(ref)) is not None}
