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

import dataclasses

from llavaq.model.families.clip import CLIP

SIGLIP = dataclasses.replace(
    CLIP,  # the same roles, LayerNorm with biases and m2 blocks
    model_type="siglip_vision_model",
    name="SigLIP",
    layer_class="transformers.models.siglip.modeling_siglip:SiglipEncoderLayer",
    embeddings_class="transformers.models.siglip.modeling_siglip:SiglipVisionEmbeddings",
    msmodelslim_m2=False,
    m2_child_order=None,
    pre_norm=None,
    class_token=False,
    post_head=("post_layernorm", "head"),
    head_class="transformers.models.siglip.modeling_siglip:SiglipMultiheadAttentionPoolingHead",
    uncalled_linears=("head.attention.out_proj",),
    layer_args=(None,),  # attention_mask
    attn_kwargs={},
)
