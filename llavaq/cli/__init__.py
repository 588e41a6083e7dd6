"""``llavaq`` console app: a thin Typer + rich shell over :mod:`llavaq.api` and the library.

Flags keep msModelSlim's LLaVA script names (``--model_path --calib_images --save_directory
--part_file_size --w_bit --a_bit --device_type --trust_remote_code --mindie_format``).

- :mod:`~llavaq.cli.options`: the recipe options, derived from ``QuantRecipe``'s fields and defaults
- :mod:`~llavaq.cli.quantize`, :mod:`~llavaq.cli.calibrate`, :mod:`~llavaq.cli.inspect`,
  :mod:`~llavaq.cli.verify`: the commands (parse, call the library, render)
- :mod:`~llavaq.cli.render`: every rich table
- :mod:`~llavaq.cli.app`: the Typer app and the entry point's error handling
"""

from llavaq.cli import calibrate, inspect, quantize, verify
from llavaq.cli.app import app, main

for _command in (quantize.quantize, calibrate.calibrate, calibrate.export, inspect.inspect, verify.verify):
    app.command()(_command)

__all__ = ["app", "main"]
