"""BLIP-2 stage-2 training: teach the Q-Former to prompt a frozen language model.

The paper's generative stage (and the COCO fine-tune), as in REFERENCE.md:

- **frozen:** the image encoder (run under ``no_grad``) and the language model, OPT or T5
  (gradients flow through it to the prefix, but none of its weights change); both stay in
  eval mode;
- **trained:** ``query_tokens``, the Q-Former and ``language_projection``, as float32
  master weights (the projection is upcast if the model was loaded in bf16/fp16), with
  AdamW (0.9, 0.98), weight decay on matrices only, linear warmup then cosine decay to 0,
  gradient-norm clipping, and optional bf16/fp16 autocast;
- **loss:** causal-LM cross-entropy on the caption tokens only (:func:`stage2_loss`).

The decoder sees the inference sequence followed by the target (see
:mod:`blipserve.train.data` for how prompt and caption are tokenized):

    sequence:  q0 ... q31 | </s>  a  Ġphoto  Ġof | Ġa  Ġcat  Ċ | <pad>
    labels:    -100 ...   | -100 ...              | Ġa  Ġcat  Ċ | -100
    positions: 0  ... 31  | 32 ...                              | -1    (cumsum(mask)*mask - 1)

A T5 (Flan-T5) model reads the queries and the prompt with its encoder and learns the
caption through its decoder, fed the targets shifted right behind its start token:

    encoder:        q0 ... q31 | ▁a ▁photo ▁of </s> | <pad>
    decoder input:  <pad> ▁a ▁cat </s>      (<pad> = decoder_start_token_id)
    labels:         ▁a ▁cat </s> -100        (the targets; -100 past the end)

**Checkpoints.** Every ``save_every`` steps, ``output_dir/checkpoint-NNNNNN/`` holds a
complete Hugging Face checkpoint plus ``training_state.pt`` (optimizer, scheduler, grad
scaler, RNG states) and ``trainer_state.json`` (step, losses, evaluations; written last, so
its presence marks a complete checkpoint); the newest ``keep_checkpoints`` are kept. The
final model is written to ``output_dir`` itself, so ``blipserve caption --model
output_dir`` runs it. ``resume=True`` continues from the newest of these. The batch for a
step depends only on (seed, step), so a resumed run ends with the same weights as an
uninterrupted one.

Not done here: the reference Q-Former's dropout (0.1; our model has none), the recipe's
random-resized-crop and flip augmentation, gradient accumulation and multi-GPU training.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from blipserve.api import Pipeline
from blipserve.errors import InvalidRequest
from blipserve.generation_config import CheckpointDefaults
from blipserve.model.blip2 import Blip2Model
from blipserve.model.opt import OPTForCausalLM
from blipserve.model.t5 import T5ForConditionalGeneration
from blipserve.processing.image_processor import ImageProcessor
from blipserve.processing.tokenizer import Tokenizer
from blipserve.train.checkpoint import WEIGHTS_NAME, save_checkpoint
from blipserve.train.data import (
    IGNORE_INDEX,
    Batch,
    CaptionDataset,
    Collate,
    TrainExample,
)
from blipserve.train.optim import build_optimizer, warmup_cosine

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
TRAINABLE_PREFIXES = ("query_tokens", "qformer.", "language_projection.")
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    """Stage-2 hyper-parameters; the defaults are the paper's where it gives them."""

    max_steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.05  # on weight matrices and query tokens, not biases or norms
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100  # the paper uses 2000 on its 129M-image corpus
    grad_clip: float | None = 1.0  # max global gradient norm; None turns clipping off
    mixed_precision: str = "auto"  # auto: bf16 (else fp16) autocast on CUDA, none on CPU
    seed: int = 0
    log_every: int = 10  # steps between lines in output_dir/log.jsonl
    save_every: int | None = 500  # steps between resumable checkpoints; None: final only
    eval_every: int | None = None  # steps between evaluations; one always runs at the end
    keep_checkpoints: int = 2  # periodic checkpoints kept on disk
    eval_max_new_tokens: int = 30
    num_workers: int = 0  # DataLoader worker processes decoding images
    progress: bool = True  # a tqdm progress bar on stderr

    def validate(self) -> None:
        """Raise :class:`InvalidRequest` naming the first setting out of range."""
        at_least_one = ("max_steps", "batch_size", "log_every", "keep_checkpoints")
        for name in (*at_least_one, "eval_max_new_tokens"):
            _require(getattr(self, name) >= 1, f"{name} must be at least 1")
        for name in ("save_every", "eval_every"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{name} must be at least 1 (or None)")
        _require(self.warmup_steps >= 0, "warmup_steps must not be negative")
        _require(self.num_workers >= 0, "num_workers must not be negative")
        _require(self.lr > 0, "lr must be positive")
        _require(self.weight_decay >= 0, "weight_decay must not be negative")
        _require(all(0 <= b < 1 for b in self.betas), "betas must be in [0, 1)")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive")
        _require(
            self.mixed_precision in MIXED_PRECISION,
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}",
        )


@dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float  # mean cross-entropy per target token
    accuracy: float  # fraction of greedy generations exactly equal to the caption
    predictions: list[str]


@dataclass
class TrainResult:
    step: int  # optimizer steps taken in all (a resumed run counts the earlier ones)
    final_loss: float  # loss of the last step
    losses: list[float]  # one per step, step 1 first
    evaluations: list[EvalResult]  # periodic ones, then the final one (earlier runs' too)
    output_dir: Path  # holds the final checkpoint
    eval: EvalResult | None = None  # this run's final evaluation; None without eval examples


# -- the loss ---------------------------------------------------------------------------------


def stage2_loss(
    model: Blip2Model,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Mean cross-entropy over the labelled (caption) tokens -> scalar.

    ``pixel_values`` (B, 3, H, W); ``input_ids`` and ``attention_mask`` (B, T) the text after
    the queries, right-padded. ``labels``: for OPT (B, T), aligned with the text, -100 where
    there is no target; for T5 (B, T_target), the decoder's targets, -100 on padding.
    """
    with torch.no_grad():  # the image encoder is frozen: keep no activations for it
        image = model.vision_model(pixel_values)  # (B, 257, d_vision)
    prefix = model.query_image(image)  # (B, Q, d_lm)
    lm = model.language_model
    text = lm.embed_tokens(input_ids).to(prefix.dtype)  # (B, T, d_lm)
    embeds = torch.cat([prefix, text], dim=1)  # (B, Q + T, d_lm)
    b, q = prefix.shape[:2]
    mask = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1).bool()  # (B, Q+T)
    if isinstance(lm, T5ForConditionalGeneration):
        return _encoder_decoder_loss(lm, embeds, mask, labels)
    return _decoder_only_loss(lm, embeds, mask, labels)


def _decoder_only_loss(
    lm: OPTForCausalLM, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """OPT: the queries and text in one causal sequence, position t predicting token t + 1."""
    b, q = mask.shape[0], mask.shape[1] - labels.shape[1]
    position_ids = mask.long().cumsum(-1) * mask - 1  # as in generation; -1 on padding
    logits = lm(embeds, position_ids, None if mask.all() else mask)  # (B, Q + T, V)
    targets = torch.cat([labels.new_full((b, q), IGNORE_INDEX), labels], dim=1)  # (B, Q + T)
    return _cross_entropy(logits[:, :-1], targets[:, 1:])


def _encoder_decoder_loss(
    lm: T5ForConditionalGeneration, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """T5: queries and prompt to the encoder; the decoder, fed the targets shifted right
    behind its start token, predicts each target (teacher forcing, as transformers)."""
    config = lm.config
    decoder_input_ids = shift_right(labels, config.decoder_start_token_id, config.pad_token_id)
    logits = lm(embeds, mask, decoder_input_ids)  # (B, T_target, V)
    return _cross_entropy(logits, labels)


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """(B, T) decoder targets -> (B, T) decoder inputs: the start token, then the targets
    but the last, -100 read as padding (the reference's ``T5._shift_right``)."""
    shifted = torch.cat([labels.new_full((labels.shape[0], 1), start_token_id), labels[:, :-1]], 1)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) targets -> mean over the targets that are not -100."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


# -- what trains, and how ---------------------------------------------------------------------


def freeze_for_stage2(model: Blip2Model) -> dict[str, torch.nn.Parameter]:
    """Freeze the image encoder and language model (eval mode, no gradients); make the
    query tokens, Q-Former and projection trainable float32. Returns them by name."""
    model.vision_model.requires_grad_(False).eval()
    model.language_model.requires_grad_(False).eval()
    model.language_projection.float()  # master weights in fp32 (a no-op for fp32 models)
    trainable = {
        name: param
        for name, param in model.named_parameters()
        if name.startswith(TRAINABLE_PREFIXES)
    }
    for param in trainable.values():
        assert param.dtype == torch.float32, "trainable parameters must be float32"
        param.requires_grad_(True)
    model.qformer.train()
    model.language_projection.train()
    return trainable


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``mixed_precision`` setting; None means full precision."""
    if mixed_precision == "no" or (mixed_precision == "auto" and device.type != "cuda"):
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mixed_precision == "fp16" and device.type != "cuda":
        raise InvalidRequest("fp16 mixed precision needs a CUDA device; use bf16 or no")
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


class StepBatches(Sampler[list[int]]):
    """Index batches for steps ``start .. stop - 1``. Each epoch is a fresh permutation seeded
    by (seed, epoch), so a step's batch depends only on the seed and the step number."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.stop = start, stop
        self.per_epoch = math.ceil(size / batch_size)  # the last batch may be smaller

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        order, order_epoch = None, -1
        for step in range(self.start, self.stop):
            epoch, k = divmod(step, self.per_epoch)
            if epoch != order_epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order, order_epoch = torch.randperm(self.size, generator=generator), epoch
            yield order[k * self.batch_size : (k + 1) * self.batch_size].tolist()


# -- the loop ---------------------------------------------------------------------------------


def train_stage2(
    model: Blip2Model,
    tokenizer: Tokenizer,
    image_processor: ImageProcessor,
    train_examples: Sequence[TrainExample],
    config: TrainConfig,
    *,
    output_dir: str | Path,
    eval_examples: Sequence[TrainExample] | None = None,
    resume: bool = False,
    generation_config: dict[str, Any],
) -> TrainResult:
    """Train ``model``'s Q-Former, query tokens and projection in place on image-caption
    pairs; checkpoints go to ``output_dir`` (see the module docstring).

    ``generation_config`` is the checkpoint's ``generation_config.json``: its eos id (``"\\n"``
    for the Salesforce models) ends every target, and it is saved with each checkpoint.
    """
    config.validate()
    trainer = _Trainer(
        model, tokenizer, image_processor, config, Path(output_dir), generation_config
    )
    train_set = trainer.dataset(train_examples)
    eval_set = trainer.dataset(eval_examples) if eval_examples else None  # fail early if bad
    trainer.start(resume)
    for batch in trainer.batches(train_set):
        trainer.train_step(batch)
        if eval_set and _due(config.eval_every, trainer.step, config.max_steps):
            trainer.evaluate(eval_set)
        if _due(config.save_every, trainer.step, config.max_steps):
            trainer.save_periodic()
    trainer.close_progress()
    final_eval = trainer.evaluate(eval_set) if eval_set else None
    trainer.save(trainer.output_dir)
    return trainer.result(final_eval)


class _Trainer:
    """The state of one run: optimizer, schedule, scaler, step count and history."""

    def __init__(
        self,
        model: Blip2Model,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        config: TrainConfig,
        output_dir: Path,
        generation_config: dict[str, Any],
    ) -> None:
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.config, self.output_dir = config, output_dir
        self.generation_config = generation_config
        self.device = model.language_projection.weight.device
        self.amp_dtype = autocast_dtype(config.mixed_precision, self.device)
        self.defaults = CheckpointDefaults.from_dict(generation_config, model.config)
        self.eos_token_id, self.pad_token_id = _token_ids(self.defaults)
        torch.manual_seed(config.seed)
        self.params = freeze_for_stage2(model)
        self.optimizer = build_optimizer(
            self.params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas
        )
        self.scheduler = LambdaLR(
            self.optimizer, warmup_cosine(config.warmup_steps, config.max_steps)
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.step = 0
        self.losses: list[float] = []
        self.evaluations: list[EvalResult] = []
        self.progress: tqdm | None = None

    # -- data ----------------------------------------------------------------------------

    def dataset(self, examples: Sequence[TrainExample]) -> CaptionDataset:
        config = self.model.config
        return CaptionDataset(
            examples,
            self.tokenizer,
            self.image_processor,
            eos_token_id=self.eos_token_id,
            max_text_tokens=None  # T5's relative positions have no limit
            if config.is_encoder_decoder
            else config.text.max_position_embeddings - config.num_query_tokens,
            encoder_decoder=config.is_encoder_decoder,
        )

    def batches(self, dataset: CaptionDataset) -> Iterator[Batch]:
        """The batches of the steps still to run, on the model's device."""
        config = self.config
        sampler = StepBatches(
            len(dataset), config.batch_size, config.seed, self.step, config.max_steps
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=Collate(self.pad_token_id),
            num_workers=config.num_workers,
        )
        for batch in loader:
            yield batch.to(self.device)

    # -- steps ---------------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    def train_step(self, batch: Batch) -> None:
        with self.autocast():
            loss = stage2_loss(
                self.model, batch.pixel_values, batch.input_ids, batch.attention_mask, batch.labels
            )
        value = loss.item()
        if not math.isfinite(value) and not self.scaler.is_enabled():
            raise InvalidRequest(
                f"the loss became {value} at step {self.step + 1}; lower the learning rate "
                "or train in full precision (mixed_precision 'no')"
            )
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.losses.append(value)
        self._report()

    def _report(self) -> None:
        recent = self.losses[-self.config.log_every :]
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if self.step % self.config.log_every == 0 or self.step == self.config.max_steps:
            lr = self.scheduler.get_last_lr()[0]
            self._log({"step": self.step, "loss": sum(recent) / len(recent), "lr": lr})

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self, dataset: CaptionDataset) -> EvalResult:
        """Mean target-token loss, and exact match of greedy captions, on held-out examples."""
        self.model.eval()
        try:
            loss = self._eval_loss(dataset)
            predictions = self._greedy_captions(dataset.examples)
        finally:
            self.model.qformer.train()
            self.model.language_projection.train()
        targets = [example.caption.strip() for example in dataset.examples]
        matches = sum(p == t for p, t in zip(predictions, targets, strict=True))
        result = EvalResult(self.step, loss, matches / len(targets), predictions)
        self.evaluations.append(result)
        self._log({"step": self.step, "eval_loss": loss, "eval_accuracy": result.accuracy})
        return result

    @torch.no_grad()
    def _eval_loss(self, dataset: CaptionDataset) -> float:
        loader = DataLoader(
            dataset, batch_size=self.config.batch_size, collate_fn=Collate(self.pad_token_id)
        )
        total, count = 0.0, 0
        for batch in loader:
            batch = batch.to(self.device)
            with self.autocast():
                loss = stage2_loss(
                    self.model,
                    batch.pixel_values,
                    batch.input_ids,
                    batch.attention_mask,
                    batch.labels,
                )
            total += loss.item() * batch.num_targets
            count += batch.num_targets
        return total / count

    def _greedy_captions(self, examples: Sequence[TrainExample]) -> list[str]:
        """What the served model says: our engine, through a Pipeline on this model."""
        pipe = Pipeline(self.model, self.tokenizer, self.image_processor, self.defaults)
        size, captions = self.config.batch_size, []
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            captions += pipe.caption(
                [e.image for e in chunk],
                [e.prompt for e in chunk],
                max_new_tokens=self.config.eval_max_new_tokens,
                num_beams=1,
                do_sample=False,
            )
        return captions

    # -- checkpoints ---------------------------------------------------------------------

    def start(self, resume: bool) -> None:
        """Restore the newest checkpoint when resuming; refuse to mix runs otherwise."""
        latest = latest_checkpoint(self.output_dir)
        if latest is not None and not resume:
            raise InvalidRequest(
                f"{self.output_dir} already holds a training run ({latest}); resume it "
                "(resume=True) or choose another output directory"
            )
        if latest is not None:
            self._restore(latest)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.config.progress:
            self.progress = tqdm(
                total=self.config.max_steps, initial=self.step, desc="stage 2", unit="step"
            )

    def save_periodic(self) -> None:
        """``checkpoint-NNNNNN``, written under a temporary name and renamed when complete."""
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.save(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in _periodic_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)

    def save(self, directory: Path) -> None:
        """A Hugging Face checkpoint plus the training state; the state file comes last."""
        (directory / TRAINER_STATE).unlink(missing_ok=True)
        save_checkpoint(
            self.model,
            self.tokenizer,
            self.image_processor,
            directory,
            generation_config=self.generation_config,
        )
        torch.save(self._training_state(), directory / TRAINING_STATE)
        trainer_state = {
            "step": self.step,
            "losses": self.losses,
            "evaluations": [asdict(e) for e in self.evaluations],
            "config": asdict(self.config),
        }
        (directory / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")

    def _training_state(self) -> dict[str, Any]:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _restore(self, directory: Path) -> None:
        trainer_state = json.loads((directory / TRAINER_STATE).read_text())
        saved = trainer_state["config"]
        for name in ("batch_size", "seed"):  # they fix the data order
            if saved[name] != getattr(self.config, name):
                what = name.replace("_", " ")
                raise InvalidRequest(
                    f"cannot resume {directory}: it was trained with {what} {saved[name]}, "
                    f"not {getattr(self.config, name)}; resume with the same {what}"
                )
        self._load_trainable(directory / WEIGHTS_NAME)
        state = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_python_rng_state(state["python_rng"]))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = trainer_state["step"]
        self.losses = list(trainer_state["losses"])
        self.evaluations = [EvalResult(**e) for e in trainer_state["evaluations"]]

    def _load_trainable(self, path: Path) -> None:
        with safe_open(str(path), framework="pt", device="cpu") as f, torch.no_grad():
            for name, param in self.params.items():
                param.copy_(f.get_tensor(name))

    def _log(self, record: dict[str, Any]) -> None:
        with (self.output_dir / LOG_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def result(self, final_eval: EvalResult | None) -> TrainResult:
        final = self.losses[-1] if self.losses else math.nan
        return TrainResult(
            self.step, final, list(self.losses), list(self.evaluations), self.output_dir, final_eval
        )


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run in ``output_dir`` (the final one included)."""
    output_dir = Path(output_dir)
    candidates = [*_periodic_checkpoints(output_dir), output_dir]
    steps = {
        directory: json.loads((directory / TRAINER_STATE).read_text())["step"]
        for directory in candidates
        if (directory / TRAINER_STATE).is_file()
    }
    return max(steps, key=steps.get) if steps else None


def _periodic_checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``checkpoint-NNNNNN`` directories, oldest first."""
    found = [
        path
        for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if path.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (path / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=lambda path: int(path.name.removeprefix(CHECKPOINT_PREFIX)))


def _due(every: int | None, step: int, max_steps: int) -> bool:
    """A periodic evaluation or save is due after ``step`` (the final ones run separately)."""
    return every is not None and step % every == 0 and step < max_steps


def _token_ids(defaults: CheckpointDefaults) -> tuple[int, int]:
    """(eos, pad): the eos ends every target; pad fills batches (it is never a target)."""
    eos, pad = defaults.eos_token_ids[0], defaults.pad_token_id
    if eos is None or pad is None:
        raise InvalidRequest("generation_config needs an eos_token_id and a pad_token_id")
    return eos, pad


def _as_python_rng_state(state: Any) -> tuple:
    """``random.setstate`` wants tuples; a saved state may come back with lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequest(message)
