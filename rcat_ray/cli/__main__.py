"""``python -m rcat_ray.cli``: the same as the ``rcat-ray`` console script."""

from rcat_ray.cli.main import run

run()
