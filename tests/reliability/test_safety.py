"""Output folder safety (overwrite rules, leftovers of crashed runs, umask), the remote modeling file's guards,
and bounded error text."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.errors import shown
from compress.output_dir import check_output, clean_leftovers
from quant.errors import InputError
from tests.reliability.damage import O_BIAS, WEIGHTS, write_reference


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return write_reference(tmp_path_factory.mktemp("reference"))


def test_overwrite_replaces_only_an_empty_folder_or_a_checkpoint(tmp_path, references):
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=True)
    check_output(references["pruned"], overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(InputError, match="not a Secateurs checkpoint"):
        check_output(tmp_path / "notes", overwrite=True)
    with pytest.raises(InputError, match="already exists"):
        check_output(references["pruned"], overwrite=False)
    os.symlink(references["pruned"], tmp_path / "link")
    with pytest.raises(InputError, match="symbolic link"):
        check_output(tmp_path / "link", overwrite=True)


def _dead_pid() -> int:
    pid = 2**22 - 1
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid -= 1


def test_leftovers_of_dead_runs_are_removed_others_reported(tmp_path, caplog):
    dead = tmp_path / f".ckpt.tmp-{_dead_pid()}-abc"
    alive = tmp_path / f".ckpt.tmp-{os.getppid()}-def"  # a running process's
    own = tmp_path / f".ckpt.tmp-{os.getpid()}-ghi"  # this run's own staging: neither removed nor reported
    unknown = tmp_path / ".ckpt.tmp-q1w2e3"  # older name without a process id
    other = tmp_path / ".other.tmp-1-abc"  # another output's: not ours to touch
    for folder in (dead, alive, own, unknown, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    with caplog.at_level("WARNING", logger="secateurs"):
        found = {f.path.name: f for f in clean_leftovers(tmp_path / "ckpt")}
    assert set(found) == {dead.name, alive.name, unknown.name}
    assert found[dead.name].removed and not dead.exists()
    assert not found[alive.name].removed and alive.exists() and not found[unknown.name].removed
    assert all(f.bytes == 1000 for f in found.values()) and other.exists() and own.exists()
    assert all(name in caplog.text for name in found) and "1,000 bytes" in caplog.text
    assert own.name not in caplog.text


def test_a_killed_replacement_restores_the_old_checkpoint(tmp_path, references):
    trash = tmp_path / f".ckpt.old-{_dead_pid()}-abc"
    trash.mkdir()
    shutil.copytree(references["pruned"], trash / "old")
    clean_leftovers(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "secateurs.json").exists() and not trash.exists()


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_checkpoint_permissions_follow_the_umask(tmp_path, mask):
    from compress.adapters import arch_for
    from compress.checkpoint import write_checkpoint
    from tests.conftest import build_tiny
    from tests.tiny_tokenizer import build_tiny_tokenizer

    model = build_tiny("llama")
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    old = os.umask(mask)
    try:
        out = write_checkpoint(model, tokenizer, arch_for(model.config), tmp_path / "ckpt", {"recipe": {}})
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_remote_code_refuses_a_missing_tensor(tmp_path, references):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "ckpt"
    shutil.copytree(references["pruned"], folder)
    tensors = load_file(str(folder / WEIGHTS))
    del tensors[O_BIAS]
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="o_proj.bias"):
        AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(references["pruned"]), trust_remote_code=True)
    assert torch.isfinite(model.model.layers[0].self_attn.o_proj.bias).all()


def test_remote_code_accepts_exactly_the_adapter_table():
    from compress.adapters import ARCHS
    from compress.remote.modeling_secateurs import SUPPORTED_ARCHITECTURES, make_model_class

    assert set(SUPPORTED_ARCHITECTURES) == set(ARCHS)
    for name in ("AutoTokenizer", "GPT2LMHeadModel", "__class__"):
        with pytest.raises(ValueError, match="not supported"):
            make_model_class(name)


def test_a_plain_model_folder_with_a_missing_tensor_is_an_error(tmp_path):
    from compress.loading import load_model
    from tests.conftest import build_tiny
    from tests.tiny_tokenizer import build_tiny_tokenizer

    build_tiny("llama").save_pretrained(tmp_path / "m")
    build_tiny_tokenizer(tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / WEIGHTS))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "m" / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(InputError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(str(tmp_path / "m"))


def test_shown_is_bounded_for_huge_values():
    bomb: list = [0] * 9
    for _ in range(30):
        bomb = [bomb] * 9  # 9^31 items if expanded
    assert len(shown(bomb)) <= 80
    assert len(shown("x" * 10**7)) <= 80
    assert len(shown(10**5000)) <= 80
    assert json.loads(json.dumps(shown({"a": 1}))) == "{'a': 1}"


def test_task_code_needs_the_explicit_flag(tmp_path):
    from compress.lm_tasks import TRUSTED_TASK_DIRS, resolve_tasks, trust_task_code

    folder = tmp_path / "tasks"
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "compress" / "tasks" / "secateurs_web_mc.yaml", folder)
    text = (folder / "secateurs_web_mc.yaml").read_text().replace("task: secateurs_web_mc", "task: my_mc", 1)
    (folder / "secateurs_web_mc.yaml").write_text(text.replace("tag: secateurs_web", "tag: my_tag", 1))
    with pytest.raises(InputError, match="my_mc"):
        resolve_tasks(["my_mc"])
    try:
        trust_task_code(folder)
        resolve_tasks(["my_mc"])
    finally:
        TRUSTED_TASK_DIRS.clear()
