"""The two networks of a Subscale Pixel Network (paper, section 3), free of Lightning.

* `ConditioningNetwork` embeds the context of target slice k: the known slices stacked
  along channels at slice resolution, plus the meta-position k. Because the stacked
  slices are spatially aligned, a 3x3 convolution over the stack sees a neighbourhood
  of the full-resolution image. Unmasked self-attention over the positions follows.
* `SliceDecoder` is a causal transformer over the T = h*w*C sub-pixels of one slice
  (pixels in raster order, channels in order), each position conditioned on the context
  feature of its own pixel, with a key/value cache for incremental decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from data.transforms import pixel_of_subpixel
from stages import native


@dataclass
class DecoderConfig:
    """Sizes of a `SliceDecoder`: values per sub-pixel, the slice's shape, and the network's."""

    n_values: int  # categories per sub-pixel: 2**bits
    slice_shape: tuple[int, int, int]  # (h, w, C) of one slice: T = h * w * C sub-pixels
    width: int = 128
    layers: int = 4
    heads: int = 4
    context_width: int = 0  # 0: unconditional (the first-slice decoder)
    dropout: float = 0.0
    ordinal_init: bool = True  # value embedding and head start smooth in the value, from 32 values (`ordinal_rows`)

    @property
    def length(self) -> int:
        h, w, c = self.slice_shape
        return h * w * c


ORDINAL_MIN_VALUES = 32  # fewer values (under 5 bits) keep PyTorch's random rows: few, far apart in intensity


def ordinal_rows(n_values: int, width: int, std: float, frequencies: int = 16) -> torch.Tensor:
    """Initial rows (n_values, width) that vary smoothly with the value v = 0 .. n_values-1: a random
    Gaussian projection of the cosine features cos(pi * f * (v + 1/2) / n_values), f = 1 .. min(16,
    n_values // 16) (the low frequencies of a DCT over the values, the same share of them at every bit
    depth: neighbouring rows have a cosine similarity of about 0.99), scaled to standard deviation `std`.
    Neighbouring values get nearly the same row, distant ones unrelated rows: the prior that a
    discretized logistic output (PixelCNN++) builds in and a categorical softmax over 2**bits values
    has to learn. Uses torch's global random generator. Raises ValueError for fewer than
    ORDINAL_MIN_VALUES values."""
    if n_values < ORDINAL_MIN_VALUES:
        raise ValueError(f"ordinal_rows: {n_values} values; rows smooth in the value need at least "
                         f"{ORDINAL_MIN_VALUES}")
    values = (torch.arange(n_values) + 0.5) / n_values
    count = min(frequencies, n_values // 16)
    features = torch.cos(torch.pi * torch.arange(1, count + 1)[None] * values[:, None])  # (n_values, count)
    rows = features @ torch.randn(count, width)
    return rows * (std / rows.std())


@dataclass
class ContextConfig:
    """Sizes of a `ConditioningNetwork`: its input channels, meta-positions, pixels and network."""

    in_channels: int  # channels of the stacked known slices (and their presence masks)
    n_slices: int  # meta-positions k = 0 .. S*S-1
    positions: int  # h * w pixels of one slice
    width: int = 128
    layers: int = 4  # residual 3x3 convolution blocks
    attention_layers: int = 1
    heads: int = 4


class KVCache:
    """Keys and values of every layer for positions 0 .. T-1, filled one step at a time."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, device, dtype):
        shape = (batch, heads, length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]


class SelfAttention(nn.Module):
    """Multi-head self-attention (B, T, width) -> (B, T, width), causal or not, with an optional
    key/value cache for incremental decoding; raises ValueError when heads do not divide width."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}: pick heads dividing width")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, causal: bool, cache: KVCache | None = None, layer: int = 0, pos: int = 0):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        mask = None
        if cache is not None:  # x holds positions pos .. pos+t-1; attend to everything cached so far
            end = pos + x.shape[1]
            cache.keys[layer][:, :, pos:end] = k
            cache.values[layer][:, :, pos:end] = v
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
            if causal and pos > 0 and x.shape[1] > 1:  # query i is position pos + i: it sees keys <= pos + i
                mask = torch.ones(x.shape[1], end, dtype=torch.bool, device=x.device).tril(pos)
            causal = causal and pos == 0 and x.shape[1] > 1  # is_causal aligns query 0 with key 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class PackedBlock(NamedTuple):
    """One causal `Block`'s weights in the layout of the one-new-position step (`IncrementalDecoder.step`
    and the C++ loop of `stages/slice_sampler.cpp`, which reads them by these names); made by `Block.pack`.

    W width, H heads, d = W / H. Matrices are transposed for `torch.addmm` (input rows, output columns).
    The q/k/v columns are ordered (head, q|k|v, d), so that the new query, key and value of every head
    are views of one product, and the query's columns are pre-scaled by d**-0.5.
    """

    norm1_weight: torch.Tensor  # (W,)
    norm1_bias: torch.Tensor  # (W,)
    norm1_eps: float
    qkv_weight: torch.Tensor  # (W, 3W), columns (head, q|k|v, d)
    qkv_bias: torch.Tensor  # (3W,), the same order
    proj_weight: torch.Tensor  # (W, W)
    proj_bias: torch.Tensor  # (W,)
    norm2_weight: torch.Tensor  # (W,)
    norm2_bias: torch.Tensor  # (W,)
    norm2_eps: float
    up_weight: torch.Tensor  # (W, 4W), then the exact (erf) GELU
    up_bias: torch.Tensor  # (4W,)
    down_weight: torch.Tensor  # (4W, W)
    down_bias: torch.Tensor  # (W,)


class Block(nn.Module):
    """Pre-norm transformer block (B, T, width) -> (B, T, width): x + attention(norm1(x)), then
    + mlp(norm2(x)). The one definition of the block: `forward` computes every position at once or,
    with a `KVCache`, the new positions given the cached ones; `pack` lays out its weights for the fast
    one-position steps (`IncrementalDecoder`, `stages/slice_sampler.cpp`). `stages/canonical.cpp`
    computes the same block in pinned arithmetic, reading the weights by their parameter names."""

    # the parameters `pack` lays out: another one is an error there, so no fast path silently ignores it
    PACKED = ("norm1.weight", "norm1.bias", "attention.qkv.weight", "attention.qkv.bias", "attention.proj.weight",
              "attention.proj.bias", "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
              "mlp.2.bias")

    def __init__(self, width: int, heads: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, pos: int = 0):
        """x (B, t, width) at positions pos .. pos+t-1 -> (B, t, width); with `cache`, the keys and values
        of this block (`layer`) at positions < pos are read from it and those of x written to it."""
        x = x + self.attention(self.norm1(x), self.causal, cache, layer, pos)
        return x + self.mlp(self.norm2(x))

    def check_packable(self) -> None:
        """Raise NotImplementedError for what the one-position steps (`pack`'s users and the codec's
        `stages/canonical.cpp`) do not compute: a non-causal block, dropout in training mode, another
        norm or attention module, a parameter or buffer other than those in PACKED, another activation
        or layer in the MLP."""
        if not self.causal:
            raise NotImplementedError("Block.pack: the one-position step decodes causal blocks only")
        kinds = (type(self.norm1), type(self.attention), type(self.norm2))
        if kinds != (nn.LayerNorm, SelfAttention, nn.LayerNorm):
            raise NotImplementedError(f"Block.pack: the one-position step computes LayerNorm, SelfAttention and "
                                      f"LayerNorm, not {', '.join(kind.__name__ for kind in kinds)}")
        dropout = self.attention.dropout > 0 or any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.mlp)
        if self.training and dropout:
            raise NotImplementedError("Block.pack: the one-position step computes no dropout: call .eval() first")
        names = {name for name, _ in [*self.named_parameters(), *self.named_buffers()]}
        unknown, missing = sorted(names - set(self.PACKED)), sorted(set(self.PACKED) - names)
        if unknown:
            raise NotImplementedError(f"Block.pack: {', '.join(unknown)} not packed: compute it in Block.pack, "
                                      f"IncrementalDecoder.step, stages/slice_sampler.cpp and stages/canonical.cpp")
        if missing:
            raise NotImplementedError(f"Block.pack: the block has no {', '.join(missing)}, which the one-position "
                                      f"steps compute")
        kinds = [type(module) for module in self.mlp]
        if kinds != [nn.Linear, nn.GELU, nn.Linear, nn.Dropout] or self.mlp[1].approximate != "none":
            raise NotImplementedError(f"Block.pack: the one-position step computes Linear, exact GELU, Linear, "
                                      f"Dropout, not {[kind.__name__ for kind in kinds]}")

    @torch.no_grad()
    def pack(self) -> PackedBlock:
        """The block's weights for the one-position step (see `PackedBlock`), the reordered ones as new
        tensors. Raises NotImplementedError as `check_packable` does."""
        self.check_packable()
        attention, width = self.attention, self.norm1.normalized_shape[0]
        heads = attention.heads
        scale = (width // heads) ** -0.5
        weight, bias = attention.qkv.weight.clone(), attention.qkv.bias.clone()  # rows (q|k|v, head, d)
        weight[:width] *= scale
        bias[:width] *= scale
        return PackedBlock(
            self.norm1.weight.detach(), self.norm1.bias.detach(), float(self.norm1.eps),
            rearrange(weight, "(three h d) w -> w (h three d)", three=3, h=heads).contiguous(),
            rearrange(bias, "(three h d) -> (h three d)", three=3, h=heads).contiguous(),
            attention.proj.weight.t().contiguous(), attention.proj.bias.detach(),
            self.norm2.weight.detach(), self.norm2.bias.detach(), float(self.norm2.eps),
            self.mlp[0].weight.t().contiguous(), self.mlp[0].bias.detach(),
            self.mlp[2].weight.t().contiguous(), self.mlp[2].bias.detach())


class ResidualConv(nn.Module):
    """x + two (GroupNorm, GELU, 3x3 convolution) layers; (B, width, h, w) -> same."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(1, width), nn.GELU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.GroupNorm(1, width), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class ConditioningNetwork(nn.Module):
    """The context of target slice k (the paper's conditioning network): the known slices stacked along channels
    at slice resolution (B, in_channels, h, w) and the meta-position k (B,) -> one feature vector
    per pixel of the slice (B, h*w, width), in raster order. A 3x3 stem, residual convolutions
    (each sees a neighbourhood of S x S blocks of the full image), then unmasked self-attention."""

    def __init__(self, cfg: ContextConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1)
        self.meta_position = nn.Embedding(cfg.n_slices, cfg.width)
        self.convs = nn.Sequential(*[ResidualConv(cfg.width) for _ in range(cfg.layers)])
        self.position = nn.Parameter(torch.zeros(cfg.positions, cfg.width))
        self.attention = nn.ModuleList(Block(cfg.width, cfg.heads, causal=False) for _ in range(cfg.attention_layers))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, stack: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """stack (B, in_channels, h, w), k (B,) -> context (B, h*w, width), one vector per pixel."""
        x = self.stem(stack) + self.meta_position(k)[:, :, None, None]
        x = rearrange(self.convs(x), "b d h w -> b (h w) d") + self.position
        for block in self.attention:
            x = block(x)
        return self.norm(x)


class SliceDecoder(nn.Module):
    """Autoregressive model of the T = h*w*C sub-pixels of one slice (the paper's slice decoder): a causal
    transformer whose input at position t is the value at t-1 (a start token at t = 0), a learnt
    position and the context of t's own pixel; its output at t is the logits of sub-pixel t's
    categorical distribution over 2**bits values (its value-embedding and head rows start smooth in the
    value where cfg.ordinal_init and there are at least ORDINAL_MIN_VALUES values, `ordinal_rows`).
    Incremental decoding: the C++ loop of `stages.native` (the default on a CPU), `IncrementalDecoder`
    (fewer operations per step) and `step` (simple, the reference); `sample` draws a slice."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.start_token = cfg.n_values  # input at position 0, before any sub-pixel is known
        self.value_embedding = nn.Embedding(cfg.n_values + 1, cfg.width)
        self.position = nn.Parameter(torch.randn(cfg.length, cfg.width) * 0.02)
        self.context_projection = nn.Linear(cfg.context_width, cfg.width) if cfg.context_width else None
        self.register_buffer("pixel_index", pixel_of_subpixel(*cfg.slice_shape), persistent=False)  # (T,)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.n_values)
        if cfg.ordinal_init and cfg.n_values >= ORDINAL_MIN_VALUES:  # the start token's row stays random
            with torch.no_grad():
                self.value_embedding.weight[: cfg.n_values] = ordinal_rows(
                    cfg.n_values, cfg.width, float(self.value_embedding.weight.std()))
                self.head.weight.copy_(ordinal_rows(cfg.n_values, cfg.width, float(self.head.weight.std())))

    def context_tokens(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """Per-pixel context (B, h*w, Dc) -> per-sub-pixel input term (B, T, width)."""
        if context is None:
            return None
        return self.context_projection(context)[:, self.pixel_index]  # each sub-pixel gets its own pixel's

    def forward(self, values: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """values (B, T) long -> logits (B, T, n_values); position t sees values < t only."""
        start = torch.full_like(values[:, :1], self.start_token)
        inputs = torch.cat([start, values[:, :-1]], dim=1)  # shifted right by one
        x = self.value_embedding(inputs) + self.position[: values.shape[1]]
        ctx = self.context_tokens(context)
        if ctx is not None:
            x = x + ctx[:, : values.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def new_cache(self, batch: int, device, dtype=torch.float32) -> KVCache:
        """An empty key/value cache for `step`, for `batch` sequences."""
        cfg = self.cfg
        return KVCache(cfg.layers, batch, cfg.heads, cfg.length, cfg.width // cfg.heads, device, dtype)

    def step(self, previous: torch.Tensor, t: int, ctx: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """One cached step: the value at t-1 (start token at t = 0) -> logits (B, 2**bits) of the value at t."""
        x = self.value_embedding(previous)[:, None] + self.position[t]
        if ctx is not None:
            x = x + ctx[:, t : t + 1]
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, t)
        return self.head(self.norm(x))[:, 0]

    # the decoder's own parameters and buffers that `pack` lays out (its blocks' are Block.PACKED)
    PACKED = ("value_embedding.weight", "position", "context_projection.weight", "context_projection.bias",
              "pixel_index", "norm.weight", "norm.bias", "head.weight", "head.bias")

    def check_packable(self) -> None:
        """Raise NotImplementedError for what the one-position steps (`IncrementalDecoder`,
        `stages/slice_sampler.cpp`, the codec's `stages/canonical.cpp`) do not compute: a final norm other
        than LayerNorm, a parameter or buffer of the decoder other than those in PACKED, or a block that
        `Block.check_packable` refuses."""
        if type(self.norm) is not nn.LayerNorm:
            raise NotImplementedError(f"SliceDecoder.pack: the one-position step computes a final LayerNorm, "
                                      f"not {type(self.norm).__name__}")
        names = {name for name, _ in [*self.named_parameters(), *self.named_buffers()] if not name.startswith("blocks.")}
        expected = {name for name in self.PACKED if self.cfg.context_width or not name.startswith("context_projection.")}
        unknown, missing = sorted(names - expected), sorted(expected - names)
        if unknown:
            raise NotImplementedError(f"SliceDecoder.pack: {', '.join(unknown)} not packed: compute it in "
                                      f"SliceDecoder.pack, IncrementalDecoder.step and stages/slice_sampler.cpp")
        if missing:
            raise NotImplementedError(f"SliceDecoder.pack: the decoder has no {', '.join(missing)}, which the "
                                      f"one-position steps compute")
        for block in self.blocks:
            block.check_packable()

    @torch.no_grad()
    def pack(self, context: torch.Tensor | None, batch: int) -> PackedDecoder:
        """The weights and input terms for decoding one slice of `batch` images one position at a time
        (see `PackedDecoder`), given their context (B, h*w, context_width) or None. Raises
        NotImplementedError as `check_packable` does."""
        self.check_packable()
        ctx = self.context_tokens(context)
        inputs = self.position.expand(batch, -1, -1) if ctx is None else ctx + self.position
        return PackedDecoder(self.value_embedding.weight.detach(), inputs.contiguous(),
                             [block.pack() for block in self.blocks], self.norm.weight.detach(),
                             self.norm.bias.detach(), float(self.norm.eps), self.head.weight.t().contiguous(),
                             self.head.bias.detach(), self.cfg.heads)

    @torch.no_grad()
    def sample(self, batch: int, context: torch.Tensor | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None, method: str = "fast", progress=None,
               noise: torch.Tensor | None = None):
        """Draw (B, T) values; also return their log-probability at temperature 1, (B,) nats.

        The noise is one uniform per sub-pixel, `noise` (B, T) or else drawn from `generator` up
        front, and each value is read off the inverse CDF, so every method gives the same draws
        from the same noise:
        * "fast", the default: "native" where it runs (float32 weights on the CPU, a C++ compiler
          on the machine), else "incremental";
        * "native": the cached decoding of the whole slice in one C++ loop (`stages.native`);
        * "incremental": `IncrementalDecoder`, the same cached decoding in Python, in fewer tensor
          operations per step than "cached";
        * "cached": `step`, the simple key/value-cached decoding, the reference for tests;
        * "recompute": the whole prefix through `forward` at every step (the slow reference).
        `make bench` measures them. Raises ValueError for another method, RuntimeError for
        "native" where it cannot run.
        """
        device = self.position.device
        if noise is None:
            noise = torch.rand(batch, self.cfg.length, generator=generator,
                               device=generator.device if generator else device)
        noise = noise.to(device)
        if method == "fast":
            method = "native" if native.usable(device, self.position.dtype) else "incremental"
        if method == "native":
            values, log_prob = native.sample_slice(self.pack(context, batch), self.start_token, noise, temperature)
            if progress is not None:
                progress.update(batch * self.cfg.length)
            return values, log_prob
        values = torch.zeros(batch, self.cfg.length, dtype=torch.long, device=device)
        log_prob = torch.zeros(batch, device=device)
        previous = torch.full((batch,), self.start_token, dtype=torch.long, device=device)
        if method == "incremental":
            fast = IncrementalDecoder(self, context, batch)
        elif method == "cached":
            ctx, cache = self.context_tokens(context), self.new_cache(batch, device, self.position.dtype)
        elif method != "recompute":
            raise ValueError(f"method={method!r} is unknown: use fast, native, incremental, cached or recompute")
        for t in range(self.cfg.length):
            if method == "incremental":
                out = fast.step(previous, t)
            elif method == "cached":
                out = self.step(previous, t, ctx, cache)
            else:
                out = self.forward(values[:, : t + 1], context)[:, t]
            log_p = log_probs(out)  # (B, n_values)
            previous = inverse_cdf(log_p, noise[:, t], temperature)
            values[:, t] = previous
            log_prob += log_p.gather(1, previous[:, None])[:, 0]
            if progress is not None:
                progress.update(batch)  # sub-pixels drawn
        return values, log_prob


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) -> log-probabilities in nats (..., V), computed in float32."""
    return F.log_softmax(logits.float(), dim=-1)


def inverse_cdf(log_p: torch.Tensor, uniform: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The value whose CDF interval holds `uniform`: a draw from softmax(log_p / temperature).
    log_p (B, V) log-probabilities, uniform (B,) in [0, 1) -> values (B,) long."""
    cdf = torch.softmax(log_p if temperature == 1 else log_p / temperature, dim=-1).cumsum(-1)
    return torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp_(max=log_p.shape[-1] - 1)[:, 0]


class PackedDecoder(NamedTuple):
    """A `SliceDecoder` set up to decode one slice of B images one position at a time, by
    `IncrementalDecoder.step` or the C++ loop (`stages/slice_sampler.cpp`, which reads these fields by
    name); made by `SliceDecoder.pack`. V values, W width, T positions; matrices transposed as in
    `PackedBlock`."""

    embedding: torch.Tensor  # (V + 1, W): the input embedding of each value, row V the start token
    inputs: torch.Tensor  # (B, T, W): each position's learnt position plus its pixel's context term
    blocks: list[PackedBlock]
    norm_weight: torch.Tensor  # (W,): the final layer norm
    norm_bias: torch.Tensor  # (W,)
    norm_eps: float
    head_weight: torch.Tensor  # (W, V)
    head_bias: torch.Tensor  # (V,)
    heads: int


class IncrementalDecoder:
    """Cached decoding of one slice in few tensor operations per step, from the decoder's packed
    weights (`SliceDecoder.pack`): the same results as `SliceDecoder.step` up to float rounding (a test
    holds the two to identical samples). On a CPU such a step is bound by the fixed cost of each
    operation, not by its arithmetic, so the new query, key and value of all B*H heads are views of
    one product, keys are stored transposed (B*H, d, T) and values (B*H, T, d), and the attention of
    the one new query is two `torch.bmm` calls on slices of the cache. Source: the standard
    key/value-cached transformer decoding.
    """

    @torch.no_grad()
    def __init__(self, decoder: SliceDecoder, context: torch.Tensor | None, batch: int):
        self.packed = packed = decoder.pack(context, batch)
        self.batch, self.heads, self.width = batch, packed.heads, decoder.cfg.width
        self.head_dim = self.width // self.heads
        length, device, dtype = decoder.cfg.length, packed.inputs.device, packed.inputs.dtype
        key_shape, value_shape = (batch * self.heads, self.head_dim, length), (batch * self.heads, length, self.head_dim)
        self.keys = [torch.zeros(key_shape, device=device, dtype=dtype) for _ in packed.blocks]
        self.values = [torch.zeros(value_shape, device=device, dtype=dtype) for _ in packed.blocks]

    def step(self, previous: torch.Tensor, t: int) -> torch.Tensor:
        """previous (B,) the value at t-1 (start token at t = 0) -> logits (B, n_values) for t."""
        batch, width, packed = self.batch, (self.width,), self.packed
        x = packed.embedding[previous] + packed.inputs[:, t]  # (B, W)
        for block, keys, values in zip(packed.blocks, self.keys, self.values):
            h = F.layer_norm(x, width, block.norm1_weight, block.norm1_bias, block.norm1_eps)
            qkv = torch.addmm(block.qkv_bias, h, block.qkv_weight).view(batch * self.heads, 3, self.head_dim)
            keys[:, :, t] = qkv[:, 1]
            values[:, t] = qkv[:, 2]
            weights = torch.bmm(qkv[:, :1], keys[:, :, : t + 1]).softmax(-1)  # (B*H, 1, t+1)
            y = torch.bmm(weights, values[:, : t + 1]).view(batch, -1)  # (B, W)
            x = x + torch.addmm(block.proj_bias, y, block.proj_weight)
            h = F.layer_norm(x, width, block.norm2_weight, block.norm2_bias, block.norm2_eps)
            x = x + torch.addmm(block.down_bias, F.gelu(torch.addmm(block.up_bias, h, block.up_weight)), block.down_weight)
        h = F.layer_norm(x, width, packed.norm_weight, packed.norm_bias, packed.norm_eps)
        return torch.addmm(packed.head_bias, h, packed.head_weight)
