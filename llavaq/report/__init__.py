"""HTML reports of ``verify`` and ``--recipe auto`` (charts need the optional extra: ``pip install llavaq[report]``).

- :func:`build_page` (pure): the verify report dict, the output's record, tuning document and activation ranges
  -> one self-contained HTML page;
- :func:`write_report`: read an output directory's documents, build the page, write it atomically;
- :func:`compare_rows` / :mod:`llavaq.report.compare`: two verify reports side by side (``make demo``).
"""

from llavaq.report.charts import require_matplotlib
from llavaq.report.compare import compare_rows
from llavaq.report.files import (
    activation_ranges,
    check_report_target,
    output_documents,
    write_auto_report,
    write_report,
    write_text_atomic,
)
from llavaq.report.page import build_page

__all__ = ["activation_ranges", "build_page", "check_report_target", "compare_rows", "output_documents",
           "require_matplotlib", "write_auto_report", "write_report", "write_text_atomic"]
