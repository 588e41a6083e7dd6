"""Weight-only parity with msModelSlim 26.1.0 (issue 28): W8A16 / W4A16, per channel and per group, symmetric and
asymmetric, ascendV1 (int4 packed) and MindIE's safe_tensor (unpacked), bit-identical tensor by tensor.

msModelSlim's weight-only quantization is data-free round-to-nearest (``msms_runner.py --a_bit 16``); llavaq's
weight-only recipes carry no smoothing, so the same calibration photos give the same tensors. Its GPTQ
(``w_method='GPTQ'``) is another algorithm than llavaq's (its own Hessian, damping and order) and is not compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llavaq.formats.reader import read_quantized
from llavaq.recipe import QuantRecipe
from llavaq.testing import build_tiny_llava

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_parity_msmodelslim import (  # noqa: E402
    _require_reference,  # noqa: F401  (the module's skip / CI-failure rule)
    assert_parity,
    parity_images,  # noqa: F401  (fixture)
    run_llavaq,
    run_msms,
)

pytestmark = pytest.mark.parity

CASES = {  # name: (w_bit, group_size, w_sym, mindie)
    "w8a16_channel_sym": (8, 0, True, False),
    "w8a16_channel_asym": (8, 0, False, False),
    "w4a16_channel_sym": (4, 0, True, False),
    "w4a16_g32_asym": (4, 32, False, False),
    "w4a16_g32_sym_mindie": (4, 32, True, True),
}


@pytest.fixture(scope="module")
def model64(tmp_path_factory) -> Path:
    """The tiny GQA LLaVA with every Linear 64 or 128 columns wide (groups of 32 divide them all)."""
    return build_tiny_llava(tmp_path_factory.mktemp("wo64"), kv_heads=2, vision_hidden=64, vision_intermediate=128)


@pytest.mark.parametrize("name", list(CASES))
def test_weight_only_parity(name, model64, parity_images, tmp_path):  # noqa: F811
    w_bit, gs, sym, mindie = CASES[name]
    extra = ("--w_bit", str(w_bit), "--a_bit", "16", "--group_size", str(gs), "--w_sym", str(sym).lower())
    run_msms(model64, parity_images, tmp_path / "msms", mindie=mindie, extra=extra)
    recipe = QuantRecipe(w_bit=w_bit, a_bit=16, group_size=gs, w_sym=sym)
    run_llavaq(model64, parity_images, tmp_path / "llavaq", tmp_path / "cache",
               fmt="mindie" if mindie else "msmodelslim", recipe=recipe)
    rep = assert_parity(tmp_path / "llavaq", tmp_path / "msms")
    assert rep["identical"], rep
    qt = f"W{w_bit}A16"
    desc_name = f"quant_model_description_{qt.lower()}.json" if mindie else "quant_model_description.json"
    desc = json.loads((tmp_path / "llavaq" / desc_name).read_text())
    assert desc["model_quant_type"] == qt and ("group_size" in desc) == (gs > 0 and not mindie)
    # read back: codes unpacked, group scales, a consistent file
    view = read_quantized(tmp_path / "llavaq")
    assert view.check() == []
    lv = view.linear("language_model.model.layers.0.self_attn.q_proj")
    assert lv.weight.shape == (64, 64) and lv.weight_scale.shape == (64, 2 if gs else 1) and lv.bits == w_bit
    assert lv.activation == "none" and int(lv.weight.min()) >= -(2 ** (w_bit - 1))
