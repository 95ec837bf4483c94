"""backplay's own ViT (:mod:`.model`) and the timm / Hugging Face / torchvision / backplay checkpoint
loaders (:mod:`.checkpoints`): ``bp.gpu.vit.load(path)``. The model is one more model for the reader
(docs/theory.md sections 10 and 11); nothing here explains."""

from .checkpoints import (CheckpointError, HeadsUnknownError, KeyMismatchError, UnknownFormatError,
                          convert_state_dict, detect_format, infer_config, load, load_state_dict_any,
                          read_state_dict, unwrap_state_dict)
from .model import FREEZABLE, BlockTrace, ViT, ViTConfig, ViTTrace, patch_relevance, vit_b_16, vit_tiny_test

__all__ = ["ViTConfig", "ViT", "ViTTrace", "BlockTrace", "FREEZABLE", "vit_b_16", "vit_tiny_test",
           "patch_relevance", "load", "load_state_dict_any", "detect_format", "convert_state_dict",
           "infer_config", "read_state_dict", "unwrap_state_dict", "CheckpointError", "UnknownFormatError",
           "HeadsUnknownError", "KeyMismatchError"]
