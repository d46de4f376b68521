"""Test-wide settings: offline hub, one torch thread, and figures/artifacts redirected to a temp folder
so that tests never touch the committed figures or data."""

import os
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="paper_lib_tests_"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["PAPER_FIGURES_DIR"] = str(_TMP / "figures")
os.environ["PAPER_DATA_DIR"] = str(_TMP / "data")
os.environ.setdefault("HF_DATASETS_CACHE", str(_TMP / "hf_datasets_cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from paper_lib.paths import REPO_ROOT  # noqa: E402

ORGANISM_DIR = REPO_ROOT / "data" / "organism"
SHARED_BENCHMARKS = REPO_ROOT.parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def organism_dir() -> Path:
    return ORGANISM_DIR


@pytest.fixture(scope="session")
def organism(organism_dir):
    from paper_lib.organism import load_organism

    return load_organism(organism_dir)
