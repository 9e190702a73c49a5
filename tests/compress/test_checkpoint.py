"""Pruned tiny models of every supported family are saved, reloaded (in-process and in a fresh process through
``AutoModelForCausalLM`` + remote code) and give the same logits."""

import json
import subprocess
import sys

import pytest
import torch

from compress.adapters import arch_for
from compress.checkpoint import load_checkpoint_model, write_checkpoint
from compress.prune.pruner import count_parameters, prune_model
from compress.recipe import PruneConfig
from quant.errors import InputError
from tests.conftest import build_tiny
from tests.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _calibration(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(3))


def _pruned(family: str, ratio: float = 0.4) -> torch.nn.Module:
    model = build_tiny(family)
    prune_model(model, arch_for(model.config), PruneConfig(ratio=ratio), _calibration(), batch_size=4)
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_pruned_checkpoint_round_trips(family, tokenizer, tmp_path, token_batch):
    model = _pruned(family)
    assert count_parameters(model) < count_parameters(build_tiny(family))
    out = write_checkpoint(model, tokenizer, arch_for(model.config), tmp_path / "ckpt", {"recipe": {}})
    reloaded = load_checkpoint_model(out)
    with torch.no_grad():
        diff = (model(input_ids=token_batch).logits - reloaded(input_ids=token_batch).logits).abs().max()
    assert float(diff) <= 1e-5
    assert count_parameters(reloaded) == count_parameters(model)
    record = json.loads((out / "secateurs.json").read_text())
    assert record["tensors"] and record["versions"]["torch"] == torch.__version__


def test_fresh_process_auto_model_with_remote_code(tokenizer, tmp_path, token_batch):
    model = _pruned("qwen2", ratio=0.5)  # Qwen2: q/k/v biases sliced together with their heads
    out = write_checkpoint(model, tokenizer, arch_for(model.config), tmp_path / "ckpt", {"recipe": {}})
    torch.save(token_batch, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=token_batch).logits
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): logits = m(input_ids=ids).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    # run outside the repo so that the child cannot import our package from the working directory
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert float((logits - expected).abs().max()) <= 1e-5
    assert int(done.stdout.strip().splitlines()[-1]) == count_parameters(model)


def test_loading_without_remote_code_fails_loudly(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _pruned("llama", ratio=0.5)
    out = write_checkpoint(model, tokenizer, arch_for(model.config), tmp_path / "ckpt", {"recipe": {}})
    with pytest.raises(Exception, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False)


def test_existing_output_is_refused_and_failures_leave_nothing(tokenizer, tmp_path):
    model = build_tiny("llama")
    arch = arch_for(model.config)
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(InputError, match="already exists"):
        write_checkpoint(model, tokenizer, arch, out, {})

    def broken(_folder):
        raise RuntimeError("midway")

    target = tmp_path / "other"
    with pytest.raises(RuntimeError):
        write_checkpoint(model, tokenizer, arch, target, {}, verify=broken)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_same_seed_gives_identical_weights(tokenizer, tmp_path):
    files = []
    for name in ("a", "b"):
        model = _pruned("llama")
        out = write_checkpoint(model, tokenizer, arch_for(model.config), tmp_path / name, {"recipe": {}})
        files.append((out / "model.safetensors").read_bytes())
    assert files[0] == files[1]
