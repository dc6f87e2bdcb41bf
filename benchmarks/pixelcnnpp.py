"""PixelCNN++ (Salimans, Karpathy, Chen & Kingma, ICLR 2017), written for this project as the peer
`make bench` compares the cascade with: gated resnet blocks over a down-shifted and a
down-right-shifted stream, two downsampling and two upsampling stages with skip connections
between them, concat-ELU, and the discretized logistic mixture likelihood, with the colour
channels predicted in order (green's and blue's means are linear in the values before them).

Exact: `nll` is -log p(x) in nats of n-bit images under the discretized mixture, whose mass over
the 2^n values of every sub-pixel sums to 1 (the end bins take the tails); `value_log_probs`
gives those masses, for the tests. Images are (B, H, W, C) n-bit integers, C = 1 or 3.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """ELU of x and of -x, stacked on the channel axis: (B, 2F, H, W)."""
    return F.elu(torch.cat([x, -x], dim=1))


class DownShiftedConv(nn.Conv2d):
    """A (2, 3) convolution padded so that output (i, j) reads input rows <= i and columns j-1..j+1
    (the stream shifts down afterwards, so that a pixel never sees its own row)."""

    def __init__(self, cin: int, cout: int, kernel=(2, 3), stride: int = 1):
        super().__init__(cin, cout, kernel, stride)
        self.pad = (kernel[1] // 2, kernel[1] // 2, kernel[0] - 1, 0)  # left, right, top, bottom

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class DownRightShiftedConv(nn.Conv2d):
    """A (2, 2) convolution whose output (i, j) reads input rows <= i and columns <= j."""

    def __init__(self, cin: int, cout: int, kernel=(2, 2), stride: int = 1):
        super().__init__(cin, cout, kernel, stride)
        self.pad = (kernel[1] - 1, 0, kernel[0] - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class ShiftedDeconv(nn.ConvTranspose2d):
    """Upsampling by 2 that keeps a stream causal: output row i reads input rows <= i // 2, and with
    `centred` (the down-shifted stream, kernel (2, 3)) columns around j // 2, else (the
    down-right-shifted stream, kernel (2, 2)) columns <= j // 2."""

    def __init__(self, cin: int, cout: int, kernel=(2, 3), centred: bool = True):
        super().__init__(cin, cout, kernel, stride=2, output_padding=1)
        extra = kernel[1] - 1  # the columns the transposed convolution adds
        self.rows, self.left, self.right = kernel[0] - 1, extra // 2 if centred else 0, extra - extra // 2 if centred else extra

    def forward(self, x):
        out = super().forward(x)
        h, w = out.shape[2:]
        return out[:, :, : h - self.rows, self.left: w - self.right]


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every row down by one (row 0 becomes zeros): (B, F, H, W)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every column right by one (column 0 becomes zeros)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class GatedResnet(nn.Module):
    """x + gate(conv(concat_elu(conv(concat_elu(x)) [+ nin(concat_elu(skip))]))): the block of both
    streams; `conv` is the stream's shifted convolution."""

    def __init__(self, filters: int, conv, skips: int = 0, dropout: float = 0.0):
        super().__init__()
        self.first = conv(2 * filters, filters)
        self.skip = nn.Conv2d(2 * skips * filters, filters, 1) if skips else None
        self.dropout = nn.Dropout(dropout)
        self.second = conv(2 * filters, 2 * filters)

    def forward(self, x, skip=None):
        h = self.first(concat_elu(x))
        if skip is not None:
            h = h + self.skip(concat_elu(skip))
        a, b = self.second(self.dropout(concat_elu(h))).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class PixelCNNpp(nn.Module):
    """The PixelCNN++ network and likelihood for (B, H, W, C) images of `bits` bits.

    `filters` per layer, `blocks` gated resnets per stage (6 stages: 3 down, 3 up), `mixtures`
    logistic components. forward(images) -> mixture parameters (B, P, H, W); nll(images) -> nats
    per image (B,). Raises ValueError for channels other than 1 and 3.
    """

    def __init__(self, channels: int = 1, bits: int = 8, filters: int = 32, blocks: int = 1, mixtures: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"PixelCNN++ here models 1 or 3 channels, not {channels}")
        self.channels, self.bits, self.mixtures = channels, bits, mixtures
        f = filters
        self.u_in = DownShiftedConv(channels + 1, f, (2, 3))
        self.ul_in = nn.ModuleList([DownShiftedConv(channels + 1, f, (1, 3)), DownRightShiftedConv(channels + 1, f, (2, 1))])
        down, right = DownShiftedConv, DownRightShiftedConv
        self.up_u = nn.ModuleList(nn.ModuleList(GatedResnet(f, down, 0, dropout) for _ in range(blocks)) for _ in range(3))
        self.up_ul = nn.ModuleList(nn.ModuleList(GatedResnet(f, right, 1, dropout) for _ in range(blocks)) for _ in range(3))
        self.downsize_u = nn.ModuleList(DownShiftedConv(f, f, (2, 3), stride=2) for _ in range(2))
        self.downsize_ul = nn.ModuleList(DownRightShiftedConv(f, f, (2, 2), stride=2) for _ in range(2))
        counts = (blocks, blocks + 1, blocks + 1)  # the down pass has one more block after each upsizing
        self.down_u = nn.ModuleList(nn.ModuleList(GatedResnet(f, down, 1, dropout) for _ in range(n)) for n in counts)
        self.down_ul = nn.ModuleList(nn.ModuleList(GatedResnet(f, right, 2, dropout) for _ in range(n)) for n in counts)
        self.upsize_u = nn.ModuleList(ShiftedDeconv(f, f, (2, 3), centred=True) for _ in range(2))
        self.upsize_ul = nn.ModuleList(ShiftedDeconv(f, f, (2, 2), centred=False) for _ in range(2))
        per_mixture = 3 if channels == 1 else 10  # weight, mean, scale (+ for colour: 3 means, 3 scales, 3 coefficients)
        self.out = nn.Conv2d(f, per_mixture * mixtures, 1)

    def scaled(self, images: torch.Tensor) -> torch.Tensor:
        """n-bit integers (B, H, W, C) -> floats in [-1, 1], (B, C, H, W)."""
        return images.permute(0, 3, 1, 2).float() * (2.0 / (2**self.bits - 1)) - 1.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.scaled(images)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # a channel of ones: where the padding is
        u = [down_shift(self.u_in(x))]
        ul = [down_shift(self.ul_in[0](x)) + right_shift(self.ul_in[1](x))]
        for stage in range(3):
            for block_u, block_ul in zip(self.up_u[stage], self.up_ul[stage]):
                u.append(block_u(u[-1]))
                ul.append(block_ul(ul[-1], u[-1]))
            if stage < 2:
                u.append(self.downsize_u[stage](u[-1]))
                ul.append(self.downsize_ul[stage](ul[-1]))
        h_u, h_ul = u.pop(), ul.pop()
        for stage in range(3):
            for block_u, block_ul in zip(self.down_u[stage], self.down_ul[stage]):
                h_u = block_u(h_u, u.pop())
                h_ul = block_ul(h_ul, torch.cat([h_u, ul.pop()], dim=1))
            if stage < 2:
                h_u, h_ul = self.upsize_u[stage](h_u), self.upsize_ul[stage](h_ul)
        assert not u and not ul, "every stored activation is used once"
        return self.out(F.elu(h_ul))

    # ------------------------------------------------------------ the discretized logistic mixture
    def mixture(self, params: torch.Tensor, x: torch.Tensor):
        """(log weights (B, K, H, W), means, log scales: (B, C, K, H, W)) given the true values x
        (B, C, H, W) in [-1, 1]: for colour, green's mean moves with red's value, blue's with both."""
        b, _, h, w = params.shape
        k, c = self.mixtures, self.channels
        logits = params[:, :k]
        rest = params[:, k:].reshape(b, -1, c, k, h, w)
        means, log_scales = rest[:, 0], rest[:, 1].clamp(min=-7.0)
        if c == 3:
            coeffs = torch.tanh(rest[:, 2])
            red, green = x[:, 0:1], x[:, 1:2]
            means = torch.stack([means[:, 0], means[:, 1] + coeffs[:, 0] * red,
                                 means[:, 2] + coeffs[:, 1] * red + coeffs[:, 2] * green], dim=1)
        return F.log_softmax(logits, dim=1), means, log_scales

    def bin_log_probs(self, means, log_scales, values: torch.Tensor) -> torch.Tensor:
        """log P(value) under each logistic (B, C, K, H, W), of n-bit integer values (B, C, 1, H, W): the
        mass of the value's bin, the end bins reaching to -inf and +inf."""
        top = 2**self.bits - 1
        half = 1.0 / top  # half a bin in [-1, 1]
        centred = values.float() * (2.0 / top) - 1.0 - means
        inv = torch.exp(-log_scales)
        upper, lower = inv * (centred + half), inv * (centred - half)
        cdf_upper, cdf_lower = torch.sigmoid(upper), torch.sigmoid(lower)
        log_cdf_upper = upper - F.softplus(upper)  # log sigmoid: for the lowest value
        log_one_minus_cdf_lower = -F.softplus(lower)  # for the highest value
        mass = (cdf_upper - cdf_lower).clamp(min=1e-12)
        # where the bin's mass is tiny, its density times the bin width (as the paper's code does)
        mid = inv * centred
        log_density = mid - log_scales - 2.0 * F.softplus(mid) + math.log(2 * half)
        inner = torch.where(mass > 1e-5, torch.log(mass), log_density)
        return torch.where(values == 0, log_cdf_upper, torch.where(values == top, log_one_minus_cdf_lower, inner))

    def pixel_log_probs(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """log p(pixel | the pixels before) in nats, (B, H, W), from the network's output and the images
        (B, H, W, C): the mixture's components are shared by a pixel's channels."""
        x = self.scaled(images)
        log_weights, means, log_scales = self.mixture(params, x)
        values = images.permute(0, 3, 1, 2).unsqueeze(2)  # (B, C, 1, H, W)
        per_component = self.bin_log_probs(means, log_scales, values).sum(dim=1) + log_weights  # (B, K, H, W)
        return torch.logsumexp(per_component, dim=1)

    def nll(self, images: torch.Tensor) -> torch.Tensor:
        """-log p(image) in nats, (B,), of n-bit integer images (B, H, W, C)."""
        return -self.pixel_log_probs(self(images), images).sum(dim=(1, 2))

    @torch.no_grad()
    def every_value_log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """log p(pixel = v | the pixels before) for every value v of a pixel's C channels (2^(nC) of them,
        red slowest), the network run on `images`: (2^(nC), B, H, W). Sums to 1 over v (the tests)."""
        params = self(images)
        levels = torch.arange(2**self.bits)
        combos = torch.cartesian_prod(*[levels] * self.channels).reshape(-1, self.channels)
        return torch.stack([self.pixel_log_probs(params, combo.expand_as(images).contiguous()) for combo in combos])
