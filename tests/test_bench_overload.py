import pytest

from bench.overload import capacity_pair, main


def test_a_fixed_capacity_is_read_per_model() -> None:
    assert capacity_pair("xception=5.5") == ("xception", 5.5)
    assert capacity_pair("mobilenet=20") == ("mobilenet", 20.0)


@pytest.mark.parametrize("pair", ["xception", "xception=fast", "xception=0", "xception=-1"])
def test_a_bad_capacity_is_a_usage_error_before_anything_starts(
    pair: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--capacity", pair])
    assert stopped.value.code == 2
    assert "--capacity" in capsys.readouterr().err
