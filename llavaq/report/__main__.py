"""``python -m llavaq.report -- NAME=OUTPUT ...``: outputs side by side (see :mod:`llavaq.report.compare`)."""

import sys

from llavaq.report.compare import main

sys.exit(main())
