"""Shared test set-up: environment for img2dataset / DeepSpeed, and the ../shared data folder."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# DeepSpeed compiles a small CPU op once; keep it between runs and between test processes.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "scl_torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip where it is missing."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (real sample data lives beside the checkout)")
    return SHARED
