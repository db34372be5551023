"""`ropekit experiment ...` hands every argument to ropekit.experiment's own parser."""

from ropekit.cli import main


def test_experiment_routes_arguments(capsys):
    assert main(["experiment", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--smoke" in out and "ropekit experiment" in out
    assert main(["experiment", "--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err
