"""Shared test set-up: environment for img2dataset / DeepSpeed, and the ../shared data folder."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# Set once for the whole suite (and inherited by the processes tests start): img2dataset's albumentations
# asks the network for its version unless told not to; tokenizers' threads and forked workers clash;
# DeepSpeed picks the CPU accelerator before its first import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles a small CPU op once; keep it between runs and between test processes.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "scl_torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip where it is missing."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (real sample data lives beside the checkout)")
    return SHARED


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A small byte-level BPE tokenizer trained on the data fixtures' captions."""
    from data_fixtures import caption

    from pipeline.data import train_tokenizer

    return train_tokenizer([caption(i) for i in range(200)], tmp_path_factory.mktemp("tok"), vocab_size=400)

