"""What a hub failure tells the user: gated, missing or private, offline, unreachable — by error type."""

from __future__ import annotations

import pytest
from huggingface_hub import errors as hub_errors

from t2i_core import ModelNotFoundError
from t2i_core._hub import hub_failure, read_model_index


def _error(cls: type[Exception]) -> Exception:
    """An instance of a huggingface_hub error class, whatever its constructor asks for."""
    error = cls.__new__(cls)
    Exception.__init__(error, "403 Client Error")
    return error


def test_a_gated_model_says_how_to_get_access(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    reason = hub_failure(_error(hub_errors.GatedRepoError))
    assert "gated" in reason and "hf auth login" in reason and "HF_TOKEN" in reason


def test_missing_private_offline_and_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert "no such repository" in hub_failure(_error(hub_errors.RepositoryNotFoundError))
    unreachable = hub_failure(_error(hub_errors.LocalEntryNotFoundError))
    assert "could not be reached" in unreachable and "tiny:<family>" in unreachable and "HF_HUB_OFFLINE" in unreachable
    refused = hub_failure(ConnectionError("refused"))
    assert "(ConnectionError); check the id and the network" in refused
    # The first hour: someone without the Hub learns how to go on offline.
    assert "tiny:sd15" in refused and "HF_HUB_OFFLINE=1" in refused
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = hub_failure(_error(hub_errors.GatedRepoError))
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in offline and "tiny:sd15" in offline


def test_a_name_matching_no_type_is_not_taken_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Classified by type, not by name: an unrelated error called GatedRepoError is a plain fetch failure."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    impostor = type("GatedRepoError", (Exception,), {})("no")
    assert "gated" not in hub_failure(impostor)


def test_offline_hub_id_not_cached_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1 forbids downloading it"):
        read_model_index("someone/not-cached", "someone/not-cached", False)
