import numpy as np
import pytest

from gazemonai.gaze.fixations import read_fixation_csv
from gazemonai.gaze.realism import fraction_inside
from gazemonai.gaze.simulate import GazeSimulator, simulate_fixations, simulate_gaze_folder
from gazemonai.prep.synthetic import synthetic_polyp


def disk(h=100, w=140, cy=50, cx=70, r=25):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_seeded_and_reproducible_per_image():
    m = disk()
    a = simulate_fixations(m, "a.png", seed=3)
    b = simulate_fixations(m, "a.png", seed=3)
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_array_equal(a.duration, b.duration)
    assert not np.array_equal(simulate_fixations(m, "a.png", seed=4).xy[:5], a.xy[:5])
    assert not np.array_equal(simulate_fixations(m, "b.png", seed=3).xy[:5], a.xy[:5])


def test_sequence_is_plausible():
    m = disk()
    sim = GazeSimulator(seed=0)
    inside, n, first_centre = [], [], []
    for i in range(40):
        fx = sim(m, f"img{i}.png")
        assert np.all((fx.xy >= 0) & (fx.xy <= 1))
        assert np.all(fx.duration >= 50)
        assert np.all(np.diff(fx.start) > fx.duration[:-1])  # saccades between fixations
        np.testing.assert_array_equal(fx.index, np.arange(1, len(fx) + 1))
        inside.append(fraction_inside(fx, m))
        n.append(len(fx))
        first_centre.append(np.hypot(*(fx.xy[0] - 0.5)))
    assert 0.8 < np.mean(inside) < 0.95  # mostly on target, some noise and off-target glances
    assert 5 <= min(n) and max(n) <= 99 and 18 < np.median(n) < 35
    assert np.median(first_centre) < 0.2  # the search starts near the screen centre


def test_centre_to_boundary_order():
    from scipy import ndimage

    m = disk(200, 200, 100, 100, 80)
    depth = ndimage.distance_transform_edt(m)
    early, late = [], []
    for i in range(30):
        fx = GazeSimulator(seed=1, off_target=0.0, noise=0.0)(m, f"x{i}.png", n_fixations=30)
        r = np.clip((fx.xy[1:, 1] * 200).astype(int), 0, 199)
        c = np.clip((fx.xy[1:, 0] * 200).astype(int), 0, 199)
        d = depth[r, c]
        early.append(d[:10].mean())
        late.append(d[-10:].mean())
    assert np.mean(early) > np.mean(late) + 10


def test_empty_mask_still_gives_fixations():
    fx = simulate_fixations(np.zeros((30, 40), bool), "empty.png")
    assert len(fx) >= 5 and (fx.height, fx.width) == (30, 40)


def test_bad_mask_and_name():
    with pytest.raises(ValueError, match="2-D"):
        simulate_fixations(np.zeros((2, 3, 4)), "a.png")
    with pytest.raises(ValueError, match="path separator"):
        simulate_fixations(disk(), "dir/a.png")


def test_folder_to_csv_round_trip(tmp_path):
    from PIL import Image

    (tmp_path / "masks").mkdir()
    for i in range(3):
        _, m = synthetic_polyp((40, 50), seed=i)
        Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "masks" / f"m{i}.png")
    out = simulate_gaze_folder(
        tmp_path / "masks", tmp_path / "gaze.csv", GazeSimulator(seed=2), image_suffix=".jpg"
    )
    back = read_fixation_csv(tmp_path / "gaze.csv")
    assert sorted(back) == ["m0.jpg", "m1.jpg", "m2.jpg"]
    assert out["fixations"] == sum(len(f) for f in back.values())
    direct = GazeSimulator(seed=2)(np.asarray(Image.open(tmp_path / "masks" / "m1.png")) > 0, "m1.jpg")
    np.testing.assert_allclose(back["m1.jpg"].xy, direct.xy)
