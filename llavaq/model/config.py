"""A llava-hf LLaVA config, validated: what transformers 4.37.2 can build *and* run, each refusal one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llavaq.errors import ModelError
from llavaq.model.checkpoint import Checkpoint
from llavaq.model.families import TEXT_FAMILIES, VISION_FAMILIES
from llavaq.model.layout import FEATURE_STRATEGIES


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name if it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_llava_config(ckpt: Checkpoint, trust_remote_code: bool = False) -> Any:
    """The checkpoint's ``LlavaConfig``, after checking that llavaq can run it (else :class:`ModelError`)."""
    import transformers
    from transformers import LlavaConfig

    cfg = ckpt.config_dict
    cfg_path = ckpt.path / "config.json"
    _check_architecture(cfg, cfg_path, trust_remote_code)
    tf = f"transformers {transformers.__version__}"
    for key, table, default in (("text_config", TEXT_FAMILIES, "llama"),
                                ("vision_config", VISION_FAMILIES, "clip_vision_model")):
        _check_sub_config(cfg, key, table, default, cfg_path, tf)
    try:
        config = LlavaConfig.from_dict({k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()})
    except Exception as e:
        raise ModelError(f"{cfg_path}: invalid LLaVA config ({first_line(e)})") from None
    check_fields(config, cfg_path, tf)
    return config


def _check_architecture(cfg: dict, cfg_path: Path, trust_remote_code: bool) -> None:
    archs = cfg.get("architectures") or []
    mt = cfg.get("model_type")
    if cfg.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"{cfg_path}: this model needs custom code (auto_map); llavaq only runs the built-in LLaVA "
            "code. Pass --trust_remote_code True only if you trust it (llavaq still requires a "
            "llava-hf LLaVA architecture)"
        )
    if mt != "llava":
        what = f"model_type {mt!r}" + (f" ({archs[0]})" if archs else "")
        raise ModelError(
            f"{cfg_path}: {what} is not a LLaVA checkpoint; llavaq quantizes llava-hf "
            "LlavaForConditionalGeneration models (e.g. llava-hf/llava-1.5-7b-hf)"
        )
    if archs and archs[0] != "LlavaForConditionalGeneration":
        raise ModelError(f"{cfg_path}: architecture {archs[0]} is not supported (LlavaForConditionalGeneration)")


def _check_sub_config(cfg: dict, key: str, table: dict, default: str, cfg_path: Path, tf: str) -> None:
    """``text_config`` / ``vision_config``: a supported family that transformers can build."""
    from transformers import CONFIG_MAPPING

    sub = cfg.get(key)
    if sub is None:
        return
    if not isinstance(sub, dict):
        raise ModelError(f"{cfg_path}: {key} must be a JSON object")
    sub_type = sub.get("model_type", default)
    if sub_type not in CONFIG_MAPPING:
        raise ModelError(f"{cfg_path}: {key}.model_type {sub_type!r} is not known to {tf}, which llavaq "
                         f"runs LLaVA with (supported: {', '.join(table)})")
    if sub_type not in table:
        raise ModelError(f"{cfg_path}: {key}.model_type {sub_type!r} is not supported "
                         f"(supported: {', '.join(table)})")
    try:
        CONFIG_MAPPING[sub_type](**dict(sub))
    except Exception as e:  # transformers raises many kinds here; its messages name the field
        raise ModelError(f"{cfg_path}: {key} ({sub_type}) cannot be built by {tf}: {first_line(e)}") from None


def check_fields(config: Any, cfg_path: Path, tf: str) -> None:
    """Fields transformers 4.37.2 accepts in the config but cannot run: one line naming the field."""
    _check_vision_features(config, cfg_path, tf)
    tc, vc = config.text_config, config.vision_config
    if config.image_token_index >= tc.vocab_size:
        raise ModelError(
            f"{cfg_path}: image_token_index {config.image_token_index} is outside the embedding table "
            f"(vocab_size {tc.vocab_size})"
        )
    for sub, name in ((tc, "text_config"), (vc, "vision_config")):
        if sub.hidden_size % sub.num_attention_heads:
            raise ModelError(f"{cfg_path}: {name}.hidden_size {sub.hidden_size} is not a multiple of "
                             f"num_attention_heads {sub.num_attention_heads}")
    head_dim = getattr(tc, "head_dim", None)
    if head_dim is not None and head_dim != tc.hidden_size // tc.num_attention_heads:
        raise ModelError(f"{cfg_path}: text_config.head_dim {head_dim} differs from hidden_size / "
                         f"num_attention_heads = {tc.hidden_size // tc.num_attention_heads}, which {tf} uses")
    for name in TEXT_FAMILIES[tc.model_type].unsupported_fields:
        if getattr(tc, name, None) is not None:
            raise ModelError(f"{cfg_path}: text_config.{name} is set, but {tf}'s {tc.model_type} model ignores "
                             "it (the model would compute something else)")
    kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    if tc.num_attention_heads % kv:
        raise ModelError(f"{cfg_path}: text_config.num_attention_heads {tc.num_attention_heads} is not a "
                         f"multiple of num_key_value_heads {kv}")


def _check_vision_features(config: Any, cfg_path: Path, tf: str) -> None:
    """``vision_feature_select_strategy`` and ``vision_feature_layer``: what 4.37.2's LLaVA supports."""
    strategy = config.vision_feature_select_strategy
    if strategy not in FEATURE_STRATEGIES:
        raise ModelError(f"{cfg_path}: vision_feature_select_strategy {strategy!r} is not supported by {tf}'s "
                         f"LLaVA ({', '.join(FEATURE_STRATEGIES)})")
    layer, n = config.vision_feature_layer, config.vision_config.num_hidden_layers
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ModelError(f"{cfg_path}: vision_feature_layer {layer!r} must be one integer for {tf}'s LLaVA")
    if not -(n + 1) <= layer <= n:
        raise ModelError(f"{cfg_path}: vision_feature_layer {layer} is outside the vision tower's hidden states "
                         f"({-(n + 1)}..{n} for {n} layers)")
