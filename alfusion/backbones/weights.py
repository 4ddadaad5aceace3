"""Local weight files as users download them, read safely and checked against the architecture.

Formats read for timm ViTs (``backbone.weights=FILE``):

* DINOv2's ``dinov2_vit{s,b,l}14_pretrain.pth``: a plain state dict in the layout timm uses,
  plus ``mask_token`` (used only in pretraining, dropped);
* MAE's ``mae_pretrain_vit_{base,large}.pth``: the encoder under the ``model`` key, in timm's
  layout with the final ``norm``; decoder tensors (``decoder_*``, ``mask_token``) are dropped
  where a file has them;
* timm's ``model.safetensors`` / ``pytorch_model.bin`` (a classifier head is dropped: the
  backbone has none);
* an official layout that timm converts when it downloads the weights itself (Meta's DINOv3
  ``dinov3_vit*16_pretrain_lvd1689m-*.pth``: ``storage_tokens``, ``ls1.gamma``, ``qkv.bias``;
  Meta's PE ``visual.conv1...``; DINOv2 with registers; EVA-02's MIM checkpoints): where the
  file does not fit the model as it is, timm's own ``checkpoint_filter_fn`` of the model's
  architecture converts it, and the result must fit exactly. DINOv3 query/value biases that are
  not zero are never dropped: a model built without them is refused (use the ``_qkvb`` name).

Files are read with ``torch.load(weights_only=True)`` or safetensors: never executed. A file of
another architecture is refused with the keys and shapes that differ and the config that fits.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

# Tensors of a pretraining head that a frozen backbone does not have.
PRETRAINING_ONLY = re.compile(r"^(mask_token|decoder_.*|decoder\..*)$")
# (width, blocks, patch) -> the paper's backbone configs of that shape.
PAPER_SHAPES = {
    (384, 12, 16): "vit_s", (768, 12, 16): "vit_b or mae_b", (1024, 24, 16): "vit_l or mae_l",
    (384, 12, 14): "dinov2_s", (768, 12, 14): "dinov2_b", (1024, 24, 14): "dinov2_l",
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsMismatch(ValueError):
    """A weights file that does not fit the configured architecture; the message says how."""


def find_weights_file(path: str | Path) -> Path:
    """``path`` itself, or the one weights file in the folder ``path`` (model.safetensors or
    pytorch_model.bin first, as timm's hub folders hold them)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        if not p.is_file():
            raise FileNotFoundError(f"backbone.weights={path}: no such file or folder")
        return p
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (p / name).is_file():
            return p / name
    files = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise FileNotFoundError(f"backbone.weights={path}: a folder needs model.safetensors, "
                                f"pytorch_model.bin or one weights file, found {files}")
    return files[0]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: name -> tensor, unwrapped from a ``model`` or
    ``state_dict`` entry and a ``module.`` prefix (DDP)."""
    file = find_weights_file(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file), device="cpu")
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled objects other than tensors, or not a torch file
            raise ValueError(
                f"backbone.weights={path}: not a plain tensor checkpoint that can be read "
                f"without executing code ({type(err).__name__}: {str(err)[:300]}). Save its "
                f"state dict alone (torch.save(model.state_dict(), FILE)) or as .safetensors."
            ) from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"backbone.weights={path}: holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def timm_vit_state_dict(state: dict[str, torch.Tensor], model: nn.Module
                        ) -> dict[str, torch.Tensor]:
    """DINOv2, MAE or timm file tensors -> the state dict of ``model`` (a timm ViT without a
    head): pretraining-only tensors and a classifier head dropped, names kept."""
    has_head = isinstance(getattr(model, "head", None), nn.Linear)
    return {k: v for k, v in state.items()
            if not PRETRAINING_ONLY.match(k) and (has_head or not k.startswith("head."))}


def vit_shape(state: dict[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """(width, blocks, patch side) of a ViT state dict in timm or OpenCLIP layout, else None."""
    proj = next((v for k, v in state.items()
                 if k.endswith(("patch_embed.proj.weight", "visual.conv1.weight"))), None)
    blocks = {int(m.group(1)) for k in state
              if (m := re.search(r"(?:^|\.)(?:blocks|resblocks)\.(\d+)\.", k))}
    if proj is None or proj.ndim != 4 or not blocks:
        return None
    return int(proj.shape[0]), max(blocks) + 1, int(proj.shape[-1])


def describe(shape: tuple[int, int, int] | None) -> str:
    if shape is None:
        return "not a ViT this project reads"
    width, depth, patch = shape
    known = PAPER_SHAPES.get(shape)
    return (f"a ViT of width {width}, {depth} blocks, patch {patch}"
            + (f" (backbone={known})" if known else ""))


def check_fits(state: dict[str, torch.Tensor], model: nn.Module, what: str, path) -> None:
    """Raise WeightsMismatch unless ``state`` has exactly ``model``'s keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def order(keys):  # the embeddings first: they say the most about an architecture
        headline = ("pos_embed", "patch_embed.proj.weight", "visual.positional_embedding",
                    "visual.conv1.weight")
        return sorted(keys, key=lambda k: (k not in headline, ".blocks." in f".{k}", k))

    missing = order(set(expected) - set(state))
    unexpected = order(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
              for k in order(set(state) & set(expected)) if tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{len(items)} {label} (e.g. {'; '.join(items[:3])})"
             for label, items in (("keys missing from the file", missing),
                                  ("keys the model does not have", unexpected),
                                  ("tensors of another shape", shapes)) if items]
    raise WeightsMismatch(
        f"backbone.weights={path} does not fit {what}: {'. '.join(parts)}. The file holds "
        f"{describe(vit_shape(state))}; {what} is {describe(vit_shape(model.state_dict()))}. "
        f"Choose the backbone config of the file's architecture, or the weights file of "
        f"{what}."
    )


def load_timm_vit_weights(model: nn.Module, path, what: str) -> None:
    """Load a DINOv2, MAE or timm weights file, or an official layout timm converts, into the
    timm ViT ``model`` (strict)."""
    raw = read_state_dict(path)
    state = timm_vit_state_dict(raw, model)
    try:
        check_fits(state, model, what, path)
    except WeightsMismatch as mismatch:
        converted = timm_converted(raw, model)
        if converted is None:
            raise
        state = timm_vit_state_dict(converted, model)
        try:
            check_fits(state, model, what, path)
        except WeightsMismatch:
            raise mismatch from None  # the file's own keys say more than timm's conversion
        refuse_dropped_biases(raw, model, what, path)
    model.load_state_dict(state, strict=True)


def timm_converted(state: dict[str, torch.Tensor], model: nn.Module
                   ) -> dict[str, torch.Tensor] | None:
    """``state`` through timm's ``checkpoint_filter_fn`` of the model's architecture (what
    timm applies to the files it downloads), or None where there is none or it fails."""
    import contextlib
    import io
    import sys

    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # timm prints its probing of biases
            out = convert(dict(state), model)
    except Exception:  # noqa: BLE001 (a layout timm does not know: the first refusal stands)
        return None
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def refuse_dropped_biases(state: dict[str, torch.Tensor], model: nn.Module, what: str,
                          path) -> None:
    """A DINOv3 file with non-zero qkv biases must not load into a model without them (timm's
    conversion would drop them silently)."""
    if "storage_tokens" not in state:  # not Meta's DINOv3 layout
        return
    params = dict(model.named_parameters())
    lost = [k for k, v in state.items() if k.endswith("attn.qkv.bias") and bool(v.any())
            and k not in params and k.replace("qkv.bias", "q_bias") not in params]
    if lost:
        raise WeightsMismatch(
            f"backbone.weights={path} has non-zero attention biases ({lost[0]}, ...) that "
            f"{what} has no parameters for: use the architecture with them (the timm name with "
            "_qkvb, e.g. vit_base_patch16_dinov3_qkvb.lvd1689m)")
