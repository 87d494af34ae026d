import math

import pytest

from selfcascade.errors import InvalidRequest
from selfcascade.request import GenerationRequest


def req(**overrides: object) -> GenerationRequest:
    values: dict = {"prompt": "a red circle", "width": 128, "height": 128, **overrides}
    return GenerationRequest(**values)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"width": 4}, "width"),
        ({"height": 0}, "height"),
        ({"width": 130}, "width"),
        ({"width": 128.0}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"pivot_strength": 0.0}, "pivot_strength"),
        ({"pivot_strength": 1.5}, "pivot_strength"),
        ({"pivot_strength": math.nan}, "pivot_strength"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": math.inf}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"method": "magic"}, "method"),
        ({"scheduler": "pndm"}, "scheduler"),
        ({"upsample_mode": "nearest"}, "upsample_mode"),
    ],
)
def test_invalid_values_raise_one_typed_error_naming_the_parameter(
    overrides: dict, param: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        req(**overrides).validate(size_multiple=8)
    assert info.value.param == param
    assert param in str(info.value)


def test_valid_request_passes() -> None:
    req(pivot_strength=1.0, guidance_scale=0.0, seed=2**32 - 1).validate(size_multiple=8)
