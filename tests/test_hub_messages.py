"""What a hub failure tells the user: gated, missing or private, offline, unreachable."""

from __future__ import annotations

import pytest

from t2i_core.engine import _hub_failure


def _error(name: str) -> Exception:
    return type(name, (Exception,), {})("403 Client Error")


def test_a_gated_model_says_how_to_get_access(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    reason = _hub_failure(_error("GatedRepoError"))
    assert "gated" in reason and "hf auth login" in reason and "HF_TOKEN" in reason


def test_missing_private_offline_and_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert "no such repository" in _hub_failure(_error("RepositoryNotFoundError"))
    assert "(ConnectionError); check the id and the network" in _hub_failure(_error("ConnectionError"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in _hub_failure(_error("GatedRepoError"))
