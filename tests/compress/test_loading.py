import pytest

from compress.checkpoint import push_to_hub
from compress.loading import load_model, resolve_source
from quant.errors import InputError


def test_missing_paths_and_bad_folders_are_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no config.json"):
        resolve_source(str(tmp_path))
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(InputError, match="not a .gguf file"):
        resolve_source(str(text))


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source("some-org/some-model") == "some-org/some-model"
    with pytest.raises(InputError, match="Hugging Face Hub could not provide it"):
        load_model("some-org/some-model-that-is-not-cached")


def test_local_folder_loads_with_architecture_set(tmp_path):
    from tests.conftest import build_tiny
    from tests.tiny_tokenizer import build_tiny_tokenizer

    build_tiny("qwen3").save_pretrained(tmp_path)
    build_tiny_tokenizer(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.model.config.architectures == ["Qwen3ForCausalLM"]
    assert not loaded.model.training


def test_push_to_hub_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="push_to_hub"):
        push_to_hub(tmp_path, "me/model")
