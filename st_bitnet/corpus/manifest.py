"""``manifest.json`` of a corpus encoding run: settings, calibration, shards, counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "st_bitnet.corpus_codes"
MANIFEST_VERSION = 1
# Settings that decide which codes a shard holds: a resumed run must match them exactly.
RESUME_KEYS = ("model", "bits", "shard_size", "batch_size", "encode_kwargs", "source", "count")


def manifest_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / MANIFEST_NAME


def read_manifest(output_dir: str | os.PathLike) -> dict:
    """The manifest of an encoding run.

    Raises:
        FileNotFoundError: If ``output_dir`` holds none.
        ValueError: For a file of another format or a newer version.
    """
    path = manifest_path(output_dir)
    if not path.exists():
        raise FileNotFoundError(f"{output_dir} holds no {MANIFEST_NAME}; was it written by encode_corpus?")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an st_bitnet corpus manifest (format {manifest.get('format')!r}).")
    if int(manifest.get("version", 0)) > MANIFEST_VERSION:
        raise ValueError(f"{path} was written by a newer st_bitnet (version {manifest['version']}).")
    return manifest


def write_manifest(output_dir: str | os.PathLike, manifest: dict) -> None:
    """Write the manifest atomically (temporary file, fsync, rename)."""
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest}
    atomic_write_bytes(manifest_path(output_dir), (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def check_resumable(existing: dict, settings: dict, output_dir) -> None:
    """Raise ``ValueError`` naming every setting that differs from the run already in ``output_dir``."""
    differences = [
        f"{key}: stored {existing.get(key)!r}, now {settings.get(key)!r}"
        for key in RESUME_KEYS
        if key in settings and existing.get(key) != settings.get(key)
    ]
    if differences:
        raise ValueError(
            f"{output_dir} holds an encoding run with other settings, so its shards cannot be reused ("
            + "; ".join(differences)
            + "). Use a new output folder, or the same settings to resume."
        )
