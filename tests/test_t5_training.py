"""Stage-2 training of a BLIP-2 Flan-T5 checkpoint (tiny, random): targets, the loss against
transformers', a short run that lowers it, resuming, and the saved checkpoint in
transformers and blipserve; ``blipserve train`` on it through the command line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Blip2ForConditionalGeneration

import blipserve
from blipserve.errors import InvalidRequest
from blipserve.model.blip2 import Blip2Config
from blipserve.testing import checkpoints
from blipserve.testing.reference import reference_generate
from blipserve.train import stage2
from blipserve.train.checkpoint import assemble
from blipserve.train.data import (
    IGNORE_INDEX,
    TrainExample,
    encode_encoder_decoder_example,
)
from blipserve.train.stage2 import TrainConfig, shift_right, stage2_loss
from tests.stage2_runs import load_cpu, mean_loss, one_batch, run_training, train_command

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = {
    "chelsea": "a cat looking at the camera",
    "coffee": "a cup of coffee on a table",
    "astronaut": "a woman in a space suit",
    "china": "an old temple among the trees",
}
PROMPTS = ["", "a photo of", "Question: what is this? Answer:", ""]
RUN = TrainConfig(
    max_steps=12, batch_size=2, lr=1e-3, warmup_steps=2, save_every=6, log_every=3, progress=False
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("t5-training")


@pytest.fixture(scope="module")
def checkpoint(root):
    reference = checkpoints.build_t5_reference(root, variant=0, seed=1)
    return checkpoints.save_checkpoint(reference, root, "single")


def fresh_start(checkpoint) -> blipserve.Pipeline:
    """The checkpoint's image encoder and T5 around a freshly initialised Q-Former of the
    same shape: stage 2's starting point."""
    pipe = load_cpu(checkpoint)
    model = pipe.model
    pipe.model = assemble(
        model.vision_model,
        model.language_model,
        model.config.qformer,
        num_query_tokens=model.config.num_query_tokens,
        image_token_index=model.config.image_token_index,
    )
    return pipe


@pytest.fixture(scope="module")
def examples(photos) -> list[TrainExample]:
    """The four photos, shrunk (cheap preprocessing), each with a caption and a prompt."""
    return [
        TrainExample(photos[name].resize((64, 64)), caption, PROMPTS[i])
        for i, (name, caption) in enumerate(CAPTIONS.items())
    ]


@pytest.fixture(scope="module")
def trained(checkpoint, examples, tmp_path_factory):
    """(pipeline, state before, loss before, result): one 12-step run, evaluated at the end."""
    pipe = fresh_start(checkpoint)
    before = {name: t.clone() for name, t in pipe.model.state_dict().items()}
    loss_before = mean_loss(pipe, examples)
    output_dir = tmp_path_factory.mktemp("t5-run") / "out"
    result = run_training(pipe, examples, RUN, output_dir, eval_examples=examples)
    return pipe, before, loss_before, result


# -- targets and the loss --------------------------------------------------------------------


def test_encoder_gets_the_prompt_and_decoder_the_caption(checkpoint):
    tokenizer = load_cpu(checkpoint).tokenizer
    ids, labels = encode_encoder_decoder_example(tokenizer, "a photo of", " a cat on a mat ", 1)
    assert ids == tokenizer.encode("a photo of")  # what generation feeds the encoder, </s> last
    assert labels == tokenizer.encode("a cat on a mat") and labels[-1] == 1
    assert tokenizer.decode(labels) == "a cat on a mat"  # what Pipeline.generate returns
    assert encode_encoder_decoder_example(tokenizer, "", "a cat", 1)[0] == [1]  # "</s>" alone


def test_shift_right_is_the_references():
    labels = torch.tensor([[5, 6, 1], [7, 1, IGNORE_INDEX]])
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6], [0, 7, 1]]
    reference = Blip2ForConditionalGeneration(checkpoints.tiny_t5_config(64, 63)).language_model
    assert torch.equal(shift_right(labels, 0, 0), reference._shift_right(labels))


def test_collate_pads_prompts_and_targets_each_to_their_longest(checkpoint, examples):
    pipe = load_cpu(checkpoint)
    batch = one_batch(pipe, examples)
    prompts = [pipe.tokenizer.encode(p) for p in PROMPTS]
    captions = [pipe.tokenizer.encode(c) for c in CAPTIONS.values()]
    assert batch.attention_mask.sum(1).tolist() == [len(ids) for ids in prompts]
    assert batch.labels.shape == (4, max(len(ids) for ids in captions))
    assert (batch.labels != IGNORE_INDEX).sum(1).tolist() == [len(ids) for ids in captions]
    assert batch.input_ids[0, 1:].eq(0).all()  # the empty prompt: "</s>", then padding


def test_loss_matches_transformers(checkpoint, examples):
    """stage2_loss == Blip2ForConditionalGeneration(..., labels=...).loss: the reference
    shifts the labels into decoder inputs itself; padding on both sides of the batch."""
    pipe = load_cpu(checkpoint)
    reference = Blip2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    batch = one_batch(pipe, examples)
    with torch.no_grad():
        ours = stage2_loss(
            pipe.model, batch.pixel_values, batch.input_ids, batch.attention_mask, batch.labels
        )
        q = reference.config.num_query_tokens
        image_ids = torch.full((4, q), reference.config.image_token_index)
        theirs = reference(
            pixel_values=batch.pixel_values,
            input_ids=torch.cat([image_ids, batch.input_ids], dim=1),
            attention_mask=torch.cat([torch.ones_like(image_ids), batch.attention_mask], dim=1),
            labels=batch.labels,
        ).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# -- the shared run --------------------------------------------------------------------------


def test_training_lowers_the_loss_and_trains_only_the_qformer_side(trained, examples):
    pipe, before, loss_before, result = trained
    assert result.step == 12 and len(result.losses) == 12
    assert result.eval is not None
    assert result.eval.loss == pytest.approx(mean_loss(pipe, examples), rel=1e-5)
    assert result.eval.loss < loss_before - 0.3, (loss_before, result.losses)
    for name, tensor in pipe.model.state_dict().items():
        changed = not torch.equal(tensor, before[name])
        assert changed == name.startswith(stage2.TRAINABLE_PREFIXES), name
    assert not any(p.requires_grad for p in pipe.model.language_model.parameters())


def test_checkpoint_loads_in_transformers_and_blipserve_alike(trained, photos):
    pipe, _, _, result = trained
    directory = result.output_dir
    images = [photos[name] for name in CAPTIONS]
    config = json.loads((directory / "config.json").read_text())
    assert Blip2Config.from_hf(config) == pipe.model.config
    reference, info = Blip2ForConditionalGeneration.from_pretrained(
        directory, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors

    loaded = load_cpu(directory)
    ours = [
        [g.token_ids for g in row] for row in loaded.generate(images, PROMPTS, max_new_tokens=8)
    ]
    assert ours == reference_generate(
        reference.eval(), directory, images, PROMPTS, max_new_tokens=8
    )
    in_memory = pipe.generate(images, PROMPTS, max_new_tokens=8)  # the model as trained
    assert ours == [[g.token_ids for g in row] for row in in_memory]


def test_resume_reproduces_the_uninterrupted_run(
    trained, checkpoint, examples, tmp_path, monkeypatch
):
    *_, uninterrupted = trained
    real_loss, calls = stage2.stage2_loss, []

    def crash_at_step_9(*args):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(stage2, "stage2_loss", crash_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        run_training(fresh_start(checkpoint), examples, RUN, tmp_path)
    assert stage2.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000006"
    with pytest.raises(InvalidRequest, match="resume"):
        run_training(fresh_start(checkpoint), examples, RUN, tmp_path)

    monkeypatch.setattr(stage2, "stage2_loss", real_loss)
    pipe = fresh_start(checkpoint)  # as a new process would: fresh parts
    result = run_training(pipe, examples, RUN, tmp_path, resume=True)
    assert result.step == 12 and result.losses == uninterrupted.losses
    final = load_cpu(uninterrupted.output_dir).model.state_dict()
    for name, tensor in pipe.model.state_dict().items():
        assert torch.equal(tensor, final[name]), name


def test_train_command_on_a_t5_checkpoint(checkpoint, photos, tmp_path):
    for name in ("chelsea", "coffee"):
        photos[name].resize((32, 32)).save(tmp_path / f"{name}.png")
    (tmp_path / "data.csv").write_text(
        "image,caption,prompt\nchelsea.png,a cat,\ncoffee.png,coffee,what is it?\n"
    )
    output = tmp_path / "out"
    done = train_command(checkpoint, tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["steps"] == 2 and 0.0 <= summary["eval_accuracy"] <= 1.0
    assert (output / "checkpoint-000001" / "training_state.pt").is_file()
    trained = load_cpu(output)
    assert trained.model.config.is_encoder_decoder
    assert trained.generation_config()["decoder_start_token_id"] == 0
    trained.caption([tmp_path / "chelsea.png"], max_new_tokens=3)
