import torch

from compress.adapters import arch_for, decoder_layers
from compress.calibration import ChannelStats, calibrate_layerwise


def test_channel_stats_match_direct_moments():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 5, generator=g) * 3 + 1
    stats = ChannelStats(5)
    for chunk in x.split(1):
        stats.add_batch(chunk)
    flat = x.reshape(-1, 5).double()
    assert torch.allclose(stats.mean, flat.mean(0))
    assert torch.allclose(stats.variance, flat.var(0))
    assert torch.allclose(stats.sq_norm, (flat**2).sum(0))


def test_layerwise_statistics_equal_full_model_hooks(tiny_model, token_batch):
    """The layer-by-layer engine must see exactly what a normal full forward pass feeds each o_proj/down_proj."""
    arch = arch_for(tiny_model.config)
    reference: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(tiny_model, arch)):
        for name in (arch.o, arch.down):

            def hook(_m, args, key=(i, name)):
                reference.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())

            handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        tiny_model(input_ids=token_batch)
    for h in handles:
        h.remove()
    stats = calibrate_layerwise(
        tiny_model,
        arch,
        token_batch,
        lambda _i, layer: {arch.o: layer.get_submodule(arch.o), arch.down: layer.get_submodule(arch.down)},
        batch_size=3,  # uneven mini-batches on purpose
    )
    for (i, name), chunks in reference.items():
        x = torch.cat(chunks)
        assert stats[i][name].count == x.shape[0]
        assert torch.allclose(stats[i][name].mean, x.mean(0), atol=1e-6)
        assert torch.allclose(stats[i][name].variance, x.var(0), atol=1e-6)
