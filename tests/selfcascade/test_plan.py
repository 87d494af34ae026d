import itertools
import math

import pytest

from selfcascade.plan import StageSize, plan_stages

SD_NATIVE = 512
SD_MULTIPLE = 64


def plan(w: int, h: int) -> list[StageSize]:
    return plan_stages(w, h, SD_NATIVE, SD_NATIVE, SD_MULTIPLE)


def test_target_at_or_below_native_is_one_stage() -> None:
    assert plan(512, 512) == [StageSize(512, 512)]
    assert plan(256, 384) == [StageSize(256, 384)]
    assert plan(640, 384) == [StageSize(640, 384)]  # fewer pixels than 512^2


def test_2x_and_4x_square_follow_the_paper() -> None:
    assert plan(1024, 1024) == [StageSize(512, 512), StageSize(1024, 1024)]
    assert plan(2048, 2048) == [StageSize(512, 512), StageSize(1024, 1024), StageSize(2048, 2048)]


def test_non_square_base_keeps_native_pixels_at_target_aspect() -> None:
    stages = plan(2048, 1024)
    base = stages[0]
    assert base.width / base.height == pytest.approx(2.0, rel=0.1)
    assert base.pixels == pytest.approx(SD_NATIVE**2, rel=0.15)
    assert stages[-1] == StageSize(2048, 1024)


def test_odd_sizes_end_exactly_at_the_target() -> None:
    stages = plan(1000, 1200)
    assert stages[-1] == StageSize(1000, 1200)


@pytest.mark.parametrize(
    ("w", "h"),
    list(itertools.product([520, 768, 1024, 1536, 2040, 3072, 4096], [512, 1024, 1800, 4096])),
)
def test_every_stage_grows_at_most_2x_per_side_and_is_rounded(w: int, h: int) -> None:
    stages = plan(w, h)
    assert stages[-1] == StageSize(w, h)
    for prev, nxt in itertools.pairwise(stages):
        assert nxt.width >= prev.width and nxt.height >= prev.height
        assert nxt.pixels > prev.pixels
        assert nxt.width <= 2 * prev.width and nxt.height <= 2 * prev.height
    for s in stages[:-1]:
        assert s.width % SD_MULTIPLE == 0 and s.height % SD_MULTIPLE == 0


@pytest.mark.parametrize(
    ("native", "multiple"), [(SD_NATIVE, SD_MULTIPLE), (64, 16), (1024, 128)]
)
def test_no_stage_grows_a_side_more_than_2x_the_last_one_included(
    native: int, multiple: int
) -> None:
    # Rounding the last middle stage down once left a final step of 2.045x (360x472 on the
    # 64 px demo model: 176x256 -> 360x472).
    sides = range(native + multiple, 8 * native + 1, multiple // 2)
    for w, h in itertools.product(sides[::7], sides[::5]):
        stages = plan_stages(w, h, native, native, multiple)
        assert stages[-1] == StageSize(w, h)
        for prev, nxt in itertools.pairwise(stages):
            assert nxt.width <= 2 * prev.width and nxt.height <= 2 * prev.height, (w, h, stages)
    assert plan_stages(360, 472, 64, 64, 16)[-2] == StageSize(192, 256)


def test_stage_count_is_log4_of_pixel_ratio_plus_one() -> None:
    for side in (1024, 2048, 4096):
        ratio = side**2 / SD_NATIVE**2
        assert len(plan(side, side)) == math.ceil(math.log(ratio, 4)) + 1
