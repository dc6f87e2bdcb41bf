"""Causality, the Monte-Carlo estimator, cached decoding and the paper-sized configs."""
import dataclasses
import os
import subprocess
import time

import pytest
import torch

from conftest import assert_same_draws, make_stages
from data.transforms import to_sequence
from pipeline.config import load_experiment
from stages import STAGES
from stages.networks import DecoderConfig, SliceDecoder, ordinal_rows


def slice_logits(stage, known, k):
    """Logits (B, T, V) of slice k given `known`, the way training and scoring compute them."""
    ids = torch.full((known["msb"].shape[0],), k)
    values = to_sequence(stage.target(known)[:, k]).long()
    return stage.decoder(values, stage.context(known, ids))


def random_known(stage, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, stage.S**2, stage.h, stage.w, stage.C)
    hp = stage.hparams
    return {"msb": torch.randint(0, 2**hp.high_bits, shape, generator=g),
            "lsb": torch.randint(0, 2 ** (hp.bits - hp.high_bits), shape, generator=g)}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["first_slice", "size_spn", "depth_spn"])
def test_prediction_ignores_later_subpixels_and_later_slices(name, channels):
    stage = make_stages(image_size=8, channels=channels, bits=4, high_bits=2, subscale=2)[name]
    part = "lsb" if name == "depth_spn" else "msb"
    known = random_known(stage)
    modelled = stage.modelled_slices()
    T = stage.h * stage.w * stage.C
    with torch.no_grad():
        for k in modelled:
            base = slice_logits(stage, known, k)
            for t in (0, 1, T // 2, T - 1):  # change sub-pixel t of slice k: positions <= t must not move
                changed = {p: v.clone() for p, v in known.items()}
                flat = changed[part][:, k].reshape(2, -1)
                flat[:, t] = (flat[:, t] + 1) % (int(known[part].max()) + 1)
                changed[part][:, k] = flat.reshape(changed[part][:, k].shape)
                after = slice_logits(stage, changed, k)
                assert torch.allclose(after[:, : t + 1], base[:, : t + 1], atol=1e-5), (k, t)
                if t + 1 < T:  # ... while the next position does see it (the test can fail)
                    assert not torch.allclose(after[:, t + 1], base[:, t + 1], atol=1e-5)
            later = [j for j in range(stage.S**2) if j > k]
            if later:  # change every later slice, MSB and LSB alike
                changed = {p: v.clone() for p, v in known.items()}
                for p in ("msb", "lsb") if name != "depth_spn" else ("lsb",):
                    changed[p][:, later] = (changed[p][:, later] + 1) % 2
                assert torch.allclose(slice_logits(stage, changed, k), base, atol=1e-5), k
            if name == "size_spn":  # the size SPN never sees low bits
                changed = {"msb": known["msb"], "lsb": torch.zeros_like(known["lsb"])}
                assert torch.allclose(slice_logits(stage, changed, k), base, atol=1e-5)


def test_context_sees_earlier_slices():
    """The conditioning actually conditions: changing an earlier slice changes the prediction."""
    stage = make_stages(subscale=2)["size_spn"]
    known = random_known(stage)
    changed = {p: v.clone() for p, v in known.items()}
    changed["msb"][:, 0] = (changed["msb"][:, 0] + 1) % 4
    with torch.no_grad():
        assert not torch.allclose(slice_logits(stage, changed, 3), slice_logits(stage, known, 3), atol=1e-4)


@pytest.mark.parametrize("name", ["size_spn", "depth_spn"])
def test_each_stages_context_reads_what_the_cascades_plan_says(name):
    """The context of slice k changes with a slice exactly when `stages.plan.READS` names its part (of
    the stage's own part, only the slices drawn before k: `known_before`)."""
    from stages.plan import PART, READS, known_before

    stage = make_stages(subscale=2)[name]
    known, k = random_known(stage), 2
    ids = torch.full((2,), k)
    with torch.no_grad():
        base = stage.context(known, ids)
        for part, levels in (("msb", 2**stage.hparams.high_bits), ("lsb", 2 ** (stage.hparams.bits - stage.hparams.high_bits))):
            for j in range(stage.S**2):
                changed = {p: v.clone() for p, v in known.items()}
                changed[part][:, j] = (changed[part][:, j] + 1) % levels
                read = part in READS[name] and (part != PART[name] or j in known_before(part, k, stage.S))
                assert (not torch.allclose(stage.context(changed, ids), base, atol=1e-6)) == read, (part, j)


def test_a_new_slice_order_written_in_the_plan_is_the_order_each_context_reads(monkeypatch):
    """Written in `stages.plan` only, another order of the size SPN's slices (3, 1, 2 after slice 0) is
    what it models and what its contexts read: slice 1 reads slices 0 and 3, not 2."""
    from stages import plan

    monkeypatch.setitem(plan.SLICES, "size_spn", lambda S: [3, 1, 2])
    stage = make_stages(subscale=2)["size_spn"]
    assert stage.modelled_slices() == [3, 1, 2]
    assert [step.k for step in plan.plan(plan.ORDER, 2) if step.part == "msb"] == [0, 3, 1, 2]
    known, ids = random_known(stage), torch.full((2,), 1)
    with torch.no_grad():
        base = stage.context(known, ids)
        for j, read in ((0, True), (3, True), (2, False), (1, False)):
            changed = {p: v.clone() for p, v in known.items()}
            changed["msb"][:, j] = (changed["msb"][:, j] + 1) % 2**stage.hparams.high_bits
            assert (not torch.allclose(stage.context(changed, ids), base, atol=1e-6)) == read, j


@pytest.mark.parametrize("name", ["first_slice", "size_spn", "depth_spn"])
def test_monte_carlo_estimator_averages_to_the_exact_nll(name):
    stage = make_stages(subscale=2)[name]
    known = random_known(stage, batch=3)
    slices = stage.modelled_slices()
    with torch.no_grad():
        exact = stage.nll(known)
        estimates = [stage.estimate(known, torch.full((3,), k)) for k in slices]  # what training draws
    assert torch.allclose(torch.stack(estimates).mean(0), exact, rtol=1e-5)


@pytest.mark.parametrize("name", ["first_slice", "size_spn", "depth_spn"])
def test_training_draws_each_of_the_stages_own_slices_equally_often(name, monkeypatch):
    """The estimator's draw, through the real training step: exactly the stage's slices, uniformly."""
    stage = make_stages(subscale=4, image_size=8)[name]
    drawn = []

    def spy(known, k):
        drawn.append(k)
        return torch.zeros(len(k), requires_grad=True)

    monkeypatch.setattr(stage, "slice_nll", spy)
    monkeypatch.setattr(stage, "log", lambda *args, **kwargs: None)
    x = torch.randint(0, 16, (4000, 8, 8, 1))
    stage.training_step({"image": x, "msb": x >> 2, "lsb": x & 3}, 0)
    counts = torch.bincount(torch.cat(drawn), minlength=16)
    modelled = stage.modelled_slices()
    assert set(torch.nonzero(counts).flatten().tolist()) == set(modelled)
    expected = 4000 / len(modelled)
    assert (counts[modelled] - expected).abs().max() < 5 * expected**0.5  # 5 standard deviations


@pytest.mark.parametrize("layers", [2, 1])
def test_a_stage_started_from_the_first_slice_decoder_predicts_as_it_does_before_reading_its_context(layers):
    """init_from: the size SPN's decoder takes the first-slice decoder's weights (its first `layers` blocks);
    with its context projection at zero it then gives, for every slice and context, the logits of those."""
    first = make_stages(bits=4, high_bits=4)["first_slice"]  # b = n: both stages model 4-bit values
    size = make_stages(bits=4, high_bits=4, seed=1, layers=layers)["size_spn"]
    projection = size.decoder.context_projection.weight.clone()
    size.start_from(first)
    assert torch.equal(size.decoder.context_projection.weight, projection)  # the context is still its own
    assert torch.equal(size.decoder.head.weight, first.decoder.head.weight)
    with torch.no_grad():
        size.decoder.context_projection.weight.zero_()
        size.decoder.context_projection.bias.zero_()
        reference = SliceDecoder(dataclasses.replace(first.decoder.cfg, layers=layers))  # its first `layers` blocks
        reference.load_state_dict({key: value for key, value in first.decoder.state_dict().items()
                                   if not key.startswith(f"blocks.{layers}.")})
        known = random_known(size, batch=3)
        for k in size.modelled_slices():
            values = to_sequence(known["msb"][:, k]).long()
            assert torch.allclose(slice_logits(size, known, k), reference(values), atol=1e-5), k


def test_a_new_decoder_starts_with_rows_smooth_in_the_value():
    """ordinal_init: neighbouring values start with nearly the same value-embedding and head rows, at the
    scale nn.Embedding and nn.Linear give, from 32 values (5 bits) on; without it, or with fewer values, the rows
    are PyTorch's random ones."""
    def neighbour_similarity(rows):
        rows = torch.nn.functional.normalize(rows, dim=1)
        return float((rows[:-1] * rows[1:]).sum(1).mean())

    torch.manual_seed(0)
    for ordinal in (True, False):
        decoder = SliceDecoder(DecoderConfig(n_values=256, slice_shape=(2, 2, 1), width=64, ordinal_init=ordinal))
        embedding, head = decoder.value_embedding.weight[:256], decoder.head.weight
        for rows, std in ((embedding, 1.0), (head, 1 / (3 * 64) ** 0.5)):
            assert float(rows.std()) == pytest.approx(std, rel=0.1)
            assert (neighbour_similarity(rows) > 0.9) if ordinal else (abs(neighbour_similarity(rows)) < 0.2)
    torch.manual_seed(1)
    rows = SliceDecoder(DecoderConfig(n_values=32, slice_shape=(2, 2, 1), width=64)).head.weight  # 5 bits
    assert neighbour_similarity(rows) > 0.9
    for n_values in (2, 4, 16):  # under 5 bits the rows stay random, as without ordinal_init
        made = []
        for ordinal in (True, False):
            torch.manual_seed(2)
            made.append(SliceDecoder(DecoderConfig(n_values=n_values, slice_shape=(2, 2, 1), width=16,
                                                   ordinal_init=ordinal)).state_dict())
        assert all(torch.equal(made[0][key], made[1][key]) for key in made[0])
    with pytest.raises(ValueError, match="at least 32"):
        ordinal_rows(16, 8, 1.0)


def test_a_decoder_that_does_not_fit_is_refused_naming_what_differs():
    first = make_stages(bits=4, high_bits=4)["first_slice"]
    for net, what in (({"width": 24, "context_width": 24}, "its position is (16, 24), the first_slice's has (16, 16)"),
                      ({"heads": 4}, "its heads are 4, the first_slice's 2"),
                      ({"layers": 3}, "its blocks.2.norm1.weight is (16,), the first_slice's has none")):
        size = make_stages(bits=4, high_bits=4, **net)["size_spn"]
        before = {key: value.clone() for key, value in size.state_dict().items()}
        with pytest.raises(ValueError, match="cannot start from the first_slice decoder") as error:
            size.start_from(first)
        assert what in str(error.value) and "or remove init_from" in str(error.value)
        assert all(torch.equal(value, before[key]) for key, value in size.state_dict().items())  # nothing copied
    with pytest.raises(ValueError, match="from the decoder of an earlier stage .first_slice, size_spn."):
        STAGES["depth_spn"](image_size=8, bits=4, high_bits=2, subscale=2, init_from="depth_spn")
    with pytest.raises(ValueError, match="it has none"):
        STAGES["first_slice"](image_size=8, bits=4, high_bits=2, subscale=2, init_from="first_slice")


@pytest.mark.parametrize("channels", [1, 3])
def test_each_subpixel_is_conditioned_on_its_own_pixels_context(channels):
    """Changing pixel p's context vector changes the predictions for p's sub-pixels, never earlier ones."""
    stage = make_stages(channels=channels, subscale=2)["size_spn"]
    decoder, T = stage.decoder, stage.h * stage.w * channels
    values = torch.randint(0, 4, (2, T))
    context = torch.randn(2, stage.h * stage.w, stage.hparams.context_width)
    with torch.no_grad():
        base = decoder(values, context)
        for pixel in (0, 1, 5, stage.h * stage.w - 1):
            changed = context.clone()
            changed[:, pixel] += 1.0
            after = decoder(values, changed)
            first = pixel * channels  # sub-pixels first .. first + C - 1 belong to this pixel
            assert torch.allclose(after[:, :first], base[:, :first], atol=1e-5), pixel
            for t in range(first, first + channels):
                assert not torch.allclose(after[:, t], base[:, t], atol=1e-4), (pixel, t)


@pytest.mark.float_paths
def test_cached_attention_in_chunks_matches_one_causal_pass():
    """Positions fed to the key/value cache several at a time after a prefix see exactly the keys
    at or before their own position, as in one causal pass over the whole sequence."""
    from stages.networks import KVCache, SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(width=8, heads=2).eval()
    x = torch.randn(2, 9, 8)
    whole = attention(x, causal=True)
    cache = KVCache(1, 2, 2, 9, 4, "cpu", torch.float32)
    chunks = [attention(x[:, a:b], True, cache, 0, a) for a, b in ((0, 3), (3, 4), (4, 9))]
    assert torch.allclose(torch.cat(chunks, dim=1), whole, atol=1e-6)


@pytest.mark.float_paths
@pytest.mark.parametrize("channels", [1, 3])
def test_cached_decoding_matches_the_full_forward_pass(channels):
    stage = make_stages(channels=channels, subscale=2)["size_spn"]
    known = random_known(stage)
    ctx = stage.context(known, torch.full((2,), 1))
    decoder = stage.decoder
    with torch.no_grad():
        values, _ = decoder.sample(2, ctx, generator=torch.Generator().manual_seed(0))
        full = decoder(values, ctx)
        cache, tokens = decoder.new_cache(2, "cpu"), decoder.context_tokens(ctx)
        previous = torch.full((2,), decoder.start_token)
        for t in range(values.shape[1]):
            step = decoder.step(previous, t, tokens, cache)
            assert torch.allclose(step, full[:, t], atol=1e-4), t
            previous = values[:, t]
        draws = {method: decoder.sample(2, ctx, generator=torch.Generator().manual_seed(7), method=method)
                 for method in ("fast", "native", "incremental", "cached", "recompute")}
    assert_same_draws(decoder, ctx, 7, draws, "cached")  # the same draws from the same noise, but at float ties


@pytest.mark.float_paths
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("name,channels", [("first_slice", 3), ("size_spn", 1), ("size_spn", 3)])
def test_the_cpp_sampler_draws_what_the_reference_draws(name, channels, temperature, batch):
    """stages/slice_sampler.cpp against `SliceDecoder.step`: unconditional and with a context,
    one and three channels, at another temperature, one image and several; heads of 16 and of 8."""
    for heads in (2, 4):
        stage = make_stages(channels=channels, subscale=2, width=32, heads=heads)[name]
        known = random_known(stage, batch=batch)
        k = 0 if name == "first_slice" else 3
        ctx = stage.context(known, torch.full((batch,), k)) if stage.context_net is not None else None
        with torch.no_grad():
            draws = {method: stage.decoder.sample(batch, ctx, temperature, torch.Generator().manual_seed(3),
                                                  method=method) for method in ("native", "cached")}
        assert_same_draws(stage.decoder, ctx, 3, draws, "cached", temperature)


def test_ctrl_c_stops_the_cpp_sampler_within_a_step(ctrl_c):
    """The C++ loop checks for signals at every step: Ctrl+C does not wait for the slice to end."""
    torch.manual_seed(0)
    decoder = SliceDecoder(DecoderConfig(n_values=256, slice_shape=(32, 32, 3), width=32, layers=2, heads=2)).eval()
    with torch.no_grad():
        decoder.sample(1, method="native")  # built and loaded
        start = time.perf_counter()
        decoder.sample(24, method="native")
        whole = time.perf_counter() - start  # seconds for the slice, about 3 here
        killer = subprocess.Popen(["sh", "-c", f"sleep {whole / 10:.3f}; kill -INT {os.getpid()}"])  # as a terminal does
        start = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            decoder.sample(24, method="native")
        assert time.perf_counter() - start < whole / 2
        killer.wait()


@pytest.mark.float_paths
def test_without_a_compiler_sampling_keeps_to_the_python_step(monkeypatch, capsys):
    """A failed build is one note on stderr; "fast" then decodes in Python, "native" says it cannot run."""
    from torch.utils import cpp_extension

    from stages import native

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'spn_slice_sampler': c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert native.load.__wrapped__() is None
    failed = [line for line in capsys.readouterr().err.splitlines() if "could not be built" in line]
    assert len(failed) == 1 and failed[0].startswith("note: the C++ slice sampler") and "c++: not found" in failed[0]
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert native.load.__wrapped__() is None
    assert "no C++ compiler: no-such-compiler is not on PATH" in capsys.readouterr().err

    monkeypatch.setattr(native, "load", lambda: None)
    stage = make_stages(subscale=2)["size_spn"]
    known = random_known(stage)
    ctx = stage.context(known, torch.full((2,), 1))
    with torch.no_grad():
        draws = {method: stage.decoder.sample(2, ctx, generator=torch.Generator().manual_seed(5), method=method)
                 for method in ("fast", "cached")}
        assert_same_draws(stage.decoder, ctx, 5, draws, "cached")
        with pytest.raises(RuntimeError, match="not available"):
            stage.decoder.sample(2, ctx, generator=torch.Generator().manual_seed(5), method="native")


PAPER_EXPERIMENTS = ["celebahq256_5bit", "imagenet64", "photos32"]


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_paper_configs_run_one_step_on_random_data(experiment):
    """The paper-sized settings instantiate and train one step with the network shrunk."""
    config = load_experiment(experiment)
    data = config["data"]
    geometry = {k: data[k] for k in ("image_size", "channels", "bits", "high_bits", "subscale")}
    size = data["image_size"]
    x = torch.randint(0, 2 ** data["bits"], (1, size, size, data["channels"]))
    low = data["bits"] - data["high_bits"]
    batch = {"image": x, "msb": x >> low, "lsb": x & ((1 << low) - 1)}
    for name, spec in config["stages"].items():
        model_args = {**spec.get("model", {}), "width": 8, "layers": 1, "heads": 2, "context_width": 8,
                      "context_layers": 1, "context_attention_layers": 0}
        stage = STAGES[name](**geometry, **model_args)
        optimizer = torch.optim.SGD(stage.parameters(), lr=0.1)
        loss = len(stage.modelled_slices()) * stage.slice_nll(stage.sliced(batch), torch.tensor([stage.modelled_slices()[-1]]))
        loss.mean().backward()
        optimizer.step()
        assert torch.isfinite(loss).all()
