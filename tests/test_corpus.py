"""Corpus-scale encoding: sources, shards, the stored calibration, resuming, engines, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from st_bitnet.corpus import CorpusSource, encode_corpus, load_codes, read_manifest, read_shard  # noqa: E402
from st_bitnet.corpus.calibration import quantizer_digest  # noqa: E402
from st_bitnet.corpus.shards import read_shard_metadata  # noqa: E402
from st_bitnet.multi_precision import MultiPrecisionIndex, QuantizedEmbeddings, encode, posthoc_quantizer  # noqa: E402

from conftest import REPO, WORDS  # noqa: E402

N_DOCS = 45
SHARD = 8  # 6 shards, the last one short


def write_corpus(path, n=N_DOCS, seed=0, id_key="id", text_key="text"):
    rng = np.random.default_rng(seed)
    rows = [{id_key: f"doc-{i}", text_key: " ".join(rng.choice(WORDS, size=int(rng.integers(1, 20))))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_model_dir, device="cpu")


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    return path, write_corpus(path)


def run(model, source, out, **kwargs):
    kwargs.setdefault("precisions", ["16bit", "8bit", "1bit"])
    return encode_corpus(model, source, out, shard_size=SHARD, batch_size=4, show_progress=False, **kwargs)


def codes_of(out):
    return {p: load_codes(out, p) for p in ("16bit", "8bit", "1bit")}


# ---- sources ---------------------------------------------------------------------------------------------------------
def test_sources_read_jsonl_parquet_and_beir_in_file_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = write_corpus(tmp_path / "c.jsonl", n=10, id_key="doc_id", text_key="body")
    jsonl = CorpusSource(str(tmp_path / "c.jsonl"), id_field="doc_id", text_field="body")
    assert jsonl.count() == 10
    assert list(jsonl.iter_rows(3, 6)) == [(r["doc_id"], r["body"]) for r in rows[3:6]]

    table = pa.table({"doc_id": [r["doc_id"] for r in rows], "body": [r["body"] for r in rows]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=3)  # ranges cross row groups
    parquet = CorpusSource(str(tmp_path / "c.parquet"), id_field="doc_id", text_field="body")
    assert parquet.format == "parquet" and parquet.count() == 10
    assert list(parquet.iter_rows(2, 8)) == [(r["doc_id"], r["body"]) for r in rows[2:8]]

    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text(
        json.dumps({"_id": "a", "title": "Title", "text": "body one"}) + "\n" + json.dumps({"_id": 7, "text": "two"}) + "\n"
    )
    assert list(CorpusSource(str(beir)).iter_rows()) == [("a", "Title body one"), ("7", "two")]


def test_sources_reject_bad_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "ok"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(ValueError, match="no field 'text'"):
        list(CorpusSource(str(path)).iter_rows())
    path.write_text(json.dumps({"id": "a", "text": 3}) + "\n")
    with pytest.raises(ValueError, match="not a string"):
        list(CorpusSource(str(path)).iter_rows())
    with pytest.raises(ValueError, match="format"):
        CorpusSource(str(tmp_path / "bad.jsonl"), format="csv")
    with pytest.raises(FileNotFoundError):
        CorpusSource(str(tmp_path / "missing.jsonl"))


# ---- one process ------------------------------------------------------------------------------------------------------
def test_single_process_codes_match_encode_with_the_stored_calibration(model, corpus, tmp_path):
    path, rows = corpus
    out = tmp_path / "out"
    manifest = run(model, path, out, calibration_size=20)
    assert manifest["status"] == "complete" and manifest["count"] == N_DOCS and manifest["num_shards"] == 6
    assert manifest["dim"] == model.get_embedding_dimension()
    texts = [r["text"] for r in rows]

    # The post-hoc ranges are measured once, on 20 rows spread over the corpus, and stored.
    calibration = manifest["calibration"]
    assert calibration["kind"] == "posthoc" and calibration["rows"] == 20
    from st_bitnet.corpus.calibration import calibration_rows, load_calibration

    stored = load_calibration(out, calibration["sha256"])
    sample = [texts[i] for i in calibration_rows(N_DOCS, 20)]
    expected_quantizer = posthoc_quantizer(model.encode(sample, batch_size=4, convert_to_numpy=True))
    assert quantizer_digest(expected_quantizer) == calibration["sha256"]

    codes = codes_of(out)
    assert codes["8bit"][0] == [r["id"] for r in rows]
    for precision in ("8bit", "1bit"):
        reference = encode(model, texts, precision=precision, quantizer=stored, batch_size=4)
        assert np.array_equal(codes[precision][1].codes, reference.codes), precision
    reference16 = model.encode(texts, batch_size=4, convert_to_numpy=True).astype(np.float16)
    assert np.allclose(codes["16bit"][1].codes.astype(np.float32), reference16.astype(np.float32), atol=2e-3)
    # Every shard records the one calibration.
    for record in manifest["shards"]:
        metadata = read_shard_metadata(out / "shards" / record["file"])
        assert metadata["calibration_sha256"] == calibration["sha256"]


def test_trained_quantizer_is_used_as_is(model, corpus, tmp_path):
    from sentence_transformers import SentenceTransformer

    from st_bitnet.multi_precision import MultiPrecisionQuantizer

    path, rows = corpus
    texts = [r["text"] for r in rows]
    with_quantizer = SentenceTransformer(modules=list(model.children()), device="cpu")
    quantizer = MultiPrecisionQuantizer.from_embeddings(model.encode(texts[:30], convert_to_numpy=True))
    with_quantizer.append(quantizer)
    manifest = run(with_quantizer, path, tmp_path / "out", precisions=["8bit", "2bit"])
    assert manifest["calibration"]["kind"] == "trained"
    assert manifest["calibration"]["sha256"] == quantizer_digest(quantizer)
    _, codes = load_codes(tmp_path / "out", "2bit")
    reference = quantizer.quantize(model.encode(texts, batch_size=4, convert_to_numpy=True), 2)
    assert np.array_equal(codes.unpacked(), reference.unpacked()), (codes.unpacked() != reference.unpacked()).sum()


# ---- resuming ---------------------------------------------------------------------------------------------------------
def test_killed_run_resumes_without_duplicate_or_missing_rows(model, corpus, tmp_path):
    path, rows = corpus
    run(model, path, tmp_path / "reference")
    reference = codes_of(tmp_path / "reference")

    out = tmp_path / "out"

    class Killed(Exception):
        pass

    written = []

    def die_after_two(index, shard_path):
        written.append(index)
        if len(written) == 2:
            raise Killed

    with pytest.raises(Killed):
        run(model, path, out, on_shard_written=die_after_two)
    assert read_manifest(out)["status"] == "running"
    first_two = {i: os.stat(out / "shards" / f"shard-{i:05d}.parquet").st_mtime_ns for i in written}
    # A half-written temporary file from the killed run must not survive or count.
    (out / "shards" / "shard-00004.parquet.tmp").write_bytes(b"PAR1 half a shard")
    with pytest.raises(ValueError, match="not complete"):
        load_codes(out, "8bit")

    again = []
    manifest = run(model, path, out, on_shard_written=lambda i, p: again.append(i))
    assert sorted(again) == sorted(set(range(6)) - set(written))  # only the missing shards are encoded
    assert manifest["last_run"]["shards_reused"] == 2
    assert {i: os.stat(out / "shards" / f"shard-{i:05d}.parquet").st_mtime_ns for i in written} == first_two
    assert not list((out / "shards").glob("*.tmp"))
    codes_of_run = codes_of(out)
    ids = codes_of_run["8bit"][0]
    assert ids == [r["id"] for r in rows] and len(set(ids)) == N_DOCS
    for precision in reference:
        assert np.array_equal(codes_of_run[precision][1].codes, reference[precision][1].codes), precision
    # Rerunning a complete run encodes nothing.
    assert run(model, path, out)["last_run"]["texts_encoded"] == 0


def test_sigkilled_process_resumes(tiny_model_dir, corpus, tmp_path):
    path, rows = corpus
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from st_bitnet.corpus import encode_corpus

        def kill(index, shard_path):
            if index == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        if __name__ == "__main__":
            encode_corpus({tiny_model_dir!r}, {str(path)!r}, {str(out)!r}, shard_size={SHARD}, batch_size=4,
                          show_progress=False, on_shard_written=kill)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == [f"shard-0000{i}.parquet" for i in range(3)]
    manifest = encode_corpus(tiny_model_dir, path, out, shard_size=SHARD, batch_size=4, show_progress=False)
    assert manifest["last_run"]["shards_reused"] == 3
    ids, codes = load_codes(out, "1bit")
    assert ids == [r["id"] for r in rows] and len(codes) == N_DOCS


def test_resume_refuses_other_settings_changed_sources_and_foreign_folders(model, corpus, tmp_path):
    path, rows = corpus
    out = tmp_path / "out"
    run(model, path, out)
    with pytest.raises(ValueError, match="shard_size"):
        encode_corpus(model, path, out, precisions=["16bit", "8bit", "1bit"], shard_size=SHARD + 1, batch_size=4,
                      show_progress=False)
    with pytest.raises(ValueError, match="bits"):
        run(model, path, out, precisions=["8bit"])
    # Same size on disk, one id changed: the shard holding it no longer matches the source.
    path.write_text(path.read_text().replace('"doc-9"', '"doc-X"'))
    with pytest.raises(ValueError, match="ids_sha256"):
        run(model, path, out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty"):
        run(model, path, foreign)
    assert (foreign / "notes.txt").read_text() == "user data"


def test_a_replaced_calibration_is_refused(model, corpus, tmp_path):
    path, _ = corpus
    out = tmp_path / "out"

    def stop(index, shard_path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(model, path, out, on_shard_written=stop)
    from safetensors.numpy import load_file, save_file

    weights = out / "calibration" / "model.safetensors"
    state = load_file(weights)
    state["offset"] = state["offset"] + 0.01
    save_file(state, weights)
    with pytest.raises(ValueError, match="not the one recorded"):
        run(model, path, out)


# ---- index ------------------------------------------------------------------------------------------------------------
def test_index_is_saved_and_searches_like_one_built_from_the_codes(model, corpus, tmp_path):
    path, rows = corpus
    out = tmp_path / "out"
    manifest = run(model, path, out, precisions=["8bit", "1bit"], index=True)
    assert manifest["index"]["rescore"] == "8bit"
    index = MultiPrecisionIndex.load(out / "index")
    assert json.loads((out / "index" / "ids.json").read_text()) == [r["id"] for r in rows]
    _, store = load_codes(out, "8bit")
    _, first = load_codes(out, "1bit")
    fresh = MultiPrecisionIndex(store, first_stage_bits=1, first_stage=first, backend="numpy")
    queries = store[:5]
    first_queries = first[:5]
    got, _ = index.search(queries, top_k=3, first_stage_queries=first_queries)
    want, _ = fresh.search(queries, top_k=3, first_stage_queries=first_queries)
    assert got == want and got[0][0]["corpus_id"] == 0
    with pytest.raises(ValueError, match="1bit"):
        run(model, path, tmp_path / "out2", precisions=["8bit"], index=True)


# ---- engines ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_multiprocess_pool_gives_the_single_process_codes(model, corpus, tmp_path):
    path, _ = corpus
    run(model, path, tmp_path / "single")
    manifest = run(model, path, tmp_path / "pool", engine="multiprocess", workers=2)
    assert manifest["last_run"]["engine"] == "multiprocess"
    single, pool = codes_of(tmp_path / "single"), codes_of(tmp_path / "pool")
    for precision in single:
        assert single[precision][0] == pool[precision][0]
        assert np.array_equal(single[precision][1].codes, pool[precision][1].codes), precision


@pytest.mark.slow
def test_ray_data_gives_the_single_process_codes(tiny_model_dir, corpus, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray engine needs `pip install st_bitnet[distributed]`")
    path, _ = corpus
    run(tiny_model_dir, path, tmp_path / "single")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        written = []

        def stop_after_one(index, shard_path):
            written.append(index)
            if len(written) == 1:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):  # interrupted mid-run, then resumed through Ray again
            run(tiny_model_dir, path, tmp_path / "ray", engine="ray", workers=2, on_shard_written=stop_after_one)
        manifest = run(tiny_model_dir, path, tmp_path / "ray", engine="ray", workers=2)
    finally:
        ray.shutdown()
    assert manifest["last_run"]["engine"] == "ray" and manifest["last_run"]["shards_reused"] == 1
    single, distributed = codes_of(tmp_path / "single"), codes_of(tmp_path / "ray")
    for precision in single:
        assert single[precision][0] == distributed[precision][0]
        assert np.array_equal(single[precision][1].codes, distributed[precision][1].codes), precision


def test_ray_engine_needs_a_model_path(model, corpus, tmp_path):
    with pytest.raises(ValueError, match="saved folder or Hub id"):
        run(model, corpus[0], tmp_path / "out", engine="ray")


# ---- command line -----------------------------------------------------------------------------------------------------
def test_cli_encodes_a_beir_folder(tiny_model_dir, tmp_path, capsys):
    from st_bitnet.cli import main

    beir = tmp_path / "beir"
    beir.mkdir()
    rows = [{"_id": f"d{i}", "title": f"title {i}", "text": " ".join(WORDS[i : i + 5])} for i in range(12)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "codes"
    code = main(["encode-corpus", tiny_model_dir, str(beir), str(out), "--precisions", "8bit", "1bit",
                 "--shard-size", "5", "--batch-size", "4", "--index", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["count"] == 12 and summary["precisions"] == ["8bit", "1bit"]
    manifest = read_manifest(out)
    assert manifest["count"] == 12 and manifest["num_shards"] == 3 and manifest["source"]["format"] == "beir"
    ids, values = read_shard(out / "shards" / "shard-00000.parquet", 1, manifest["dim"])
    assert ids == ["d0", "d1", "d2", "d3", "d4"] and values.shape == (5, (manifest["dim"] + 7) // 8)
    assert (out / "index" / "multi_precision_index.json").exists()
    assert main(["encode-corpus", tiny_model_dir, str(beir), str(out), "--precisions", "4bit", "--no-progress"]) == 2
    assert isinstance(load_codes(out, "8bit")[1], QuantizedEmbeddings)
