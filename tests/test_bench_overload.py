import pytest

from bench.overload import fixed_capacities, main


def test_a_fixed_capacity_is_read_per_model() -> None:
    assert fixed_capacities(["xception=5.5", "mobilenet=20"]) == {"xception": 5.5, "mobilenet": 20.0}


@pytest.mark.parametrize("pair", ["xception", "xception=fast", "xception=0", "xception=-1"])
def test_a_bad_capacity_is_a_usage_error_before_anything_starts(
    pair: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--capacity", pair])
    assert stopped.value.code == 2
    assert "--capacity" in capsys.readouterr().err
