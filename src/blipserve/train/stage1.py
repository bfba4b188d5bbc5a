"""BLIP-2 stage-1 training: the Q-Former learns to read images for text, no language model.

The paper's representation stage (REFERENCE.md), on a frozen image encoder. Three losses
share one Q-Former and are summed; each uses its own self-attention mask over the
sequence ``[queries (Q) | text (T)]`` (queries always cross-attend to the image):

    ITC  image-text contrast   unimodal: queries see queries, text sees text
         sim(i, t) = max over queries of cos(query feature, [CLS] feature) / temperature
         (learnable, starts at 0.07, kept in [0.001, 0.5]); cross-entropy both ways over
         the batch, texts identical to the true one counted as positives
    ITM  image-text matching   bidirectional: everything sees everything
         each image with its text (match), with a hard negative text, and each text with a
         hard negative image, negatives drawn in proportion to their ITC similarity;
         ``itm_head`` on the query outputs, mean over queries, 2-way cross-entropy
    ITG  image-grounded text   queries see queries; text sees all queries and earlier text
         generation              (causal); [DEC] replaces [CLS]; next-token cross-entropy
                                 through a BERT-style LM head tied to the word embeddings

The trained model is a :class:`Blip2Retrieval`, saved in the layout of transformers'
``Blip2ForImageTextRetrieval`` (``config.json`` + ``model.safetensors``), which both
``blipserve`` and transformers load; the temperature and the ITG head, which that layout
lacks, go to ``stage1_heads.safetensors`` beside it.

Differences from LAVIS, stated: label smoothing off by default (LAVIS: 0.1 in ITC and ITG;
``label_smoothing`` sets it), no dropout, hard negatives drawn within the batch of one
process (no all-gather).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blipserve.api import load
from blipserve.matching import load_matcher
from blipserve.model.common import activation
from blipserve.model.retrieval import Blip2Retrieval, is_retrieval_config, similarity
from blipserve.processing.image_processor import ImageProcessor
from blipserve.processing.qformer_text import TextCodec
from blipserve.resolve import resolve_checkpoint
from blipserve.train.checkpoint import assemble_retrieval, save_tensors
from blipserve.train.data import TrainExample, load_example_image
from blipserve.train.optim import build_optimizer, warmup_cosine

HEADS_FILE = "stage1_heads.safetensors"
TEMPERATURE_RANGE = (0.001, 0.5)
FROZEN_PREFIX = "vision_model."


@dataclass
class Stage1Config:
    """Stage-1 hyper-parameters; the defaults are the paper's where it gives them."""

    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    max_grad_norm: float | None = None  # LAVIS does not clip in stage 1
    label_smoothing: float = 0.0  # LAVIS: 0.1 in ITC and ITG (see docs/stage1.md)
    seed: int = 0


@dataclass
class Stage1Losses:
    itc: float
    itm: float
    itg: float

    @property
    def total(self) -> float:
        return self.itc + self.itm + self.itg


@dataclass
class Stage1Result:
    losses: list[Stage1Losses] = field(default_factory=list)


class Stage1Heads(nn.Module):
    """What stage 1 trains beside the retrieval model: the ITC temperature and the ITG head
    (dense -> activation -> LayerNorm -> the word embeddings, transposed, + bias)."""

    def __init__(self, model: Blip2Retrieval) -> None:
        super().__init__()
        config = model.config.qformer
        d = config.hidden_size
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.dense = nn.Linear(d, d)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.word_embeddings = model.embeddings.word_embeddings  # tied, not owned

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) text outputs -> (B, T, vocab) next-token logits."""
        h = self.LayerNorm(self.act(self.dense(hidden)))
        return F.linear(h, self.word_embeddings.weight, self.bias)

    def own_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("word_embeddings")}


def stage1_start(
    checkpoint: str, *, device: str = "auto", dtype: str = "auto", seed: int = 0
) -> tuple[Blip2Retrieval, TextCodec, ImageProcessor]:
    """What stage 1 trains, from ``checkpoint``: a matching checkpoint as it is, or a
    captioning checkpoint's image encoder with a fresh Q-Former of its shape, whose text
    vocabulary is the checkpoint's tokenizer plus ``[CLS]`` and ``[DEC]`` (so the result
    fits that checkpoint again for stage 2)."""
    directory = resolve_checkpoint(checkpoint)
    if is_retrieval_config(json.loads((directory / "config.json").read_text())):
        matcher = load_matcher(checkpoint, device=device, dtype=dtype)
        for name, child in matcher.model.named_children():
            if name != "vision_model":
                child.float()  # trained parts keep float32 master weights
        return matcher.model, matcher.codec, matcher.image_processor
    pipe = load(checkpoint, device=device, dtype=dtype, for_training=True)
    backend = pipe.tokenizer.backend
    size = backend.get_vocab_size()
    codec = TextCodec(
        backend, cls_id=size, dec_id=size + 1, pad_id=pipe.tokenizer.pad_token_id or 0
    )
    config = pipe.model.config
    model = assemble_retrieval(
        pipe.model.vision_model,
        replace(config.qformer, vocab_size=size + 2),
        num_query_tokens=config.num_query_tokens,
        seed=seed,
    )
    return model, codec, pipe.image_processor


def freeze_for_stage1(model: Blip2Retrieval) -> dict[str, nn.Parameter]:
    """Freeze the image encoder; everything else trains (float32). Returns it by name."""
    model.vision_model.requires_grad_(False).eval()
    trainable = {n: p for n, p in model.named_parameters() if not n.startswith(FROZEN_PREFIX)}
    for param in trainable.values():
        assert param.dtype == torch.float32, "trainable parameters must be float32"
        param.requires_grad_(True)
    return trainable


def itg_mask(attention_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(B, T) text padding mask -> (B, 1, Q + T, Q + T) boolean ITG mask: queries see the
    queries; text sees every query and the non-padding text up to itself."""
    b, t = attention_mask.shape
    q = num_queries
    device = attention_mask.device
    allowed = torch.zeros(q + t, q + t, dtype=torch.bool, device=device)
    allowed[:, :q] = True
    allowed[q:, q:] = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    keys = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1).bool()
    return allowed[None, None] & keys[:, None, None, :]


def stage1_losses(
    model: Blip2Retrieval,
    heads: Stage1Heads,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    same_text: torch.Tensor,
    dec_id: int,
    generator: torch.Generator,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The three stage-1 losses for a batch of pairs.

    image: (B, S, d_vision) frozen encoder outputs; input_ids / attention_mask: (B, T),
    [CLS] first; same_text: (B, B) boolean, True where two rows' texts are identical.
    """
    b = image.shape[0]
    q = model.config.num_query_tokens
    with torch.no_grad():
        heads.temperature.clamp_(*TEMPERATURE_RANGE)

    # ITC: unimodal passes.
    image_feats = model.image_features(image)  # (B, Q, D)
    text_feats = model.text_features(input_ids, attention_mask)  # (B, D)
    sim_i2t = similarity(image_feats, text_feats) / heads.temperature  # (B, B)
    sim_t2i = sim_i2t.t()
    targets = same_text.float() / same_text.float().sum(dim=1, keepdim=True)
    itc = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2

    # ITM: positives, and hard negatives drawn by ITC similarity (never a same-text pair).
    with torch.no_grad():
        weights_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(same_text, 0) + 1e-9
        weights_t2i = F.softmax(sim_t2i.float(), dim=1).masked_fill(same_text, 0) + 1e-9
        negative_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
        negative_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    has_negative = ~same_text.all(dim=1)  # a batch of one repeated text has none
    pair_images = torch.cat([image, image[has_negative], image[negative_image][has_negative]])
    pair_ids = torch.cat(
        [input_ids, input_ids[negative_text][has_negative], input_ids[has_negative]]
    )
    pair_mask = torch.cat(
        [
            attention_mask,
            attention_mask[negative_text][has_negative],
            attention_mask[has_negative],
        ]
    )
    labels = torch.zeros(pair_images.shape[0], dtype=torch.long, device=image.device)
    labels[:b] = 1
    itm = F.cross_entropy(model.match_logits(pair_images, pair_ids, pair_mask), labels)

    # ITG: [DEC] text decoded from the queries.
    dec_ids = input_ids.clone()
    dec_ids[:, 0] = dec_id
    queries = model.query_tokens.expand(b, -1, -1)
    text = model.embeddings(dec_ids)
    hidden = model.qformer(queries, image, text, itg_mask(attention_mask, q))[:, q:]  # (B, T, d)
    logits = heads.logits(hidden[:, :-1])  # predicts tokens 1..T-1
    labels_itg = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    itg = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels_itg.reshape(-1),
        label_smoothing=label_smoothing,
    )
    return {"itc": itc, "itm": itm, "itg": itg}


def train_stage1(
    model: Blip2Retrieval,
    images: torch.Tensor | EncodedImages,
    texts: Sequence[str],
    codec: TextCodec,
    config: Stage1Config,
    *,
    heads: Stage1Heads | None = None,
    on_step: Callable[[int, Stage1Losses], None] | None = None,
) -> tuple[Stage1Heads, Stage1Result]:
    """Train on (image, text) pairs; ``images[rows]`` gives the frozen encoder's outputs
    (B, S, d_vision): a tensor computed once (:meth:`Blip2Retrieval.vision_features`) or
    :class:`EncodedImages`. Returns the heads and the loss history; ``model`` is trained
    in place."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    if len(texts) < 2:
        raise ValueError("stage 1 needs at least two pairs: its losses contrast a batch")
    device = model.query_tokens.device
    heads = heads or Stage1Heads(model).to(device)
    params = freeze_for_stage1(model)
    params.update({f"heads.{n}": p for n, p in heads.named_parameters() if "word_emb" not in n})
    optimizer = build_optimizer(
        params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.warmup_steps, config.max_steps)
    )
    generator = torch.Generator().manual_seed(config.seed)
    sampling = torch.Generator(device=device).manual_seed(config.seed)
    ids_all, mask_all = codec(texts)
    text_index = _text_index(texts)
    result = Stage1Result()
    model.qformer.train()
    for step in range(config.max_steps):
        rows = torch.randperm(len(texts), generator=generator)[: config.batch_size]
        width = int(mask_all[rows].sum(dim=1).max())
        ids, mask = ids_all[rows, :width].to(device), mask_all[rows, :width].to(device)
        same = (text_index[rows][:, None] == text_index[rows][None, :]).to(device)
        losses = stage1_losses(
            model,
            heads,
            images[rows].to(device),
            ids,
            mask,
            same,
            codec.dec_id,
            sampling,
            config.label_smoothing,
        )
        total = losses["itc"] + losses["itm"] + losses["itg"]
        if not math.isfinite(total.item()):
            raise FloatingPointError(f"stage-1 loss is {total.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        record = Stage1Losses(*(losses[k].item() for k in ("itc", "itm", "itg")))
        result.losses.append(record)
        if on_step:
            on_step(step, record)
    model.eval()
    return heads, result


class EncodedImages:
    """Training images encoded when a batch asks for them: ``images[rows]`` -> (B, S,
    d_vision) frozen encoder outputs, so memory does not grow with the dataset (a
    precomputed tensor of encoder outputs serves the same role for small sets)."""

    def __init__(
        self,
        examples: Sequence[TrainExample],
        model: Blip2Retrieval,
        image_processor: ImageProcessor,
        *,
        exif_transpose: bool = True,
    ) -> None:
        self.examples = list(examples)
        self.model = model
        self.image_processor = image_processor
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        pixels = [
            self.image_processor.preprocess_one(
                load_example_image(self.examples[i], i, exif_transpose=self.exif_transpose)
            )
            for i in rows.tolist()
        ]
        return self.model.vision_features(torch.stack(pixels))


def save_stage1(
    model: Blip2Retrieval,
    heads: Stage1Heads,
    codec: TextCodec,
    directory: str | Path,
    image_processor: ImageProcessor | None = None,
) -> Path:
    """Write the model in transformers' ``Blip2ForImageTextRetrieval`` layout, with its
    tokenizer, text settings, image preprocessing and the stage-1 heads, so
    :func:`blipserve.load_matcher` runs it; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    codec.save_pretrained(directory)
    if image_processor is not None:
        config = json.dumps(image_processor.to_dict(), indent=2, sort_keys=True) + "\n"
        (directory / "preprocessor_config.json").write_text(config)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_tensors(state, directory / "model.safetensors")
    own = {k: v.detach().contiguous().cpu() for k, v in heads.own_state().items()}
    save_tensors(own, directory / HEADS_FILE)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
    return directory


def _text_index(texts: Sequence[str]) -> torch.Tensor:
    """(N,) the index of each text's first occurrence: equal texts, equal index."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(t, i) for i, t in enumerate(texts)])
