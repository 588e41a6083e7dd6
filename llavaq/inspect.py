"""``llavaq inspect`` (being built: issue #4)."""

from llavaq.errors import LlavaqError


def run_inspect(path, json_out=False, console=None) -> int:
    raise LlavaqError("llavaq inspect is not available in this build yet")
