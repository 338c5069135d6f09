"""Shared fixtures: the team's real data in ../shared, an isolated weights cache, tiny backbones."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AUTOMEDSAM_SHARED", REPO.parent / "shared")).resolve()
CT_DIR = SHARED / "data" / "ct_abdomen"

# Tests run against the checkout's sources even without an editable install.
sys.path.insert(0, str(REPO / "AutoMedSAMSlicer"))


@pytest.fixture(scope="session")
def ct_dir() -> Path:
    """``../shared/data/ct_abdomen`` (real CT with reference labels)."""
    if not (CT_DIR / "labels.json").exists():
        pytest.skip(f"shared real data not found at {CT_DIR} (set AUTOMEDSAM_SHARED)")
    return CT_DIR


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own empty AUTOMEDSAM_HOME so no test touches the user's cache."""
    home = tmp_path_factory.mktemp("automedsam_home")
    monkeypatch.setenv("AUTOMEDSAM_HOME", str(home))
    monkeypatch.delenv("AUTOMEDSAM_CATALOG", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_sam():
    from automedsam.backbones import build_backbone

    return build_backbone("tiny-sam", weights="random", device="cpu")


@pytest.fixture(scope="session")
def tiny_sam2():
    from automedsam.backbones import build_backbone

    return build_backbone("tiny-sam2", weights="random", device="cpu")


@pytest.fixture(scope="session", params=["tiny-sam", "tiny-sam2"])
def tiny_backbone(request):
    return request.getfixturevalue(request.param.replace("-", "_"))
