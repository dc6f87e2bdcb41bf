"""Two samplers of one cascade agree when their images are equal but where the first difference is
a near-tie of the inverse CDF (`pipeline.inference.agreement`): what the sampler tests and `make bench` hold
every sampler to, on any CPU."""
import pytest
import torch

from conftest import make_stages
from pipeline.inference.agreement import EPSILON, compare, near_tie
from pipeline.inference.cascade import Cascade
from stages.networks import log_probs

pytestmark = pytest.mark.float_paths  # CI runs these under other CPU kernels too (.ci/run)

GEOMETRY = dict(image_size=4, channels=1, bits=4, high_bits=4, subscale=2)


def test_a_near_tie_is_a_uniform_within_epsilon_of_every_boundary_between_the_two_values():
    log_p = torch.full((4,), 0.25).log()  # CDF boundaries at 0.25, 0.5, 0.75
    assert near_tie(log_p, 0.5 + EPSILON / 2, 1, 2) and near_tie(log_p, 0.5 - EPSILON / 2, 2, 1)
    assert not near_tie(log_p, 0.5 + 2 * EPSILON, 1, 2)
    assert not near_tie(log_p, 0.5, 1, 3)  # two boundaries apart: 0.75 is far from the uniform
    assert near_tie(torch.tensor([0.5, 1e-9, 0.5]).log(), 0.5, 0, 2)  # a value of no mass between them


def first_subpixel_cdf(cascade):
    """The CDF of the cascade's first sub-pixel (slice 0, pixel (0, 0), channel 0): unconditional."""
    decoder = cascade.stages["first_slice"].decoder
    with torch.no_grad():
        logits = decoder(torch.zeros(1, decoder.cfg.length, dtype=torch.long))[0, 0]
    return torch.softmax(log_probs(logits).double(), -1).cumsum(-1)


class FirstUniform:
    """`Cascade.slice_noise` with the first image's first uniform set to `uniform`."""

    def __init__(self, cascade, uniform: float):
        self.cascade, self.uniform, self.first = cascade, uniform, True

    def __call__(self, stream):
        noise = torch.rand(self.cascade.h * self.cascade.w * self.cascade.C, generator=stream)
        if self.first:
            noise[0], self.first = self.uniform, False
        return noise


def test_images_are_identical_near_ties_or_disagreements():
    stages = make_stages(**GEOMETRY)
    with torch.no_grad():
        stages["first_slice"].decoder.head.weight.div_(20)  # a spread first sub-pixel: boundaries inside (0, 1)
    cascade = Cascade(stages)
    cdf = first_subpixel_cdf(cascade)
    value = int((cdf[:-1] - 0.5).abs().argmin())  # the boundary between value and value + 1 nearest 0.5
    for uniform, expected in ((float(cdf[value]), "near_ties"), (float(cdf[value]) - 0.01, "disagree")):
        seeds = cascade.image_seeds(3, torch.Generator().manual_seed(0))
        cascade.slice_noise = FirstUniform(cascade, uniform)
        images = cascade.sample(3, generator=torch.Generator().manual_seed(0), method="cached", workers=1)[0]
        cascade.slice_noise = FirstUniform(cascade, uniform)
        assert compare(cascade, seeds, images, images) == {"identical": 3, "near_ties": 0, "disagree": 0}
        other = images.clone()
        other[0, 0, 0, 0] = value + 1 if int(images[0, 0, 0, 0]) == value else value  # the boundary's other side
        cascade.slice_noise = FirstUniform(cascade, uniform)
        assert compare(cascade, seeds, images, other) == {"identical": 2, expected: 1,
                                                          **({"disagree": 0} if expected == "near_ties" else
                                                             {"near_ties": 0})}, expected


@pytest.mark.parametrize("experiment", ["fashion_mnist", "photos32"])
def test_every_sampler_draws_the_references_images_but_at_float_ties(experiment):
    """The cascades `make bench` times (at shrunk widths), every sampler against the reference (`cached`,
    one process), 16 images: the C++ loop, the Python fast step, and the default in processes."""
    from benchmarks.sampling import cascade_of

    cascade = cascade_of(experiment, shrink=True)
    seeds = cascade.image_seeds(16, torch.Generator().manual_seed(0))
    draws = {method: cascade.sample(16, generator=torch.Generator().manual_seed(0), method=method, workers=workers)
             for method, workers in (("cached", 1), ("incremental", 1), ("native", 1), ("fast", None))}
    reference, log_prob = draws.pop("cached")[:2]
    for method, (images, other_log_prob, _) in draws.items():
        verdict = compare(cascade, seeds, reference, images)
        assert verdict["disagree"] == 0, (method, verdict)
        same = (images == reference).flatten(1).all(1)
        assert torch.allclose(other_log_prob[same], log_prob[same], atol=5e-3), method  # 3,072 sub-pixels each
