"""hf:NAME[:config]:split sources: parsing, a local dataset folder through the datasets library, offline errors."""

import json

import pytest

from compress.corpus import corpus_fingerprint, load_documents
from compress.hf_data import parse_hf_source
from quant.errors import InputError


def test_parse():
    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_hf_source("hf:allenai/c4:train[:100]") == ("allenai/c4", None, "train[:100]")
    for bad in ("hf:wikitext", "hf:a:b:c:d", "hf::train"):
        with pytest.raises(InputError, match="expected hf:NAME:split"):
            parse_hf_source(bad)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_local_dataset_folder(tmp_path, offline):
    folder = tmp_path / "notes"
    folder.mkdir()
    rows = [{"id": 1, "body": "first note"}, {"id": 2, "body": "  "}, {"id": 3, "body": "third note"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = f"hf:{folder}:train"
    assert load_documents(source) == ["first note", "third note"]  # the only string column; blanks skipped
    assert len(corpus_fingerprint(source)) == 64


def test_unreachable_hub_dataset_is_a_clear_error(offline):
    with pytest.raises(InputError, match=r"hf:nobody/no-such-dataset:train.*could not load it \(offline"):
        load_documents("hf:nobody/no-such-dataset:train")
