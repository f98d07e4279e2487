"""``python -m benchmarks.s3``: see :mod:`benchmarks.s3.s3_bench`."""

import sys

from .s3_bench import main

sys.exit(main())
