"""One block, every decoding path: each option of the slice decoder and of its `Block` gives the
training path's logits (`SliceDecoder.forward`) on every one-position path, or is refused there.

The paths: the reference cached step (`SliceDecoder.step`), the fast Python step (`IncrementalDecoder`),
the C++ loop (`stages/slice_sampler.cpp`) and the codec's pinned arithmetic (`stages/canonical.cpp`).
A new option of `DecoderConfig` or `Block` must be given a value in VARIANTS (the first test fails by
its name until it is); a path that then computes something else fails `test_every_path_computes_the_
training_logits[<path>-<option>=<value>]`.
"""
import dataclasses
import inspect

import pytest
import torch
from torch import nn

from conftest import make_stages
from stages.networks import Block, ContextConfig, DecoderConfig, IncrementalDecoder, SelfAttention, SliceDecoder

BASE = dict(n_values=8, slice_shape=(2, 3, 2), width=16, layers=2, heads=2, context_width=8, dropout=0.0,
            ordinal_init=True)

# option -> values tried on every path (DecoderConfig's fields and Block's own arguments)
VARIANTS = {
    "n_values": [2, 32],
    "slice_shape": [(1, 4, 1), (3, 2, 3)],
    "width": [8, 24],
    "layers": [1, 3],
    "heads": [1, 4],
    "context_width": [0, 5],
    "dropout": [0.1],  # a decoder in eval mode: no dropout anywhere
    "ordinal_init": [False],  # rows smooth in the value start at 32 values: n_values 32 above has them
    "causal": [True],  # Block's own: a non-causal block is refused by pack (test below)
}
PATHS = ("cached", "incremental", "native", "canonical")

# option of the conditioning network -> stage settings that change it, checked in the codec's pinned arithmetic
CONTEXT_VARIANTS = {
    "in_channels": [dict(name="depth_spn"), dict(channels=3)],
    "n_slices": [dict(subscale=4, image_size=8)],
    "positions": [dict(image_size=12)],
    "width": [dict(context_width=8), dict(context_width=24)],
    "layers": [dict(context_layers=0), dict(context_layers=2)],
    "attention_layers": [dict(context_attention_layers=0), dict(context_attention_layers=2)],
    "heads": [dict(heads=1), dict(heads=4)],
}


def test_every_option_of_the_networks_and_their_block_has_variants_here():
    options = {field.name for field in dataclasses.fields(DecoderConfig)}
    for init in (Block.__init__, SelfAttention.__init__):
        options |= set(inspect.signature(init).parameters) - {"self"}
    missing = sorted(options - set(VARIANTS))
    assert not missing, (f"{missing}: give each option values in VARIANTS of tests/test_block.py, so that every "
                         f"decoding path is checked with it")
    missing = sorted({field.name for field in dataclasses.fields(ContextConfig)} - set(CONTEXT_VARIANTS))
    assert not missing, f"{missing}: give each option of ContextConfig settings in CONTEXT_VARIANTS"


def decoder_with(option: str, value) -> tuple[SliceDecoder, torch.Tensor | None]:
    """A decoder with one option changed, every weight perturbed (norms and biases too), and a context."""
    torch.manual_seed(0)
    settings = dict(BASE)
    if option in settings:
        settings[option] = value
    cfg = DecoderConfig(**settings)
    decoder = SliceDecoder(cfg)
    if option not in settings:  # an option of Block alone
        decoder.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.dropout, **{option: value})
                                       for _ in range(cfg.layers))
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        decoder.head.weight.mul_(10)  # logits far from uniform
    h, w, _ = cfg.slice_shape
    context = torch.randn(3, h * w, cfg.context_width) if cfg.context_width else None
    return decoder.eval(), context


def needs_its_module(path: str) -> None:
    """Skip a C++ path on a machine that cannot build it (no compiler): the Python paths are still checked."""
    from stages import canonical, native

    if path == "native" and native.load() is None:
        pytest.skip("no C++ compiler here: the C++ slice sampler is not built")
    if path == "canonical":
        try:
            canonical.load()
        except canonical.CanonicalUnavailable:
            pytest.skip("no C++ compiler here: the codec's pinned arithmetic is not built")


def step_log_probs(path: str, decoder: SliceDecoder, context, values: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (B, T, V) of every position given the true earlier values, by one path."""
    batch, length = values.shape
    previous = torch.full((batch,), decoder.start_token)
    if path == "canonical":
        from stages import canonical

        step = canonical.Decoder(decoder, context, batch).step
    elif path == "incremental":
        step = IncrementalDecoder(decoder, context, batch).step
    else:
        cache, tokens = decoder.new_cache(batch, "cpu"), decoder.context_tokens(context)
        step = lambda previous, t: decoder.step(previous, t, tokens, cache)  # noqa: E731
    out = []
    for t in range(length):
        p = step(previous, t)
        out.append(p.log() if path == "canonical" else torch.log_softmax(p.float(), -1))
        previous = values[:, t]
    return torch.stack(out, 1).float()


@pytest.mark.float_paths
@pytest.mark.parametrize("option,value", [(option, value) for option, values in VARIANTS.items() for value in values],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("path", PATHS)
def test_every_path_computes_the_training_logits(path, option, value):
    needs_its_module(path)
    decoder, context = decoder_with(option, value)
    batch = 3
    with torch.no_grad():
        if path == "native":  # the C++ loop returns draws: their log-probabilities by the training path
            values, log_prob = decoder.sample(batch, context, generator=torch.Generator().manual_seed(1), method="native")
            full = torch.log_softmax(decoder(values, context).float(), -1)
            assert torch.allclose(log_prob, full.gather(2, values[..., None]).sum((1, 2)), atol=1e-4)
            return
        values = torch.randint(decoder.cfg.n_values, (batch, decoder.cfg.length), generator=torch.Generator().manual_seed(1))
        full = torch.log_softmax(decoder(values, context).float(), -1)
        assert torch.allclose(step_log_probs(path, decoder, context, values), full, atol=1e-4)


def test_a_weight_or_layer_the_fast_paths_do_not_compute_is_refused_by_name():
    decoder, context = decoder_with("layers", 1)
    block = decoder.blocks[0]
    block.causal = False
    with pytest.raises(NotImplementedError, match="causal blocks only"):
        decoder.pack(context, 3)
    block.causal = True
    block.register_parameter("gate", nn.Parameter(torch.ones(1)))
    with pytest.raises(NotImplementedError, match=r"Block\.pack: gate not packed"):
        decoder.pack(context, 3)
    with pytest.raises(NotImplementedError, match="gate"):
        decoder.sample(1, context[:1], method="native")
    del block.gate
    block.mlp[1] = nn.GELU(approximate="tanh")
    with pytest.raises(NotImplementedError, match="exact GELU"):
        IncrementalDecoder(decoder, context, 3)
    block.mlp[1] = nn.GELU()
    decoder.register_buffer("scale", torch.ones(1))
    with pytest.raises(NotImplementedError, match=r"SliceDecoder\.pack: scale not packed"):
        decoder.pack(context, 3)


def test_another_norm_or_dropout_in_training_is_refused_by_every_fast_path():
    """A norm the one-position steps do not compute (RMSNorm for LayerNorm, in a block or at the end)
    and dropout while training are refused by `pack` and by the codec's pinned path, not computed
    as something else."""
    from stages import canonical

    for where in ("norm1", "norm2", "norm"):
        decoder, context = decoder_with("layers", 1)
        owner = decoder if where == "norm" else decoder.blocks[0]
        setattr(owner, where, nn.RMSNorm(decoder.cfg.width))
        with pytest.raises(NotImplementedError, match="RMSNorm"):
            decoder.pack(context, 3)
        with pytest.raises(NotImplementedError, match="RMSNorm"):
            canonical.Decoder(decoder, context, 3)
    decoder, context = decoder_with("dropout", 0.1)
    decoder.train()
    with pytest.raises(NotImplementedError, match=r"no dropout: call \.eval\(\) first"):
        decoder.pack(context, 3)
    decoder.eval()
    decoder.pack(context, 3)  # in eval mode dropout is the identity: packed


def test_the_cpp_loop_refuses_a_packed_field_it_does_not_compute():
    from stages import native

    if native.load() is None:
        pytest.skip("no C++ compiler here")
    decoder, context = decoder_with("layers", 1)
    packed = decoder.pack(context, 3)
    fields = native.named_tensors(packed)
    blocks = [native.named_tensors(block) for block in packed.blocks]
    noise = torch.rand(3, decoder.cfg.length)
    blocks[0]["q_norm_weight"] = torch.ones(decoder.cfg.width)
    with pytest.raises(RuntimeError, match="PackedBlock 0.q_norm_weight is not computed by stages/slice_sampler.cpp"):
        native.load().sample_slice(fields, blocks, noise, decoder.start_token, packed.heads, 1.0)
    del blocks[0]["q_norm_weight"], blocks[0]["up_bias"]
    with pytest.raises(RuntimeError, match="PackedBlock 0 has no field up_bias"):
        native.load().sample_slice(fields, blocks, noise, decoder.start_token, packed.heads, 1.0)


@pytest.mark.float_paths
@pytest.mark.parametrize("settings", [settings for values in CONTEXT_VARIANTS.values() for settings in values],
                         ids=lambda settings: ",".join(f"{key}={value}" for key, value in settings.items()))
def test_the_codec_computes_the_training_context(settings):
    """The conditioning network (its non-causal blocks too) in the codec's pinned arithmetic."""
    from stages import canonical

    needs_its_module("canonical")
    settings = dict(settings)
    name = settings.pop("name", "size_spn")
    geometry = dict(image_size=4, channels=1, bits=4, high_bits=2, subscale=2)
    stage = make_stages(**{**geometry, **settings})[name]
    with torch.no_grad():
        for parameter in stage.context_net.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    g = torch.Generator().manual_seed(2)
    shape = (3, stage.S**2, stage.h, stage.w, stage.C)
    known = {"msb": torch.randint(0, 4, shape, generator=g), "lsb": torch.randint(0, 4, shape, generator=g)}
    k = torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(canonical.context(stage, known, k), stage.context(known, k), atol=1e-4)
