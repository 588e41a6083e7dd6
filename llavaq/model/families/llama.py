"""Llama (LLaVA-1.5, llava-hf/llava-1.5-{7,13}b-hf): RMSNorm, no biases, SwiGLU, RoPE, GQA allowed."""

from llavaq.model.families.base import DecoderFamily, LayerRoles

LLAMA = DecoderFamily(
    model_type="llama",
    name="Llama",
    layer_class="transformers.models.llama.modeling_llama:LlamaDecoderLayer",
    norm_class="transformers.models.llama.modeling_llama:LlamaRMSNorm",
    roles=LayerRoles(),
    norm="rms",
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
    qkv_kind="llama_qkv",
    mlp_kind="llama_gate_up",
    msmodelslim_m2=True,  # msModelSlim's LlavaQuantDecoder (keeps transformers' child order)
)
