"""The cascade as a whole: normalisation, sampling agrees with scoring, conditional sampling."""
import itertools

import pytest
import torch

from conftest import make_stages, uniform
from data.transforms import split_depth, to_slices
from pipeline.inference.cascade import Cascade


def all_images(height, width, channels, bits):
    values = torch.tensor(list(itertools.product(range(2**bits), repeat=height * width * channels)))
    return values.reshape(-1, height, width, channels)


@pytest.mark.parametrize("geometry", [
    dict(image_size=2, channels=1, bits=2, high_bits=1, subscale=2),  # all three stages, 256 images
    dict(image_size=2, channels=3, bits=1, high_bits=1, subscale=2),  # colour, no depth stage, 4096 images
    dict(image_size=2, channels=1, bits=3, high_bits=1, subscale=1),  # S = 1: no size stage, 4096 images
])
def test_probabilities_of_all_images_sum_to_one(geometry):
    cascade = Cascade(make_stages(**geometry, seed=3))
    images = all_images(geometry["image_size"], geometry["image_size"], geometry["channels"], geometry["bits"])
    log_p = sum(cascade.log_prob(images).values()).double()
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-5)
    assert log_p.max() - log_p.min() > 1.0  # a far-from-uniform distribution: the sum is not trivially 1


@pytest.mark.float_paths
def test_sampling_agrees_with_scoring():
    cascade = Cascade(make_stages(image_size=8, channels=3, bits=4, high_bits=2, subscale=2, seed=1))
    images, log_prob, _ = cascade.sample(6, generator=torch.Generator().manual_seed(0))
    scored = sum(cascade.log_prob(images).values())
    assert torch.allclose(log_prob, scored, atol=1e-4, rtol=0)


UNIFORM_GEOMETRIES = [dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2),
                      dict(image_size=4, channels=3, bits=5, high_bits=3, subscale=2),
                      dict(image_size=8, channels=3, bits=3, high_bits=1, subscale=4),
                      dict(image_size=4, channels=1, bits=3, high_bits=3, subscale=2)]  # no depth stage


def uniform_shares(geometry):
    """A uniform cascade spends n bits on every sub-pixel: b/S^2, b(S^2-1)/S^2 and n-b per dim."""
    n, b, s = geometry["bits"], geometry["high_bits"], geometry["subscale"]
    return {"first_slice": b / s**2, "size_spn": b * (s**2 - 1) / s**2, "depth_spn": n - b}


@pytest.mark.parametrize("geometry", UNIFORM_GEOMETRIES)
def test_uniform_cascade_scores_exactly_n_bits_per_dim(geometry):
    cascade = Cascade(uniform(make_stages(**geometry)))
    size, c = geometry["image_size"], geometry["channels"]
    images = torch.randint(0, 2 ** geometry["bits"], (5, size, size, c))
    parts = cascade.log_prob(images)
    expected = uniform_shares(geometry)
    for name, lp in parts.items():
        assert cascade.bpd(-lp.mean()) == pytest.approx(expected[name], rel=1e-5), name
    assert cascade.bpd(-sum(parts.values()).mean()) == pytest.approx(geometry["bits"], rel=1e-5)


def test_same_seed_same_images():
    cascade = Cascade(make_stages(image_size=8, bits=4, high_bits=2, subscale=2))
    first = cascade.sample(3, generator=torch.Generator().manual_seed(5))[0]
    again = cascade.sample(3, generator=torch.Generator().manual_seed(5))[0]
    other = cascade.sample(3, generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("n", [3, 1])  # one image: its growth pictures once failed (overlapping views)
def test_super_resolution_keeps_slice_zero(n):
    cascade = Cascade(make_stages(image_size=8, bits=4, high_bits=2, subscale=2))
    low = torch.randint(0, 16, (n, 4, 4, 1))
    m0, l0 = split_depth(low, 4, 2)
    known = {"msb": torch.zeros(n, 4, 4, 4, 1, dtype=torch.long), "lsb": torch.zeros(n, 4, 4, 4, 1, dtype=torch.long)}
    known["msb"][:, 0], known["lsb"][:, 0] = m0, l0
    images, _, frames = cascade.sample(n, known=known, fixed_msb=[0], fixed_lsb=[0], frames=True)
    assert torch.equal(to_slices(images, 2)[:, 0], low)
    assert len(frames) == 1 + 3 + 3  # start, size slices 1..3, depth slices 1..3
    assert all(frame.shape == (n, 8, 8, 1) for frame in frames)


def test_bit_depth_expansion_keeps_the_high_bits():
    cascade = Cascade(make_stages(image_size=8, bits=4, high_bits=2, subscale=2))
    image = torch.randint(0, 16, (2, 8, 8, 1))
    msb, _ = split_depth(image, 4, 2)
    images, _, _ = cascade.sample(2, known={"msb": to_slices(msb, 2)}, fixed_msb=range(4),
                                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(split_depth(images, 4, 2)[0], msb)
    assert not torch.equal(images, image)  # the low bits were drawn


def test_sampling_leaves_the_callers_tensors_alone():
    cascade = Cascade(make_stages(image_size=8, bits=4, high_bits=2, subscale=2))
    known = {"msb": torch.zeros(2, 4, 4, 4, 1, dtype=torch.long), "lsb": torch.zeros(2, 4, 4, 4, 1, dtype=torch.long)}
    before = {part: value.clone() for part, value in known.items()}
    cascade.sample(2, known=known, fixed_msb=[0], fixed_lsb=[0], generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(known[part], before[part]) for part in known)


def test_stages_of_different_geometry_do_not_make_a_cascade():
    stages = make_stages(image_size=8, bits=4, high_bits=2, subscale=2)
    stages["depth_spn"] = make_stages(image_size=[8, 4], bits=4, high_bits=2, subscale=2)["depth_spn"]
    with pytest.raises(ValueError, match=r"depth_spn was trained with image_size=\(8, 4\)"):
        Cascade(stages)


def test_an_image_does_not_depend_on_the_batch_it_was_drawn_in():
    cascade = Cascade(make_stages(image_size=8, bits=4, high_bits=2, subscale=2))
    generator = torch.Generator().manual_seed(4)
    together = cascade.sample(5, generator=generator)[0]
    generator = torch.Generator().manual_seed(4)
    apart = torch.cat([cascade.sample(size, generator=generator)[0] for size in (2, 1, 2)])
    assert torch.equal(together, apart)


@pytest.mark.float_paths
@pytest.mark.parametrize("conditional", [False, True])
def test_an_image_does_not_depend_on_how_many_processes_draw_it(conditional):
    cascade = Cascade(make_stages(image_size=8, bits=4, high_bits=2, subscale=2))
    known, fixed = None, ()
    if conditional:  # super-resolution: slice 0 given, a different one per image
        known = {"msb": torch.randint(0, 4, (5, 4, 4, 4, 1)), "lsb": torch.randint(0, 4, (5, 4, 4, 4, 1))}
        fixed = [0]
    draws = [cascade.sample(5, generator=torch.Generator().manual_seed(3), known=known, fixed_msb=fixed,
                            fixed_lsb=fixed, frames=True, workers=workers) for workers in (1, 2, 3)]
    alone, *split = draws
    for images, log_prob, frames in split:
        assert torch.equal(images, alone[0])
        assert torch.allclose(log_prob, alone[1], atol=1e-4, rtol=0)
        assert len(frames) == len(alone[2]) and all(torch.equal(a, b) for a, b in zip(frames, alone[2]))


def test_the_cascades_order_is_the_one_plan_that_sampling_scoring_coding_and_pictures_follow(monkeypatch):
    """`stages.plan` is the order; the stages model its slices, and sampling (with its growth frames),
    scoring, the codec and the validation grid take the slices in that order."""
    from pipeline.callbacks import stage_pictures
    from pipeline.codec import coder
    from stages import SubscaleStage, canonical, plan

    steps = plan.plan(["depth_spn", "first_slice", "size_spn"], 2)
    assert [(s.stage, s.part, s.k) for s in steps] == [
        ("first_slice", "msb", 0), ("size_spn", "msb", 1), ("size_spn", "msb", 2), ("size_spn", "msb", 3),
        ("depth_spn", "lsb", 0), ("depth_spn", "lsb", 1), ("depth_spn", "lsb", 2), ("depth_spn", "lsb", 3)]
    assert plan.cascade_stages(1, 8, 8) == ["first_slice"] and plan.cascade_stages(2, 5, 3) == list(plan.ORDER)
    stages = make_stages(image_size=4, channels=1, bits=3, high_bits=2, subscale=2)
    cascade = Cascade(stages)
    assert cascade.plan() == steps
    for name, stage in stages.items():
        assert stage.modelled_slices() == [s.k for s in steps if s.stage == name]
        assert (stage.part, stage.context_parts) == (plan.PART[name], plan.READS[name])

    seen = []
    sample_slice, slice_nll, context = SubscaleStage.sample_slice, SubscaleStage.slice_nll, canonical.context

    def record(kind, stage, k):
        seen.append((kind, stage.stage, int(k if isinstance(k, int) else k[0])))

    monkeypatch.setattr(SubscaleStage, "sample_slice", lambda self, known, k, *a, **kw:
                        (record("sample", self, k), sample_slice(self, known, k, *a, **kw))[1])
    monkeypatch.setattr(SubscaleStage, "slice_nll", lambda self, known, k: (record("score", self, k),
                                                                              slice_nll(self, known, k))[1])
    monkeypatch.setattr(canonical, "context", lambda stage, known, k: (record("code", stage, k),
                                                                       context(stage, known, k))[1])
    order = [(s.stage, s.k) for s in steps]
    images, _, frames = cascade.sample(2, generator=torch.Generator().manual_seed(0), frames=True, workers=1)
    assert [(name, k) for kind, name, k in seen if kind == "sample"] == order and len(frames) == len(steps) + 1
    seen.clear()
    cascade.log_prob(images)
    assert [(name, k) for kind, name, k in seen if kind == "score"] == order
    seen.clear()
    coder.compress(cascade, images, workers=1)
    assert [(name, k) for kind, name, k in seen if kind == "code"][: len(order)] == order  # then the probe's
    seen.clear()
    stage = stages["size_spn"]
    batch = {"msb": torch.zeros(2, 4, 4, 1, dtype=torch.long), "lsb": torch.zeros(2, 4, 4, 1, dtype=torch.long)}
    stage_pictures(stage, batch, 2)
    assert [(name, k) for kind, name, k in seen if kind == "sample"] == [step for step in order if step[0] == "size_spn"]
