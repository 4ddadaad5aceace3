"""Layer importance from a trained attentive probe (docs/protocol.md, analysis).

Run the probe over a split, take its softmax attention (N, H, T), average over samples, then
over heads: one weight per token (CLS@layer, AP@layer, R0,1@layer, P2,3@layer), summing to 1.
Written as a heatmap (layers on the x axis, one row per token kind: CLS, AP, regions summed per
layer; for all-token probes CLS, registers and patches summed per layer), a per-head heatmap
of the same cells, CSV and JSON. Probes over regions or all tokens also get a spatial map per
layer (spatial_attention.png): the attention over the patch grid, on average and on a few test
images.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alfusion.analysis.plots import heatmap, new_figure, save
from alfusion.probes.attentive import AttentiveProbe
from alfusion.tokens import TokenSet

KIND_NAMES = {"cls": "CLS", "ap": "AP", "pool": "pool", "regions": "regions"}


@dataclass
class LayerAttention:
    """per_head: (H, T) attention averaged over samples; tokens: T labels like 'CLS@3';
    kinds x layers: the heatmap's cells (kinds such as ['CLS', 'AP', 'regions'], layers
    [1..L]); cell_of: (T,) the cell kind_index * len(layers) + layer_index of each token (a
    region or patch token adds to its layer's cell)."""

    per_head: np.ndarray
    tokens: list[str]
    kinds: list[str]
    layers: list[int]
    samples: int
    cell_of: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        """(T,) mean over heads; sums to 1."""
        return self.per_head.mean(axis=0)

    def head_grid(self) -> np.ndarray:
        """(H, kinds * layers): each head's attention summed into the cells."""
        out = np.zeros((len(self.per_head), len(self.kinds) * len(self.layers)))
        np.add.at(out.T, self.cell_of, self.per_head.T)
        return out

    def grid(self) -> np.ndarray:
        """(kinds, layers): the weights summed into the heatmap's cells."""
        return self.head_grid().mean(axis=0).reshape(len(self.kinds), len(self.layers))

    def cell_names(self) -> list[str]:
        return [f"{k}@{layer}" for k in self.kinds for layer in self.layers]

    def layer_mass(self) -> dict[int, float]:
        """Attention mass per layer, summed over token kinds."""
        return {layer: float(m) for layer, m in zip(self.layers, self.grid().sum(axis=0),
                                                    strict=True)}


@torch.no_grad()
def mean_attention(probe: AttentiveProbe, x: torch.Tensor, batch_size: int = 1024
                   ) -> torch.Tensor:
    """Softmax attention of ``probe`` on tokens x (N, T, D), averaged over samples: (H, T)."""
    was_training = probe.training
    probe.eval()
    total = None
    for i in range(0, len(x), batch_size):
        attn, _ = probe.attention(x[i:i + batch_size].float())  # (B, H, T)
        part = attn.double().sum(dim=0)
        total = part if total is None else total + part
    probe.train(was_training)
    return (total / len(x)).float().cpu()


def layer_attention(probe: AttentiveProbe, x: torch.Tensor, token_set: TokenSet,
                    layout: dict | None = None) -> LayerAttention:
    """The probe's layer attention on tokens x (N, T, D) stacked by ``token_set``; ``layout``
    (the cache entry's token_layout) tells CLS, registers and patches apart for tokens=all."""
    per_head = mean_attention(probe, x).numpy()
    tokens, kinds, cell_of = token_cells(token_set, per_head.shape[1], layout)
    return LayerAttention(per_head, tokens, kinds, list(token_set.layers), len(x),
                          np.asarray(cell_of))


def token_cells(token_set: TokenSet, num_tokens: int, layout: dict | None
                ) -> tuple[list[str], list[str], list[int]]:
    """(T token labels, kind names, T cell indices) of a token set's stacking order."""
    layers = list(token_set.layers)
    labels, kinds, cells = [], [], []
    if token_set.tokens == "all":
        per_layer = num_tokens // len(layers)
        prefix = (layout or {}).get("num_prefix_tokens", 1)
        has_cls = int((layout or {}).get("class_token", True) and prefix > 0)  # SigLIP: none
        cols = spatial_grid(token_set, layout, per_layer)[1]
        kinds = ["CLS"] * has_cls + ["registers"] * (prefix > has_cls) + ["patches"]
        for j, layer in enumerate(layers):
            for t in range(per_layer):
                kind = 0 if t < has_cls else (has_cls if t < prefix else len(kinds) - 1)
                name = ("CLS" if t < has_cls else f"reg{t}" if t < prefix
                        else f"P{(t - prefix) // cols},{(t - prefix) % cols}")
                labels.append(f"{name}@{layer}")
                cells.append(kind * len(layers) + j)
    else:
        for kind_index, kind in enumerate(token_set.kinds):
            kinds.append(KIND_NAMES[kind])
            if kind == "pool":  # one token: the pooling head's output on the final layer
                labels.append(f"pool@{max(layers)}")
                cells.append(kind_index * len(layers) + layers.index(max(layers)))
                continue
            k = token_set.regions or 0
            names = [f"R{r // k},{r % k}" for r in range(k * k)] if kind == "regions" else [
                KIND_NAMES[kind]]
            for j, layer in enumerate(layers):
                labels += [f"{n}@{layer}" for n in names]
                cells += [kind_index * len(layers) + j] * len(names)
    if len(labels) != num_tokens:
        raise ValueError(f"attention over {num_tokens} tokens, but the token set "
                         f"{token_set} names {len(labels)}")
    return labels, kinds, cells


def spatial_grid(token_set: TokenSet, layout: dict | None, tokens_per_layer: int
                 ) -> tuple[int, int]:
    """(rows, columns) of a layer's spatial tokens: k x k regions, or the patch grid."""
    if token_set.tokens != "all":
        return token_set.regions, token_set.regions
    if layout and layout.get("grid"):
        return tuple(layout["grid"])
    side = round((tokens_per_layer - 1) ** 0.5)  # no layout: CLS then a square grid
    return side, side


def spatial_index(token_set: TokenSet, num_tokens: int, layout: dict | None
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    """(index (layers, rows * cols) of each layer's spatial tokens in the stacked T, grid)."""
    n_layers = len(token_set.layers)
    if token_set.tokens == "all":
        per_layer = num_tokens // n_layers
        prefix = (layout or {}).get("num_prefix_tokens", 1)
        index = [[j * per_layer + t for t in range(prefix, per_layer)] for j in range(n_layers)]
        return np.asarray(index), spatial_grid(token_set, layout, per_layer)
    k2 = token_set.regions ** 2
    start = n_layers * (len(token_set.kinds) - 1)  # regions come after CLS and AP
    index = [[start + j * k2 + r for r in range(k2)] for j in range(n_layers)]
    return np.asarray(index), spatial_grid(token_set, layout, 0)


@torch.no_grad()
def spatial_attention(probe: AttentiveProbe, x: torch.Tensor, token_set: TokenSet,
                      layout: dict | None, num_images: int = 4
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(mean map (layers, rows, cols) over all of x, maps (n, layers, rows, cols) of the first
    ``num_images`` samples): head-averaged attention on each layer's spatial tokens."""
    index, grid = spatial_index(token_set, x.shape[1], layout)
    mean = mean_attention(probe, x).mean(dim=0).numpy()
    was_training = probe.training
    probe.eval()
    attn, _ = probe.attention(x[:num_images].float())
    probe.train(was_training)
    per_image = attn.mean(dim=1).cpu().numpy()  # (n, T)
    shape = (len(token_set.layers), *grid)
    return mean[index].reshape(shape), per_image[:, index].reshape(len(per_image), *shape)


def write_spatial_attention(mean: np.ndarray, maps: np.ndarray, layers: list[int],
                            path: Path, images: list | None = None, title: str = "") -> Path:
    """A grid of spatial maps: a row for the test-set mean, then one per image (with the image
    in the first column when given); a column per layer. Colours are per row (each row's own
    scale), so that the maps of one image compare across layers."""
    rows = [("test mean", mean)] + [(f"image {i}", m) for i, m in enumerate(maps)]
    offset = 1 if images else 0
    fig = new_figure(1.6 * (len(layers) + offset) + 0.8, 1.6 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), len(layers) + offset, squeeze=False)
    for r, (name, layer_maps) in enumerate(rows):
        top = float(layer_maps.max()) or 1.0
        for j, layer in enumerate(layers):
            ax = axes[r, j + offset]
            ax.imshow(layer_maps[j], cmap="viridis", vmin=0, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=8)
        if images:
            axes[r, 0].axis("off")
            if r == 0:
                axes[r, 0].text(0.5, 0.5, name, ha="center", va="center", fontsize=8,
                                transform=axes[r, 0].transAxes)
            elif r - 1 < len(images):
                axes[r, 0].imshow(images[r - 1])
                axes[r, 0].set_title(name, fontsize=8)
    fig.suptitle(f"spatial attention {title}".strip(), fontsize=9)
    return save(fig, path)


def write_attention(att: LayerAttention, folder: Path, title: str = "") -> list[Path]:
    """layer_attention.{png,csv,json} and layer_attention_heads.png under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    png = heatmap(att.grid(), att.kinds, [str(c) for c in att.layers],
                  folder / "layer_attention.png", title=f"layer attention {title}".strip(),
                  xlabel="layer", colorbar="attention weight", vmin=0)
    heads = heatmap(att.head_grid(), [f"head {h}" for h in range(len(att.per_head))],
                    att.cell_names(), folder / "layer_attention_heads.png",
                    title=f"attention per head {title}".strip(), xlabel="token",
                    colorbar="attention weight", vmin=0)
    table = folder / "layer_attention.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["token", "kind", "position", "weight",
                         *[f"head_{h}" for h in range(len(att.per_head))]])
        for t, name in enumerate(att.tokens):
            kind, pos = divmod(int(att.cell_of[t]), len(att.layers))
            writer.writerow([name, att.kinds[kind], att.layers[pos], f"{att.weights[t]:.6g}",
                             *[f"{w:.6g}" for w in att.per_head[:, t]]])
    data = folder / "layer_attention.json"
    data.write_text(json.dumps(dict(
        tokens=att.tokens, kinds=att.kinds, layers=att.layers, samples=att.samples,
        weights=att.weights.tolist(), per_head=att.per_head.tolist(),
        grid=att.grid().tolist(), layer_mass=att.layer_mass()), indent=1))
    return [png, heads, table, data]


def plot_attention_rows(rows: dict[str, dict], path: Path, title: str = "") -> Path:
    """One heatmap with a row per run (e.g. per dataset) from layer_attention.json contents;
    columns are the union of token labels in first-seen order (CLS block, then AP block)."""
    columns: list[str] = []
    for data in rows.values():
        columns += [t for t in data["tokens"] if t not in columns]
    matrix = np.full((len(rows), len(columns)), np.nan)
    for i, data in enumerate(rows.values()):
        for token, weight in zip(data["tokens"], data["weights"], strict=True):
            matrix[i, columns.index(token)] = weight
    return heatmap(matrix, list(rows), columns, path, title=title or "layer attention",
                   xlabel="token", colorbar="attention weight", vmin=0)
