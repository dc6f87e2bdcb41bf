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
from types import SimpleNamespace

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

    @property
    def length(self) -> int:
        h, w, c = self.slice_shape
        return h * w * c


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


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, pos: int = 0):
        x = x + self.attention(self.norm1(x), self.causal, cache, layer, pos)
        return x + self.mlp(self.norm2(x))


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
    categorical distribution over 2**bits values. Incremental decoding: the C++ loop of
    `stages.native` (the default on a CPU), `IncrementalDecoder` (fewer operations per step) and
    `step` (simple, the reference); `sample` draws a slice."""

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
            values, log_prob = native.sample_slice(IncrementalDecoder(self, context, batch, cache=False),
                                                   self.start_token, noise, temperature)
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


class IncrementalDecoder:
    """Cached decoding of one slice in few tensor operations per step (`make bench`, sampling: on a
    CPU the step is bound by the fixed cost of each operation, not by its arithmetic).

    Set up once per slice: the input terms of every position (position + context) summed; each
    layer's weights transposed for `torch.addmm`, the query rows pre-scaled by head_dim**-0.5 and
    the q/k/v rows reordered head by head, so that the one new query, key and value of all B*H
    heads are views of the projection's output; keys stored transposed (B*H, head_dim, T) and
    values (B*H, T, head_dim), so that the attention of the one new query is two `torch.bmm`
    calls on slices of the cache. Same results as `SliceDecoder.step` up to float rounding; a
    test holds the two to identical samples. Source: the standard KV-cached transformer decoding.
    `cache=False` sets up the weights and input terms only, for the C++ loop (`stages.native`),
    which keeps its own cache.
    """

    @torch.no_grad()
    def __init__(self, decoder: SliceDecoder, context: torch.Tensor | None, batch: int, cache: bool = True):
        cfg = decoder.cfg
        self.batch, self.heads, self.width = batch, cfg.heads, cfg.width
        self.head_dim = head_dim = cfg.width // cfg.heads
        device, dtype = decoder.position.device, decoder.position.dtype
        ctx = decoder.context_tokens(context)
        inputs = decoder.position.expand(batch, -1, -1) if ctx is None else ctx + decoder.position
        self.inputs = inputs.contiguous()  # (B, T, W)
        self.embedding = decoder.value_embedding.weight
        self.layers = []
        key_shape, value_shape = (batch * cfg.heads, head_dim, cfg.length), (batch * cfg.heads, cfg.length, head_dim)
        for block in decoder.blocks:
            attention, mlp = block.attention, block.mlp
            weight, bias = attention.qkv.weight.clone(), attention.qkv.bias.clone()  # rows (three, H, head_dim)
            weight[: cfg.width] *= head_dim**-0.5
            bias[: cfg.width] *= head_dim**-0.5
            weight = rearrange(weight, "(three h d) w -> w (h three d)", three=3, h=cfg.heads).contiguous()
            bias = rearrange(bias, "(three h d) -> (h three d)", three=3, h=cfg.heads)
            self.layers.append(SimpleNamespace(
                norm1=(block.norm1.weight, block.norm1.bias, block.norm1.eps), qkv=(bias, weight),
                proj=(attention.proj.bias, attention.proj.weight.t().contiguous()),
                norm2=(block.norm2.weight, block.norm2.bias, block.norm2.eps),
                up=(mlp[0].bias, mlp[0].weight.t().contiguous()), down=(mlp[2].bias, mlp[2].weight.t().contiguous()),
                keys=torch.zeros(key_shape, device=device, dtype=dtype) if cache else None,
                values=torch.zeros(value_shape, device=device, dtype=dtype) if cache else None))
        self.norm = (decoder.norm.weight, decoder.norm.bias, decoder.norm.eps)
        self.head = (decoder.head.bias, decoder.head.weight.t().contiguous())

    def step(self, previous: torch.Tensor, t: int) -> torch.Tensor:
        """previous (B,) the value at t-1 (start token at t = 0) -> logits (B, n_values) for t."""
        batch, width = self.batch, (self.width,)
        x = self.embedding[previous] + self.inputs[:, t]  # (B, W)
        for layer in self.layers:
            h = F.layer_norm(x, width, *layer.norm1)
            qkv = torch.addmm(layer.qkv[0], h, layer.qkv[1]).view(batch * self.heads, 3, self.head_dim)
            layer.keys[:, :, t] = qkv[:, 1]
            layer.values[:, t] = qkv[:, 2]
            weights = torch.bmm(qkv[:, :1], layer.keys[:, :, : t + 1]).softmax(-1)  # (B*H, 1, t+1)
            y = torch.bmm(weights, layer.values[:, : t + 1]).view(batch, -1)  # (B, W)
            x = x + torch.addmm(layer.proj[0], y, layer.proj[1])
            h = F.layer_norm(x, width, *layer.norm2)
            x = x + torch.addmm(layer.down[0], F.gelu(torch.addmm(layer.up[0], h, layer.up[1])), layer.down[1])
        return torch.addmm(self.head[0], F.layer_norm(x, width, *self.norm), self.head[1])
