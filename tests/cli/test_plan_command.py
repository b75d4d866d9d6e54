"""`python -m memengine plan`: a value it cannot use gets one line naming the flag and exit status 2, never a
traceback (issue 19: --heads 30 and --layers 0 printed tracebacks); a good call prints the plan."""

import pytest

from memengine.cli import main

SMALL = ["plan", "--layers", "2", "--hidden", "64", "--heads", "4", "--seq", "32", "--budget", "1GiB"]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--heads", "30"], "--heads 30 does not divide --hidden 64"),
        (["--layers", "0"], "--layers must be at least 1"),
        (["--seq", "0"], "--seq must be positive"),
        (["--micro-batch", "0"], "--micro-batch must be positive"),
        (["--budget", "50%"], "--budget 50%"),
        (["--budget", "0"], "--budget 0: must be positive"),
    ],
)
def test_a_bad_value_gets_one_line_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*SMALL, *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error and "Traceback" not in error, error


def test_a_good_call_prints_the_plan(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(SMALL)
    assert exit_info.value.code == 0
    assert "baselines" in capsys.readouterr().out
