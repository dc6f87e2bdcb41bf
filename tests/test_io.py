"""Writing outputs (`pipeline.io`): whole or not at all, through symbolic links, one writer at a time."""
import json
import multiprocessing

import numpy as np

from conftest import make_stages, save_cascade
from pipeline.__main__ import main as cli
from pipeline.io import atomic_write, folder_at_once
from test_evaluate import experiment_file, images_file

SMOKE = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)


def leftovers(*folders) -> list[str]:
    return [p.name for folder in folders for p in folder.iterdir() if ".old-" in p.name or ".partial-" in p.name]


def test_a_folder_written_through_a_symbolic_link_goes_to_its_target(tmp_path):
    target, link = tmp_path / "elsewhere" / "outputs", tmp_path / "run" / "samples"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    link.parent.mkdir()
    link.symlink_to(target)
    with folder_at_once(link) as folder:
        (folder / "new.txt").write_text("new")
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # the folder replaced, as without a link
    assert not leftovers(target.parent, link.parent)


def test_a_file_written_through_a_symbolic_link_goes_to_its_target(tmp_path):
    target, link = tmp_path / "elsewhere" / "eval.json", tmp_path / "run" / "eval.json"
    target.parent.mkdir()
    target.write_text("old")
    link.parent.mkdir()
    link.symlink_to(target)
    atomic_write(link, b"new")
    assert link.is_symlink() and target.read_text() == "new"
    dangling = tmp_path / "run" / "new.spn"  # a link to a file not written yet
    dangling.symlink_to(tmp_path / "elsewhere" / "new.spn")
    atomic_write(dangling, b"spn")
    assert dangling.is_symlink() and (tmp_path / "elsewhere" / "new.spn").read_bytes() == b"spn"
    assert not leftovers(target.parent, link.parent)


def test_samples_and_eval_json_go_through_links_to_folders_elsewhere(tmp_path):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "big_disk"
    save_cascade(make_stages(**SMOKE), run_dir)
    (elsewhere / "samples").mkdir(parents=True)
    (run_dir / "samples").symlink_to(elsewhere / "samples")
    (elsewhere / "eval.json").write_text("{}")
    (run_dir / "eval.json").symlink_to(elsewhere / "eval.json")
    exp = str(experiment_file(tmp_path, SMOKE))
    assert cli(["sample", "--exp", exp, "--run-dir", str(run_dir), "--n", "2"]) == 0
    images = str(images_file(tmp_path, SMOKE))
    assert cli(["evaluate", "--exp", exp, "--run-dir", str(run_dir), "--images", images]) == 0
    assert (run_dir / "samples").is_symlink() and (run_dir / "eval.json").is_symlink()
    assert np.load(elsewhere / "samples" / "samples.npz")["images"].shape == (2, 8, 8, 1)
    assert json.loads((elsewhere / "eval.json").read_text())["n_images"] == 6
    assert not leftovers(run_dir, elsewhere)


def write_many_times(folder, writer: int, times: int) -> None:
    for i in range(times):
        with folder_at_once(folder) as partial:
            for name in ("samples.npz", "grid.png"):
                (partial / name).write_text(f"{writer} {i}")


def test_two_writers_of_one_folder_take_turns_and_leave_it_whole(tmp_path):
    folder = tmp_path / "run" / "samples"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=write_many_times, args=(folder, writer, 300)) for writer in range(2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(120)
    assert [process.exitcode for process in writers] == [0, 0]  # neither failed ("Directory not empty")
    contents = {(folder / name).read_text() for name in ("samples.npz", "grid.png")}
    assert len(contents) == 1 and contents.pop().endswith(" 299")  # one writer's whole folder, its last
    assert sorted(p.name for p in folder.parent.iterdir()) == [".samples.lock", "samples"]
