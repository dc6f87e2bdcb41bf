import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.transforms import (check_settings, from_sequence, from_slices, merge_depth, pixel_of_subpixel, quantize,
                             split_depth, to_sequence, to_slices)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # shared, noisy CPUs
@given(bits=st.integers(1, 8), data=st.data())
def test_depth_split_round_trip(bits, data):
    high_bits = data.draw(st.integers(1, bits))
    x = torch.randint(0, 2**bits, (3, 4, 5, 2))
    msb, lsb = split_depth(x, bits, high_bits)
    assert msb.max() < 2**high_bits and lsb.max() < 2 ** (bits - high_bits)
    assert torch.equal(merge_depth(msb, lsb, bits, high_bits), x)
    assert torch.equal(msb, x >> (bits - high_bits))  # m is the b most significant bits


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # shared, noisy CPUs
@given(s=st.integers(1, 4), hs=st.integers(1, 4), ws=st.integers(1, 4), c=st.sampled_from([1, 3]),
       b=st.integers(1, 3))
def test_subscale_round_trip(s, hs, ws, c, b):
    x = torch.randint(0, 256, (b, hs * s, ws * s, c), dtype=torch.uint8)
    slices = to_slices(x, s)
    assert slices.shape == (b, s * s, hs, ws, c)
    assert torch.equal(from_slices(slices, s), x)


def test_slice_order_is_raster_order_of_offsets():
    x = torch.arange(4 * 6).reshape(1, 4, 6, 1)
    slices = to_slices(x, 2)
    for i in range(2):
        for j in range(2):
            assert torch.equal(slices[0, i * 2 + j], x[0, i::2, j::2])


def test_quantize_drops_least_significant_bits():
    x = torch.tensor([0, 7, 8, 255], dtype=torch.uint8)
    assert quantize(x, 5).tolist() == [0, 0, 1, 31]
    assert torch.equal(quantize(x, 8), x)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=9), "bits=9"),
    (dict(bits=0), "bits=0"),
    (dict(bits=5, high_bits=6), "high_bits=6"),
    (dict(bits=5, high_bits=0), "high_bits=0"),
    (dict(subscale=0), "subscale=0"),
    (dict(subscale=3, height=28), "height 28 is not divisible by subscale=3"),
    (dict(subscale=4, height=28, width=30), "width 30 is not divisible by subscale=4"),
])
def test_invalid_settings_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_settings(**kwargs)


def test_transforms_check_their_inputs():
    with pytest.raises(ValueError, match="not divisible"):
        to_slices(torch.zeros(1, 6, 6, 1), 4)
    with pytest.raises(ValueError, match="expected S\\*S = 4"):
        from_slices(torch.zeros(1, 3, 2, 2, 1), 2)
    with pytest.raises(ValueError, match="high_bits=9"):
        split_depth(torch.zeros(2), 8, 9)


def test_subpixels_of_a_slice_are_pixels_in_raster_order_channels_innermost():
    x = torch.arange(2 * 3 * 3).reshape(1, 2, 3, 3)  # (B, h, w, C): value = (y*w + x)*C + c
    assert to_sequence(x).tolist() == [list(range(18))]
    assert torch.equal(from_sequence(to_sequence(x), 2, 3), x)
    assert pixel_of_subpixel(2, 3, 3).tolist() == [p for p in range(6) for _ in range(3)]
