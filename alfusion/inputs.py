"""A run's data for the search and the tasks, whatever the mode: cached tokens (in memory or
streamed from the cache, features.py decides) or images through the token encoder
(end-to-end and fine-tuning). The tasks take what is here and know neither side's insides."""

from __future__ import annotations

import math
import time

import torch

from alfusion.end2end.encoder import state_checksum
from alfusion.end2end.run import build_encoder, image_inputs
from alfusion.engine import TokenData
from alfusion.engine.stream import StreamedTokens
from alfusion.features import cached_inputs, split_tokens


def train_inputs(cfg, device: torch.device) -> dict:
    """The run's train and test data (TokenData or StreamedTokens from the cache, or ImageData
    through the TokenEncoder), token set, sizes, and the encoder when images are fed."""
    t0 = time.perf_counter()
    if cfg.mode.name == "cached":
        train, test, token_set, entry, storage = cached_inputs(cfg, device)
        shape = train.sample_shape
        num_tokens = shape[0] if len(shape) == 2 else token_set.num_tokens()
        return dict(train=train, test=test, token_set=token_set, dims=entry.dims,
                    num_tokens=num_tokens, encoder=None, storage=storage,
                    seconds=time.perf_counter() - t0)
    encoder, eval_tf = build_encoder(cfg)
    inputs = image_inputs(cfg, encoder, eval_tf, device)
    return dict(train=inputs.train, test=inputs.test, token_set=inputs.token_set,
                dims=inputs.dims, num_tokens=inputs.num_tokens, encoder=encoder,
                seconds=time.perf_counter() - t0)


def test_inputs(saved_cfg, backbone_state: dict | None, device: torch.device):
    """(test data, token set) of a saved probe's run config: its cached test split, or its test
    images through its backbone (``backbone_state``: a fine-tuned one)."""
    if saved_cfg.mode.name == "cached":
        x, y, token_set, _ = split_tokens(saved_cfg, "test", device)
        return TokenData(x, y), token_set
    encoder, eval_tf = build_encoder(saved_cfg, backbone_state)
    test = image_inputs(saved_cfg, encoder, eval_tf, device, splits=("test",)).test
    return test, encoder.token_set


def backbone_checksums(encoder) -> dict[str, str] | None:
    """{start, end}: SHA-256 of the backbone's weights before and after the run (None without
    an encoder): a frozen backbone ends as it started, a fine-tuned one does not."""
    if encoder is None:
        return None
    return dict(start=encoder.pretrained_checksum, end=state_checksum(encoder.backbone))


ANALYSIS_TOKENS_MAX_BYTES = 2 * 10**9


def analysis_tokens(test, device: torch.device) -> torch.Tensor | None:
    """The test tokens (N, T, D) the attention analyses read: cached ones in memory, streamed
    ones read whole when they take at most 2 GB (else None: the analyses are skipped, said)."""
    if isinstance(test, TokenData):
        return test.x
    if not isinstance(test, StreamedTokens):
        return None
    size = 4 * len(test) * math.prod(test.sample_shape)
    if size <= ANALYSIS_TOKENS_MAX_BYTES:
        return test.tokens(test.rows, device)
    print(f"[alfusion] the test tokens take {size / 1e9:.3g} GB in memory: the attention "
          "analyses of this streamed run are skipped", flush=True)
    return None
