"""Mistral (bakLlava, llava-hf/bakLlava-v1-hf): Llama's layer with GQA and a sliding window.

msModelSlim 26.1.0's multimodal m2 wraps ``LlamaDecoderLayer`` only, so on a Mistral language model it
smooths nothing: with the default recipe llavaq does the same (``--m2_scope all`` smooths it too).
"""

import dataclasses

from llavaq.model.families.llama import LLAMA

MISTRAL = dataclasses.replace(
    LLAMA,  # the same roles, norm, biases and m2 blocks
    model_type="mistral",
    name="Mistral",
    layer_class="transformers.models.mistral.modeling_mistral:MistralDecoderLayer",
    norm_class="transformers.models.mistral.modeling_mistral:MistralRMSNorm",
    msmodelslim_m2=False,
    unsupported_fields=("rope_scaling",),  # no RoPE scaling in 4.37.2's Mistral
    inert_fields=(("sliding_window", "transformers 4.37.2 applies it only in eager/flash attention; LLaVA runs "
                   "its language model with SDPA, whose mask ignores it"),),
)
