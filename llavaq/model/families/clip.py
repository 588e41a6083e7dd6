"""CLIP vision tower (LLaVA-1.5, bakLlava): class token, ``pre_layrnorm``, LayerNorm with bias, quick_gelu.

The tower's forward also runs ``post_layernorm`` on the pooled class token: no Linear, nothing to
calibrate. msModelSlim's m2 wraps ``CLIPEncoderLayer`` (``LlavaClipVision``), which re-registers the
layer's children as layer_norm1, layer_norm2, self_attn, mlp: its saver writes them in that order.
"""

from llavaq.model.families.base import EncoderFamily, LayerRoles

CLIP = EncoderFamily(
    model_type="clip_vision_model",
    name="CLIP",
    layer_class="transformers.models.clip.modeling_clip:CLIPEncoderLayer",
    embeddings_class="transformers.models.clip.modeling_clip:CLIPVisionEmbeddings",
    roles=LayerRoles(o="self_attn.out_proj", gate=None, up="mlp.fc1", down="mlp.fc2",
                     attn_norm="layer_norm1", mlp_norm="layer_norm2"),
    norm="layer",
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    qkv_kind="clip_qkv",
    mlp_kind="clip_fc1",
    msmodelslim_m2=True,
    m2_child_order=("layer_norm1", "layer_norm2", "self_attn", "mlp"),
    pre_norm="pre_layrnorm",
    class_token=True,
    layer_args=(None, None),  # attention_mask, causal_attention_mask
    attn_kwargs={"causal_attention_mask": None},
)
