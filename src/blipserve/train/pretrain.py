"""Pre-training the demo model's frozen parts on their own, before stage 2.

BLIP-2 starts from an image encoder and a language model that were trained elsewhere and
stay frozen. The demo model has no such parts to download, so it makes its own:

- :func:`pretrain_vision` trains a small ViT to name what sits in each cell of the
  synthetic scenes' 3x3 grid (shape, colour and size, or empty), from pixels alone;
- :func:`pretrain_language_model` trains a small OPT decoder as a text model of the
  synthetic captions and answers. Each text follows the scene written as 9 cell tokens
  (``<cell:small-red-circle>``, ``<cell:empty>``, ...), where it will follow the 9 query
  outputs in BLIP-2. The decoder so learns to read a prefix (a scene language of its own,
  as a real LM reads real text); stage 2 then teaches the Q-Former to write it from pixels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from blipserve.model.opt import OPTConfig, OPTForCausalLM
from blipserve.model.vision import VisionConfig, VisionTransformer
from blipserve.processing.tokenizer import Tokenizer
from blipserve.train.data import IGNORE_INDEX, encode_example
from blipserve.train.optim import warmup_cosine
from blipserve.train.synthetic import GRID, NUM_CELL_CLASSES, Scene, cell_tokens


@dataclass(frozen=True)
class PretrainSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0


# -- vision ------------------------------------------------------------------------------------


class CellClassifier(nn.Module):
    """ViT + two heads: what each grid cell holds (from the patch tokens it covers), and
    which cell each patch token lies in (so the features say *where*, which the Q-Former's
    cross-attention needs to tell the cells apart)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        side = config.image_size // config.patch_size
        assert side % GRID == 0, "the patch grid must split evenly into the scene grid"
        self.side = side
        self.encoder = VisionTransformer(config)
        self.head = nn.Linear(config.hidden_size, NUM_CELL_CLASSES)
        self.where = nn.Linear(config.hidden_size, GRID * GRID)
        per = side // GRID
        cell_of_patch = torch.arange(side)[:, None] // per * GRID + torch.arange(side)[None] // per
        self.register_buffer("cell_of_patch", cell_of_patch.flatten(), persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (B, 9, classes) cell logits (row-major), (B, P, 9) patch-cell logits."""
        tokens = self.encoder(pixels)[:, 1:]  # (B, side*side, D), CLS dropped
        b, _, d = tokens.shape
        per = self.side // GRID
        grid = tokens.view(b, GRID, per, GRID, per, d).mean(dim=(2, 4))  # (B, 3, 3, D)
        return self.head(grid.reshape(b, GRID * GRID, d)), self.where(tokens)


def pretrain_vision(
    config: VisionConfig,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    settings: PretrainSettings,
) -> tuple[CellClassifier, float]:
    """Train on (N, 3, H, W) pixels and (N, 9) cell labels; -> classifier (its ``encoder``
    is the vision tower), running training accuracy."""
    torch.manual_seed(settings.seed)
    model = CellClassifier(config)
    _init(model)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    schedule = LambdaLR(optimizer, warmup_cosine(settings.warmup_steps, settings.steps))
    generator = torch.Generator().manual_seed(settings.seed)
    progress = tqdm(range(settings.steps), desc="vision encoder", leave=False)
    accuracy = 0.0
    for _ in progress:
        index = torch.randint(len(pixels), (settings.batch_size,), generator=generator)
        logits, where = model(pixels[index].float())
        loss = F.cross_entropy(logits.reshape(-1, NUM_CELL_CLASSES), labels[index].reshape(-1))
        cells = model.cell_of_patch.expand(len(index), -1)  # (B, P)
        loss = loss + F.cross_entropy(where.reshape(-1, GRID * GRID), cells.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        accuracy = 0.9 * accuracy + 0.1 * (logits.argmax(-1) == labels[index]).float().mean().item()
        progress.set_postfix(loss=f"{loss.item():.3f}", cell_acc=f"{accuracy:.3f}")
    return model.eval(), accuracy


# -- language model ----------------------------------------------------------------------------


def cell_token_ids(tokenizer: Tokenizer, scene: Scene) -> list[int]:
    """The scene's 9 cell tokens (:func:`blipserve.train.synthetic.cell_tokens`) as ids."""
    ids = [tokenizer.token_to_id(token) for token in cell_tokens(scene)]
    if None in ids:
        raise ValueError("the tokenizer lacks the cell tokens (write_bpe_tokenizer's extras)")
    return ids


def pretrain_language_model(
    config: OPTConfig,
    tokenizer: Tokenizer,
    texts: Sequence[tuple[Scene, str, str]],
    settings: PretrainSettings,
) -> tuple[OPTForCausalLM, float]:
    """Train on (scene, prompt, target) triples, each read after the scene's 9 cell tokens.

    Rows are ``[9 cell tokens | BOS prompt target eos]``: the cell tokens stand exactly
    where stage 2 puts the 9 query outputs (positions 0-8, BOS at 9), and the prompt and
    target are tokenized as stage 2 tokenizes them
    (:func:`blipserve.train.data.encode_example`). The loss covers the target and its eos
    only, so the decoder learns what follows a prompt (a caption after a bare BOS, an
    answer after a question) given the scene. -> model, final loss."""
    torch.manual_seed(settings.seed)
    model = OPTForCausalLM(config)
    _init(model)
    model.lm_head.weight = model.model.decoder.embed_tokens.weight  # tied, as OPT
    eos = config.eos_token_id
    rows = []
    for scene, prompt, target in texts:
        cells = cell_token_ids(tokenizer, scene)
        ids, labels = encode_example(tokenizer, prompt, target, eos)
        rows.append((cells + ids, [IGNORE_INDEX] * len(cells) + labels))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    schedule = LambdaLR(optimizer, warmup_cosine(settings.warmup_steps, settings.steps))
    rng = random.Random(settings.seed)
    progress = tqdm(range(settings.steps), desc="language model", leave=False)
    loss_value = float("nan")
    for _ in progress:
        loss = _lm_loss(model, rng.sample(rows, settings.batch_size), tokenizer.pad_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        progress.set_postfix(loss=f"{loss_value:.3f}")
    return model.eval(), loss_value


def _lm_loss(model: OPTForCausalLM, batch: list[tuple[list[int], list[int]]], pad: int):
    """Right-padded (ids, labels) rows -> next-token loss on the labelled positions."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), IGNORE_INDEX)
    real = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (row_ids, row_labels) in enumerate(batch):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        real[i, : len(row_ids)] = True
    positions = real.long().cumsum(-1) * real - 1
    logits = model(model.embed_tokens(ids), positions, real)  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def _init(module: nn.Module) -> None:
    """Small-normal weights, zero biases, unit LayerNorms (modules are built uninitialised)."""
    for name, param in module.named_parameters():
        with torch.no_grad():
            if "norm" in name.lower():
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
