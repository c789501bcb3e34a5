"""`resolve_model_path`'s `load_format` and `revision` (checkpoints/resolve.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints.resolve import (
    LOAD_FORMATS,
    ModelNotFoundError,
    RevisionNotFoundError,
    check_load_format,
    resolve_model_path,
)
from serving.server_args_checks import LOAD_FORMAT_CHOICES


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path / "hub"


def add_snapshot(hub: Path, folder: str, commit: str, refs: tuple[str, ...] = ()) -> Path:
    snapshot = hub / folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    for ref in refs:
        (hub / folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (hub / folder / "refs" / ref).write_text(commit)
    return snapshot


def test_server_args_and_resolver_agree_on_formats():
    assert LOAD_FORMAT_CHOICES == LOAD_FORMATS


def test_revision_picks_a_branch_tag_or_commit(hub):
    folder = "models--org--tiny"
    main = add_snapshot(hub, folder, "aaaa1111", refs=("main",))
    tagged = add_snapshot(hub, folder, "bbbb2222", refs=("v1.0",))
    old = add_snapshot(hub, folder, "cccc3333")
    assert resolve_model_path("org/tiny").path == main
    assert resolve_model_path("org/tiny", revision="main").path == main
    assert resolve_model_path("Org/Tiny", revision="v1.0").path == tagged
    assert resolve_model_path("org/tiny", revision="cccc3333").path == old
    # What the engine serves for `--model-path org/tiny --revision v1.0`.
    from checkpoints.resolve import resolve_model_dir

    assert resolve_model_dir("org/tiny", revision="v1.0") == tagged
    assert resolve_model_dir("org/tiny") == main


@pytest.mark.parametrize("revision", ["v2.0", "dddd4444", "../models--org--tiny", ""])
def test_unknown_revision_is_a_clear_error(hub, revision):
    add_snapshot(hub, "models--org--tiny", "aaaa1111", refs=("main",))
    with pytest.raises(RevisionNotFoundError) as raised:
        resolve_model_path("org/tiny", revision=revision)
    assert f"org/tiny: revision {revision!r} is not in the local Hugging Face cache" in str(raised.value)


def test_revision_of_an_uncached_repo_is_not_found(hub):
    add_snapshot(hub, "models--org--tiny", "aaaa1111", refs=("main",))
    with pytest.raises(ModelNotFoundError):
        resolve_model_path("org/other", revision="main")


def test_local_directory_ignores_revision(tmp_path, hub):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_model_path(tmp_path / "model", revision="v9").path == tmp_path / "model"


def test_load_format_is_checked_before_resolving(tmp_path, hub):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_model_path(tmp_path / "model", load_format="safetensors").kind == "hf"
    with pytest.raises(ValueError, match="--load-format gguf needs a .gguf file"):
        resolve_model_path(tmp_path / "model", load_format="gguf")
    with pytest.raises(ValueError, match="--load-format safetensors needs a Hugging Face directory"):
        resolve_model_path(tmp_path / "missing.gguf", load_format="safetensors")
    with pytest.raises(ValueError, match="load_format must be one of auto, safetensors, gguf, orbax; got 'pt'"):
        check_load_format(tmp_path / "model", "pt")
