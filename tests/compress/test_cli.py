"""CLI: bad input gives a one-line error naming the field or path, exit code 2, and writes nothing."""

import subprocess
import sys

import pytest

from compress.cli import main


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "recipe, needle",
    [
        ("model: default\nstepz: []\n", "unknown key 'stepz'"),
        ("steps:\n  - prune: {ratio: 1.5}\n", "steps.0.prune.ratio"),
        ("steps:\n  - prune: {metric: L2}\n", "steps.0.prune.metric"),
        ("model: /nonexistent/model\n", "does not exist"),
        (
            "calibration: {data: /nonexistent/cal.txt}\nsteps:\n  - prune: {ratio: 0.2}\n",
            "/nonexistent/cal.txt",
        ),
    ],
)
def test_bad_input_exit_code_2(tmp_path, capsys, recipe, needle):
    out = tmp_path / "out"
    code = main(["run", _write(tmp_path, recipe), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny_tokenizer import build_tiny_tokenizer

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512)).save_pretrained(model_dir)
    build_tiny_tokenizer(model_dir)
    code = main(
        [
            "run",
            _write(tmp_path, f"model: {model_dir}\nsteps:\n  - prune: {{ratio: 0.2}}\n"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "GPT2LMHeadModel" in capsys.readouterr().err


def test_console_script_reports_missing_recipe(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "compress.cli", "run", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "nope.yaml" in done.stderr


def test_info_reports_per_layer_shapes_and_parameters(tmp_path, capsys):
    import json

    import torch

    from compress.adapters import arch_for
    from compress.checkpoint import write_checkpoint
    from compress.prune.pruner import count_parameters, prune_model
    from compress.quantize import quantize_model
    from compress.recipe import PruneConfig, QuantizeConfig
    from tests.conftest import build_tiny
    from tests.tiny_tokenizer import build_tiny_tokenizer

    model = build_tiny("llama")
    arch = arch_for(model.config)
    prune_model(model, arch, PruneConfig(ratio=0.4), torch.randint(0, 512, (4, 16)), 2)
    quantize_model(model, arch, QuantizeConfig(dtypes="bitmod4", group_size=16, modules=r"mlp\."), None)
    out = write_checkpoint(model, build_tiny_tokenizer(tmp_path / "tok"), arch, tmp_path / "ckpt", {"recipe": {}})
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == count_parameters(model)
    assert [row["kv_heads"] for row in info["layers"]] == [
        layer.self_attn.k_proj.out_features // 8 for layer in model.model.layers
    ]
    assert info["quantized_linears"] == 6 and 4 + 18 / 16 < info["bits_per_weight"] < 10  # tiny: tables dominate
    assert info["bytes_on_disk"] == (out / "model.safetensors").stat().st_size


def test_eval_command_runs_perplexity_and_lm_eval(tmp_path, capsys):
    import json

    from tests.conftest import build_tiny
    from tests.tiny_tokenizer import build_tiny_tokenizer

    build_tiny("llama").save_pretrained(tmp_path / "m")
    build_tiny_tokenizer(tmp_path / "m")
    code = main(["eval", str(tmp_path / "m"), "--tasks", "secateurs_web_mc", "--limit", "3", "--ppl-windows", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["protocol"]["perplexity"]["windows"] == 2
    assert 0.0 <= result["metrics"]["secateurs_web_mc/acc"] <= 1.0
    assert result["metrics"]["heldout/perplexity"] > 1.0
