"""How our names (backbone keys, dataset names, probe names) map onto the paper's tables.

The paper (arXiv 2601.09322) names models by their hub names, datasets by display names and
probes by the experiment they are ("CLS last layer", ...). Our names are the ``key`` of
conf/backbone/*.yaml, ``dataset.name`` and ``probe.name``.
"""

from __future__ import annotations

import re

# conf/backbone/<file>.yaml `key` -> the paper's base_model (MAE is not in the paper's tables)
BACKBONES = {
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_l": "vit_large_patch16_224",
    "dinov2_s": "dinov2-vit-small-p14",
    "dinov2_b": "dinov2-vit-base-p14",
    "dinov2_l": "dinov2-vit-large-p14",
    "clip_b32": "OpenCLIP_ViT-B-32_openai",
    "clip_b16": "OpenCLIP_ViT-B-16_openai",
    "clip_l14": "OpenCLIP_ViT-L-14_openai",
}

# the paper's experiment column -> our probe name (conf/probe/<name>.yaml, or a probe renamed
# with probe.name=... for the layer-set ablations)
PROBES = {
    "CLS last layer": "linear",
    "All tokens last layer (attentive)": "aat",
    "CLS+AP last layer (linear)": "linear_last",
    "CLS+AP layers from middle & last blocks (linear)": "linear_concat_middle_last",
    "CLS+AP layers from quarterly blocks (linear)": "linear_concat_quarterly",
    "CLS+AP layers from all blocks (linear)": "linear_concat",
    "CLS+AP last layer (attentive)": "attentive_last",
    "CLS+AP layers from middle & last blocks (attentive)": "alf_middle_last",
    "CLS+AP layers from quarterly blocks (attentive)": "alf_quarterly",
    "CLS+AP layers from all blocks (attentive)": "alf",
}

# our canonical dataset name -> the paper's display name
DATASETS = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "caltech101": "Caltech-101",
    "country211": "Country-211",
    "dtd": "DTD",
    "diabetic_retinopathy": "Diabetic Retinopathy",
    "dmlab": "Dmlab",
    "eurosat": "EuroSAT",
    "fer2013": "FER2013",
    "fgvc_aircraft": "FGVC Aircraft",
    "flowers": "Flowers",
    "gtsrb": "GTSRB",
    "voc2007": "PASCAL VOC 2007",
    "pcam": "PCAM",
    "pets": "Pets",
    "resisc45": "RESISC45",
    "stl10": "STL-10",
    "svhn": "SVHN",
    "cars": "Stanford Cars",
}

# other spellings (after squashing, see dataset_key) of the same datasets
_ALIASES = {
    "aircraft": "fgvc_aircraft",
    "flowers102": "flowers",
    "oxfordflowers": "flowers",
    "oxfordpets": "pets",
    "stanfordcars": "cars",
    "pascalvoc2007": "voc2007",
    "patchcamelyon": "pcam",
    "caltech": "caltech101",
    "retinopathy": "diabetic_retinopathy",
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_CANONICAL = {_squash(k): k for k in DATASETS} | {_squash(v): k for k, v in DATASETS.items()}
_CANONICAL |= {a: k for a, k in _ALIASES.items()}


def dataset_key(name: str) -> str | None:
    """Our canonical dataset name for any spelling ('vtab-cifar10', 'wds_vtab-cifar10',
    'CIFAR-10', 'cifar10' -> 'cifar10'), None for a dataset the paper does not report."""
    s = name.lower()
    for prefix in ("clip-benchmark/", "wds_", "wds-", "vtab-", "vtab_"):
        s = s.removeprefix(prefix)
    return _CANONICAL.get(_squash(s))
