"""The paper's preprocessing, per backbone family (``backbone.preprocess=paper``, the default).

The paper extracted its features through thingsvision 2.7.2, which preprocesses by where a
model comes from:

* timm models (the supervised ViTs): timm's own eval transform of the model
  (``resolve_model_data_config`` + ``create_transform(is_training=False)``);
* OpenCLIP models: the ``preprocess`` that ``open_clip.create_model_and_transforms`` returns;
* torch-hub models, which is how the paper loads DINOv2 and MAE: thingsvision's default,
  ``Resize(256)`` (bilinear, on the PIL image) -> ``CenterCrop(224)`` -> ``ToTensor`` ->
  ``Normalize`` with the ImageNet mean and std. DINOv2 therefore runs at 224 px, with its
  positional embeddings interpolated as the hub model does at that size (see
  :mod:`alfusion.backbones.pos_embed`).

``backbone.preprocess=model`` gives every model its own eval transform instead (timm's data
config for DINOv2 and MAE too: 518 px for DINOv2, a bicubic 248 px resize for MAE).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torchvision is imported where a transform is built: config checks stay light
    import torchvision.transforms as T

PREPROCESS_MODES = ("paper", "model")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_RESIZE = 256  # thingsvision's default resize_dim, as the paper calls it
HUB_CROP = 224  # thingsvision's default crop_dim


def preprocess_mode(cfg) -> str:
    """``cfg.preprocess`` of a backbone config; a config without the key means ``paper``."""
    mode = cfg.get("preprocess") or "paper"
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"backbone.preprocess={mode!r} is not allowed: one of "
                         f"{', '.join(PREPROCESS_MODES)}")
    return mode


def is_paper_dinov2(timm_name: str) -> bool:
    """True for the paper's DINOv2 architectures (``vit_*_patch14_dinov2``), not for DINOv2
    with registers (``vit_*_patch14_reg4_dinov2``: not a paper backbone, timm's own rule)."""
    arch = timm_name.partition(".")[0]
    return arch.endswith("_dinov2") and not re.search(r"_reg\d+_dinov2$", arch)


def loaded_from_torch_hub(timm_name: str) -> bool:
    """True for the timm names whose weights the paper loaded from torch hub instead of timm:
    DINOv2 (``vit_*_patch14_dinov2``, no registers) and MAE (the ``.mae`` tag)."""
    return is_paper_dinov2(timm_name) or timm_name.partition(".")[2] == "mae"


def hub_transform(crop: int = HUB_CROP) -> T.Compose:
    """thingsvision's default transform for torch-hub models: PIL image -> (3, crop, crop).

    At the paper's 224 px: Resize(256) -> CenterCrop(224). Another ``crop`` (a
    ``backbone.img_size`` override) keeps the same crop fraction 224/256.
    """
    import torchvision.transforms as T

    resize = HUB_RESIZE if crop == HUB_CROP else round(crop * HUB_RESIZE / HUB_CROP)
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),  # on the PIL image
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])
