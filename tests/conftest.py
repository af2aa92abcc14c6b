import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory):
    from kit.smoke import build_smoke_world

    return build_smoke_world(tmp_path_factory.mktemp("smoke"), progress=False)


@pytest.fixture(scope="session")
def smoke_ctx(tmp_path_factory):
    """The smoke preset's tiny lab world and its two scored runs (``make figures`` in smoke mode; ~1-2 min), shared
    by the notebook tests and the explorer app's browser test."""
    from kit.figures import PRESETS, prepare

    return prepare(PRESETS["smoke"], tmp_path_factory.mktemp("data"), progress=False)
