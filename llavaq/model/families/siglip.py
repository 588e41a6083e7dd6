"""SigLIP vision tower (llava-interleave-qwen): no class token, no pre-norm, LayerNorm with bias, tanh-GELU.

transformers 4.37.2's ``SiglipVisionModel`` runs ``post_layernorm`` and a multihead-attention pooling
``head`` inside LLaVA's vision-tower call although LLaVA uses only ``hidden_states[vision_feature_layer]``.
msModelSlim quantizes every Linear that is called: the head's ``mlp.fc1``/``mlp.fc2`` are (calibrated
on the pooled token), so llavaq quantizes them too. The head's ``attention.out_proj`` is an
``nn.Linear`` that ``nn.MultiheadAttention`` never calls (it reads its weight): msModelSlim wraps it
anyway, its observer never sees an activation, and its save crashes (``input_scale`` is None); llavaq
keeps it float. Checkpoints without the head (llava-interleave's ``vision_use_head: false``) have
none of this; transformers 4.37.2 would build the head with random weights, llavaq leaves it out.

msModelSlim 26.1.0's m2 does not wrap ``SiglipEncoderLayer``: nothing is smoothed by default;
``--m2_scope all`` uses CLIP's blocks (msModelSlim's ``llava_vit_qkv`` / ``c_fc`` kernels, exact GELU).
"""

from llavaq.model.families.base import EncoderFamily, LayerRoles

SIGLIP = EncoderFamily(
    model_type="siglip_vision_model",
    name="SigLIP",
    layer_class="transformers.models.siglip.modeling_siglip:SiglipEncoderLayer",
    embeddings_class="transformers.models.siglip.modeling_siglip:SiglipVisionEmbeddings",
    roles=LayerRoles(o="self_attn.out_proj", gate=None, up="mlp.fc1", down="mlp.fc2",
                     attn_norm="layer_norm1", mlp_norm="layer_norm2"),
    norm="layer",
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    qkv_kind="clip_qkv",
    mlp_kind="clip_fc1",
    msmodelslim_m2=False,
    pre_norm=None,
    class_token=False,
    post_head=("post_layernorm", "head"),
    head_class="transformers.models.siglip.modeling_siglip:SiglipMultiheadAttentionPoolingHead",
    uncalled_linears=("head.attention.out_proj",),
    layer_args=(None,),  # attention_mask
)
