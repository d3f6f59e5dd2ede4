"""`ray job submit ... -- python jobs/study.py --config jobs/configs/<file>.yaml`: the CLI's `study` command.

Inside a job, Ray is joined through RAY_ADDRESS (a bare `ray.init()`), so the same script runs locally
and on a cluster unchanged. Submitted again after an interruption, the study resumes where it stopped.
"""

import sys

from rcat_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
