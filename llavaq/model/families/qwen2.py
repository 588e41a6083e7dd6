"""Qwen2 (llava-interleave-qwen-{0.5b,7b}-hf): Llama's layer with q/k/v biases.

RMSNorm has no bias, so smoothing moves no channel shift here (scale only): the q/k/v biases stay as
they are and enter the m2 block (``x Wᵀ + b`` before RoPE), so the search measures the real q/k/v.
msModelSlim 26.1.0's multimodal m2 does not wrap ``Qwen2DecoderLayer``: with the default recipe
nothing is smoothed, as there (``--m2_scope all`` smooths it).
"""

from llavaq.model.families.base import DecoderFamily, LayerRoles

QWEN2 = DecoderFamily(
    model_type="qwen2",
    name="Qwen2",
    layer_class="transformers.models.qwen2.modeling_qwen2:Qwen2DecoderLayer",
    norm_class="transformers.models.qwen2.modeling_qwen2:Qwen2RMSNorm",
    roles=LayerRoles(),
    norm="rms",
    qkv_bias=True,
    o_bias=False,
    mlp_bias=False,
    qkv_kind="llama_qkv",
    mlp_kind="llama_gate_up",
    msmodelslim_m2=False,
    unsupported_fields=("rope_scaling",),  # no RoPE scaling in 4.37.2's Qwen2
    inert_fields=(("use_sliding_window", "transformers 4.37.2 implements Qwen2's sliding window only with flash "
                   "attention; LLaVA runs its language model with SDPA"),),
)
