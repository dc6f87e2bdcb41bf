"""Pictures a person can judge: grids at an integer zoom with a thin grey gap, at least 512 px wide."""
import torch

from pipeline.inference.pictures import GAP, image_grid


def test_grids_are_zoomed_by_an_integer_with_a_gap_between_images():
    images = torch.randint(0, 256, (16, 28, 28, 1), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    grid = image_grid(images)
    zoom = 5  # the smallest integer making four 28 px columns with their gaps 512 px wide or more
    side = 4 * (28 * zoom + GAP) + GAP
    assert grid.shape == (side, side, 1) and side >= 512
    cell = 28 * zoom + GAP
    for i in (0, 5, 15):
        r, c = divmod(i, 4)
        tile = grid[GAP + r * cell: GAP + r * cell + 28 * zoom, GAP + c * cell: GAP + c * cell + 28 * zoom]
        assert (tile == images[i].repeat_interleave(zoom, 0).repeat_interleave(zoom, 1).numpy()).all()  # exact pixels
    assert (grid[:GAP] == 128).all() and (grid[:, cell:cell + GAP] == 128).all()  # the gaps
    assert image_grid(torch.zeros(2, 600, 600, 3, dtype=torch.uint8)).shape == (600 + 2 * GAP, 1200 + 3 * GAP, 3)


def test_a_long_growth_shows_at_most_twelve_frames_with_the_high_bits_complete():
    from pipeline.inference.pictures import shown_frames

    assert shown_frames(5) == [0, 1, 2, 3, 4]  # the default's five frames: all
    for count in (13, 17, 65, 129, 1000, 5000):
        frames = shown_frames(count)
        assert frames[0] == 0 and frames[-1] == count - 1 and frames == sorted(set(frames)) and len(frames) <= 12
    assert {1, 64, 128} <= set(shown_frames(129))  # S = 8 with a depth stage: first slice, all high bits, all
