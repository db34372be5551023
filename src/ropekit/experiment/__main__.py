"""``python -m ropekit.experiment``: see :func:`ropekit.experiment.run`."""

from . import run

if __name__ == "__main__":
    raise SystemExit(run())
