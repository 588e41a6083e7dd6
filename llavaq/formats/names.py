"""LLaVA module and tensor names across transformers layouts, and compressed-tensors name patterns.

llavaq's own names are transformers 4.37's (the llava-hf checkpoint keys; vLLM's module names too). The
loaded model's module names differ by transformers version:

==============================  =================================  ===============================
4.37-4.51, vLLM, checkpoints    4.52-5.5                           >= 5.6 (CLIP without vision_model)
==============================  =================================  ===============================
``language_model.model.X``      ``model.language_model.X``         ``model.language_model.X``
``language_model.lm_head``      ``lm_head``                        ``lm_head``
``vision_tower.vision_model.X`` ``model.vision_tower.vision_model.X``  ``model.vision_tower.X``
``multi_modal_projector.X``     ``model.multi_modal_projector.X``  ``model.multi_modal_projector.X``
==============================  =================================  ===============================

transformers 5.x renames checkpoint keys on load (``conversion_mapping.py``: the ``"llava"`` renamings and, from
5.6, ``"CLIPVisionModel": [PrefixChange(prefix_to_remove="vision_model")]``) and reverts the renamings it used
on ``save_pretrained``, so files usually keep the 4.37 keys; a model loaded from new-layout keys (or built
from a config) saves new-layout keys, and transformers 5.10-5.23 also wrote ``model.language_model.model.X``
for some models (its ``"legacy"`` mapping reads it back). :func:`to_internal` maps all of these to the
internal names.

compressed-tensors matches ``ignore`` / ``targets`` entries against the *loaded model's* module names:
``re:`` entries with :func:`re.match`, others by equality (``compressed_tensors/utils/match.py``
``match_name``; 0.8.1: ``quantization/lifecycle/apply.py`` ``_find_matches``), and vLLM does the same
against its own module names (the 4.37 form: ``vllm/model_executor/models/llava.py`` builds
``language_model``/``vision_tower``/``multi_modal_projector`` with those prefixes; ``re:`` entries are kept
as they are by ``CompressedTensorsConfig.apply_vllm_mapper`` and matched with ``re.match`` by
``utils/config_utils.py`` ``is_equal_or_regex_match``; README "Output formats" cites versions and lines).
So a plain name matches one layout only; :func:`module_pattern` writes one anchored ``re:`` pattern that
matches the module in all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: (other layout's prefix, internal prefix), longest first; applied to the start of a name.
_PREFIXES = (
    ("model.language_model.model.", "language_model.model."),  # transformers 5.10-5.23 "legacy" duplicate
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),  # >= 5.6: CLIPVisionModel has no vision_model level
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)

#: the module-name layouts of the loaded model, by transformers version (:func:`layouts` gives a module's name
#: in each); vLLM's own module names are the first
LAYOUT_NAMES = ("transformers 4.37-4.51", "transformers 4.52-5.5", "transformers >= 5.6")


def to_internal(name: str) -> str:
    """A tensor or module name of any layout as llavaq's (transformers 4.37) name."""
    if name == "lm_head":
        return "language_model.lm_head"
    for other, internal in _PREFIXES:
        if name.startswith(other):
            return internal + name[len(other):]
    return name


def layouts(name: str) -> tuple[str, str, str]:
    """Internal module/tensor ``name`` as each of :data:`LAYOUT_NAMES` names it in the loaded model."""
    if name == "language_model.lm_head" or name.startswith("language_model.lm_head."):
        new = name[len("language_model."):]
        return name, new, new
    if name.startswith("language_model.model."):
        new = "model.language_model." + name[len("language_model.model."):]
        return name, new, new
    if name.startswith("vision_tower.vision_model."):
        return name, "model." + name, "model.vision_tower." + name[len("vision_tower.vision_model."):]
    if name.startswith("multi_modal_projector."):
        return name, "model." + name, "model." + name
    return name, name, name


def new_layout(name: str) -> str:
    """Internal ``name`` as the newest transformers names it (>= 5.6)."""
    return layouts(name)[2]


def module_pattern(name: str) -> str:
    """One compressed-tensors ``re:`` entry matching internal module ``name`` in every layout, nothing else."""
    if name == "language_model.lm_head":
        return r"re:^(?:language_model\.)?lm_head$"
    for head, alternatives in (("language_model.model.", r"(?:language_model\.model|model\.language_model)\."),
                               ("vision_tower.vision_model.", r"(?:model\.)?vision_tower\.(?:vision_model\.)?"),
                               ("multi_modal_projector.", r"(?:model\.)?multi_modal_projector\.")):
        if name.startswith(head):
            return "re:^" + alternatives + re.escape(name[len(head):]) + "$"
    return "re:^" + re.escape(name) + "$"


def entry_matches(entry: str, module_name: str) -> bool:
    """compressed-tensors' rule for one ignore/target entry and one module name (``re.match`` or equality)."""
    if entry.startswith("re:"):
        try:
            return re.match(entry[3:], module_name) is not None
        except re.error:
            return False
    return entry == module_name


def matching_layouts(entries: Iterable[str], name: str) -> tuple[bool, ...]:
    """Per layout of :data:`LAYOUT_NAMES`: whether any entry matches internal module ``name`` there."""
    entries = list(entries)
    return tuple(any(entry_matches(e, n) for e in entries) for n in layouts(name))
