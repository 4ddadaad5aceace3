"""Layer importance from a trained attentive probe (docs/protocol.md, analysis).

Run the probe over a split, take its softmax attention (N, H, T), average over samples, then
over heads: one weight per token (CLS@layer, AP@layer), summing to 1. Written as a heatmap (layers
on the x axis, one row per token kind), a per-head heatmap, CSV and JSON.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alfusion.analysis.plots import heatmap
from alfusion.probes.attentive import AttentiveProbe
from alfusion.tokens import TokenSet

KIND_NAMES = {"cls": ["CLS"], "ap": ["AP"], "cls+ap": ["CLS", "AP"]}


@dataclass
class LayerAttention:
    """per_head: (H, T) attention averaged over samples; tokens: T labels like 'CLS@3';
    kinds x layers: how the T tokens tile (kinds ['CLS', 'AP'], layers [1..L]), or one row
    'token' over token indices for all-token probes."""

    per_head: np.ndarray
    tokens: list[str]
    kinds: list[str]
    layers: list[int]
    samples: int

    @property
    def weights(self) -> np.ndarray:
        """(T,) mean over heads; sums to 1."""
        return self.per_head.mean(axis=0)

    def grid(self) -> np.ndarray:
        """(kinds, layers): the weights laid out for the heatmap."""
        return self.weights.reshape(len(self.kinds), len(self.layers))

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


def layer_attention(probe: AttentiveProbe, x: torch.Tensor, token_set: TokenSet
                    ) -> LayerAttention:
    """The probe's layer attention on tokens x (N, T, D) stacked by ``token_set``."""
    per_head = mean_attention(probe, x).numpy()
    num_tokens = per_head.shape[1]
    if token_set.tokens == "all":
        kinds, layers = ["token"], list(range(num_tokens))
        tokens = [f"token {i}" for i in layers]
    else:
        kinds, layers = KIND_NAMES[token_set.tokens], list(token_set.layers)
        tokens = [f"{k}@{layer}" for k in kinds for layer in layers]
    if len(tokens) != num_tokens:
        raise ValueError(f"attention over {num_tokens} tokens, but the token set "
                         f"{token_set} names {len(tokens)}")
    return LayerAttention(per_head, tokens, kinds, layers, samples=len(x))


def write_attention(att: LayerAttention, folder: Path, title: str = "") -> list[Path]:
    """layer_attention.{png,csv,json} and layer_attention_heads.png under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    xlabel = "token" if att.kinds == ["token"] else "layer"
    png = heatmap(att.grid(), att.kinds, [str(c) for c in att.layers],
                  folder / "layer_attention.png", title=f"layer attention {title}".strip(),
                  xlabel=xlabel, colorbar="attention weight", vmin=0)
    heads = heatmap(att.per_head, [f"head {h}" for h in range(len(att.per_head))], att.tokens,
                    folder / "layer_attention_heads.png",
                    title=f"attention per head {title}".strip(), xlabel="token",
                    colorbar="attention weight", vmin=0)
    table = folder / "layer_attention.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["token", "kind", "position", "weight",
                         *[f"head_{h}" for h in range(len(att.per_head))]])
        for t, name in enumerate(att.tokens):
            kind, pos = att.kinds[t // len(att.layers)], att.layers[t % len(att.layers)]
            writer.writerow([name, kind, pos, f"{att.weights[t]:.6g}",
                             *[f"{w:.6g}" for w in att.per_head[:, t]]])
    data = folder / "layer_attention.json"
    data.write_text(json.dumps(dict(
        tokens=att.tokens, kinds=att.kinds, layers=att.layers, samples=att.samples,
        weights=att.weights.tolist(), per_head=att.per_head.tolist(),
        layer_mass=att.layer_mass() if att.kinds != ["token"] else None), indent=1))
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
