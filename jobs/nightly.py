"""`ray job submit ... -- python jobs/nightly.py --config jobs/configs/<file>.yaml`: the CLI's `nightly` command.

Inside a job, Ray is joined through RAY_ADDRESS (a bare `ray.init()`), so the same script runs locally
and on a cluster unchanged.
"""

import sys

from rcat_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
