"""``llavaq verify`` (being built: issue #5)."""

from llavaq.errors import LlavaqError


def run_verify(*args, **kwargs) -> int:
    raise LlavaqError("llavaq verify is not available in this build yet")
