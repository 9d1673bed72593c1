"""``encode_corpus``: a whole corpus to Parquet shards of packed codes, resumable, on one or many machines."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..multi_precision import PRECISION_NAMES, MultiPrecisionIndex, resolve_bits
from .calibration import (
    calibration_rows,
    load_calibration,
    quantizer_digest,
    quantizer_state,
    resolve_quantizer,
    save_calibration,
)
from .manifest import check_resumable, manifest_path, read_manifest, write_manifest
from .shards import SHARD_DIR, TEMP_SUFFIX, load_codes, read_shard, read_shard_metadata, shard_name, write_shard
from .sources import CorpusSource, ids_digest

ENGINES = ("single", "multiprocess", "ray")
INDEX_DIR = "index"
INDEX_IDS = "ids.json"


def _model_id(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    try:
        config = model[0].auto_model.config
        return str(getattr(config, "_name_or_path", "") or "in-memory model")
    except (AttributeError, IndexError, TypeError):
        return "in-memory model"


def _load_model(model, load_kwargs: dict):
    if not isinstance(model, (str, os.PathLike)):
        return model
    from ..sentence_transformer import load

    return load(os.fspath(model), **load_kwargs)


def _shard_inputs(source: CorpusSource, shards: list[int], shard_size: int, count: int):
    """``(index, ids, texts)`` of the listed shards, read in one forward pass over the source."""
    wanted = set(shards)
    start, stop = min(shards) * shard_size, min(count, (max(shards) + 1) * shard_size)
    ids, texts, current = [], [], min(shards)
    for row, (doc_id, text) in enumerate(source.iter_rows(start, stop), start=start):
        index = row // shard_size
        if index != current:
            if current in wanted:
                yield current, ids, texts
            ids, texts, current = [], [], index
        if index in wanted:
            ids.append(doc_id)
            texts.append(text)
    if current in wanted and ids:
        yield current, ids, texts


def verify_shard(path: Path, index: int, expected: dict) -> dict:
    """Check a shard on disk is the one this run would write: range, row count, ids, quantizer, columns.

    Raises:
        ValueError: Naming what differs.
    """
    metadata = read_shard_metadata(path)
    for key in ("index", "start", "stop", "ids_sha256", "calibration_sha256", "bits"):
        if metadata.get(key) != expected[key]:
            raise ValueError(
                f"{path} does not match this run ({key}: on disk {metadata.get(key)!r}, expected {expected[key]!r}). "
                "The source or the settings changed since it was written; use a new output folder."
            )
    ids, _ = read_shard(path)
    if len(ids) != expected["stop"] - expected["start"] or ids_digest(ids) != expected["ids_sha256"]:
        raise ValueError(f"{path} holds {len(ids)} rows whose ids do not match its own record; it is damaged.")
    return metadata


def encode_corpus(
    model,
    source: CorpusSource | str | os.PathLike,
    output_dir: str | os.PathLike,
    precisions: list[str | int] | tuple[str | int, ...] = ("8bit", "1bit"),
    shard_size: int = 10_000,
    batch_size: int = 32,
    engine: str = "single",
    workers: int = 2,
    devices: list[str] | None = None,
    quantizer=None,
    calibration_size: int = 2048,
    index: bool = False,
    id_field: str = "id",
    text_field: str = "text",
    source_format: str | None = None,
    encode_kwargs: dict | None = None,
    load_kwargs: dict | None = None,
    ray_num_cpus: float = 1,
    ray_num_gpus: float = 0,
    ray_window_rows: int = 1_000_000,
    show_progress: bool = True,
    on_shard_written: Callable[[int, Path], None] | None = None,
) -> dict:
    """Encode a corpus into Parquet shards of packed codes plus a manifest; rerun the same call to resume.

    Shard ``i`` holds the source rows ``[i * shard_size, (i + 1) * shard_size)``. Each shard is written to a
    temporary file, fsynced and renamed, so a killed run leaves only complete shards; a rerun verifies those (range,
    ids, quantizer) and encodes the rest. The output quantizer is fixed once per run (the model's trained
    :class:`~st_bitnet.multi_precision.MultiPrecisionQuantizer`, ``quantizer``, or post-hoc ranges measured on
    ``calibration_size`` rows spread over the corpus), stored in ``<output_dir>/calibration/`` and recorded by digest
    in the manifest, so every shard and worker uses the same ranges.

    Args:
        model: A ``SentenceTransformer`` or a folder / Hub id (loaded with :func:`st_bitnet.load`; required as a
            path for ``engine="ray"``, whose workers load it themselves).
        source: A :class:`CorpusSource`, or a ``.jsonl`` / ``.parquet`` file or BEIR folder.
        output_dir: Where ``manifest.json``, ``calibration/``, ``shards/`` (and ``index/``) go. Must be new, empty
            or hold a run with the same settings.
        precisions: Stored precisions: ``"16bit"`` (float16 values), ``"8bit"``, ``"4bit"``, ``"2bit"``, ``"1bit"``.
        shard_size: Rows per shard.
        batch_size: Texts per forward pass (also part of the batch plan every engine shares).
        engine: ``"single"``, ``"multiprocess"`` (sentence-transformers' pool on ``devices`` or ``workers`` CPUs) or
            ``"ray"`` (Ray Data, ``workers`` actors; call ``ray.init`` first).
        workers: Pool processes / Ray actors.
        devices: Pool devices (default ``["cpu"] * workers``).
        quantizer: An explicit quantizer (overrides the model's and post-hoc calibration).
        calibration_size: Rows embedded for post-hoc ranges (models without a trained quantizer).
        index: Also build and save a :class:`~st_bitnet.multi_precision.MultiPrecisionIndex` (needs ``"1bit"`` and a
            wider precision) in ``<output_dir>/index`` with the ids in ``ids.json``.
        id_field / text_field / source_format: How to read a path ``source`` (see :class:`CorpusSource`).
        encode_kwargs: Extra ``model.encode`` options (``prompt_name``, ...), recorded in the manifest.
        load_kwargs: Extra :func:`st_bitnet.load` options (``trust_remote_code``, ``device``).
        ray_num_cpus / ray_num_gpus / ray_window_rows: Ray actor resources and rows per Ray Data run.
        show_progress: A tqdm bar over rows (with rows/s).
        on_shard_written: Called as ``fn(index, path)`` after each shard is durable.

    Returns:
        The final manifest (``count``, ``dim``, ``shards``, ``calibration``, ``throughput`` of this call...).

    Raises:
        ValueError: Bad settings, a folder holding another run or foreign files, or a shard that fails verification.

    Example:
        ::

            from st_bitnet.corpus import encode_corpus, load_codes

            encode_corpus("bitembed-minilm", "scifact/", "scifact_codes", precisions=["8bit", "1bit"], index=True)
            ids, codes = load_codes("scifact_codes", "1bit")
    """
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; expected one of {ENGINES}.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    bits = sorted({resolve_bits(p) for p in precisions}, reverse=True)
    if not bits:
        raise ValueError("precisions must name at least one precision.")
    if index and (1 not in bits or len(bits) < 2):
        raise ValueError("index=True needs '1bit' (first stage) and a wider precision (rescoring) in precisions.")
    if engine == "ray" and not isinstance(model, (str, os.PathLike)):
        raise ValueError("engine='ray' loads the model in every worker: pass a saved folder or Hub id, not an object.")
    encode_kwargs, load_kwargs = dict(encode_kwargs or {}), dict(load_kwargs or {})
    if not isinstance(source, CorpusSource):
        source = CorpusSource(os.fspath(source), format=source_format, id_field=id_field, text_field=text_field)
    output_dir = Path(output_dir)
    shard_dir = output_dir / SHARD_DIR
    count = source.count()
    if count == 0:
        raise ValueError(f"{source.data_file} holds no rows.")
    settings = {
        "model": _model_id(model),
        "bits": bits,
        "precisions": [PRECISION_NAMES[b] for b in bits],
        "shard_size": shard_size,
        "batch_size": batch_size,
        "encode_kwargs": encode_kwargs,
        "source": source.describe(),
        "count": count,
    }
    st_model = None
    local = None

    def local_engine():  # the driver's own model: calibration and the single / multiprocess engines
        nonlocal st_model, local
        if local is None:
            from .engines import SingleProcessEngine

            st_model = _load_model(model, load_kwargs)
            local = SingleProcessEngine(st_model, None, "", bits, batch_size, encode_kwargs)
        return local

    if manifest_path(output_dir).exists():
        manifest = read_manifest(output_dir)
        check_resumable(manifest, settings, output_dir)
        calibration = manifest["calibration"]
        run_quantizer = load_calibration(output_dir, calibration["sha256"]) if calibration["sha256"] else None
    else:
        if output_dir.exists() and any(output_dir.iterdir()):
            raise ValueError(f"{output_dir} is not empty and holds no encoding run; refusing to write into it.")
        run_quantizer, calibration = None, {"kind": "none", "sha256": "", "rows": 0}
        if any(b != 16 for b in bits):
            sample = calibration_rows(count, calibration_size)

            def calibration_embeddings():
                if show_progress:
                    print(f"[encode-corpus] calibrating post-hoc ranges on {len(sample)} of {count} rows", flush=True)
                wanted, texts = set(sample), []
                for row, (_, text) in enumerate(source.iter_rows()):
                    if row in wanted:
                        texts.append(text)
                return local_engine().embed(texts)

            run_quantizer, kind = resolve_quantizer(
                local_engine().model if quantizer is None else None, quantizer, calibration_embeddings
            )
            missing = [b for b in bits if b != 16 and b not in run_quantizer.precisions]
            if missing:
                raise ValueError(f"The {kind} quantizer serves {run_quantizer.precisions} bits, not {missing}.")
            if kind == "trained" and encode_kwargs.get("normalize_embeddings"):
                raise ValueError("normalize_embeddings would change the embeddings the trained quantizer's ranges fit.")
            calibration = {
                "kind": kind,
                "sha256": quantizer_digest(run_quantizer),
                "rows": len(sample) if kind == "posthoc" else 0,
                "method": "minmax ranges, sign 1-bit (sentence-transformers' recipe)" if kind == "posthoc" else kind,
                "folder": "calibration",
            }
        output_dir.mkdir(parents=True, exist_ok=True)
        if run_quantizer is not None:
            save_calibration(run_quantizer, output_dir)
            run_quantizer = load_calibration(output_dir, calibration["sha256"])  # every shard uses the stored copy
        manifest = {**settings, "dim": None, "calibration": calibration, "status": "running", "shards": []}
        write_manifest(output_dir, manifest)
    shard_dir.mkdir(parents=True, exist_ok=True)
    for leftover in shard_dir.glob(f"*{TEMP_SUFFIX}"):  # a killed run's unfinished shard: never renamed, never valid
        leftover.unlink()

    digest = calibration["sha256"]
    num_shards = -(-count // shard_size)
    expected = {}
    done, todo = {}, []
    # One pass over the source gives every shard's id digest (what a shard on disk must match).
    ids_by_shard: list[list[str]] = [[] for _ in range(num_shards)]
    for row, (doc_id, _) in enumerate(source.iter_rows()):
        ids_by_shard[row // shard_size].append(doc_id)
    for i in range(num_shards):
        expected[i] = {
            "index": i, "start": i * shard_size, "stop": min(count, (i + 1) * shard_size),
            "ids_sha256": ids_digest(ids_by_shard[i]), "calibration_sha256": digest, "bits": bits,
        }
        path = shard_dir / shard_name(i)
        if path.exists():
            done[i] = verify_shard(path, i, expected[i])
        else:
            todo.append(i)
    del ids_by_shard

    dim = manifest.get("dim")
    if todo:
        if engine == "ray":
            from .ray_engine import RayEngine

            if dim is None:
                dim = int(local_engine().embed(["dimension probe"]).shape[1]) if run_quantizer is None else run_quantizer.embedding_dimension
            runner = RayEngine(
                os.fspath(model), load_kwargs, quantizer_state(run_quantizer) if run_quantizer is not None else None,
                digest, bits, batch_size, encode_kwargs, dim, concurrency=workers, num_cpus=ray_num_cpus,
                num_gpus=ray_num_gpus, window_rows=ray_window_rows,
            )
        elif engine == "multiprocess":
            from .engines import MultiProcessEngine

            base = local_engine()
            runner = MultiProcessEngine(base.model, run_quantizer, digest, bits, batch_size, encode_kwargs,
                                        devices or ["cpu"] * workers)
        else:
            runner = local_engine()
            runner.quantizer, runner.digest = run_quantizer, digest
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=count, initial=sum(e["stop"] - e["start"] for i, e in expected.items() if i in done),
                            unit="text", desc=f"encode-corpus ({engine})", smoothing=0.1)
        start_time, encoded = time.perf_counter(), 0
        try:
            for index_, ids, columns, worker_digest in runner.encode_shards(_shard_inputs(source, todo, shard_size, count)):
                if worker_digest != digest:
                    raise RuntimeError(f"Shard {index_} was quantized with {worker_digest[:12]}, not {digest[:12]}.")
                if dim is None:
                    first = columns[bits[0]]
                    dim = first.shape[1] if bits[0] == 16 else run_quantizer.embedding_dimension
                    manifest["dim"] = dim
                    write_manifest(output_dir, manifest)
                path = shard_dir / shard_name(index_)
                write_shard(path, ids, columns, dim, expected[index_])
                done[index_] = expected[index_]
                encoded += len(ids)
                if progress is not None:
                    progress.update(len(ids))
                if on_shard_written is not None:
                    on_shard_written(index_, path)
        finally:
            runner.close()
            if progress is not None:
                progress.close()
        seconds = time.perf_counter() - start_time
    else:
        encoded, seconds = 0, 0.0
    missing = [i for i in range(num_shards) if i not in done]
    if missing:
        raise RuntimeError(f"Shards {missing[:10]} were not produced by the {engine} engine.")
    manifest.update(
        dim=dim,
        status="complete",
        num_shards=num_shards,
        shards=[{"file": shard_name(i), "start": e["start"], "stop": e["stop"], "ids_sha256": e["ids_sha256"]}
                for i, e in sorted(expected.items())],
        last_run={"engine": engine, "workers": workers if engine != "single" else 1, "texts_encoded": encoded,
                  "seconds": round(seconds, 3), "texts_per_second": round(encoded / seconds, 2) if seconds else None,
                  "shards_reused": num_shards - len(todo)},
    )
    write_manifest(output_dir, manifest)
    if index:
        manifest["index"] = build_index(output_dir, bits)
        write_manifest(output_dir, manifest)
    return read_manifest(output_dir)


def build_index(output_dir: str | os.PathLike, bits: list[int]) -> dict:
    """Save a :class:`MultiPrecisionIndex` (1-bit first stage, widest stored precision rescoring) and its ids."""
    output_dir = Path(output_dir)
    rescore_bits = bits[0]
    ids, store = load_codes(output_dir, rescore_bits)
    _, first_stage = load_codes(output_dir, 1)
    index = MultiPrecisionIndex(store, first_stage_bits=1, first_stage=first_stage, backend="numpy")
    folder = output_dir / INDEX_DIR
    index.save(folder)
    (folder / INDEX_IDS).write_text(json.dumps(ids), encoding="utf-8")
    return {"folder": INDEX_DIR, "first_stage": "1bit", "rescore": PRECISION_NAMES[rescore_bits], "ids": INDEX_IDS}
