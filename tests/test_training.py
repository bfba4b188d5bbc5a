"""Stage-2 training on tiny random checkpoints: targets, loss, frozen parts, checkpoints.

One short shared run (a fresh Q-Former assembled around the tiny checkpoint's image
encoder and language model, 20 steps on 8 real photos) feeds most tests; the loss is
also checked against transformers' own BLIP-2 loss, and saved checkpoints against
transformers' ``from_pretrained`` + ``generate``.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import blipserve
from blipserve.errors import BlipserveError, InvalidRequest
from blipserve.model.blip2 import Blip2Config, keeps_fp32
from blipserve.model.qformer import QFormerConfig
from blipserve.resolve import resolve_checkpoint
from blipserve.testing.reference import reference_generate
from blipserve.train import stage2
from blipserve.train.checkpoint import (
    assemble,
    checkpoint_tensors,
    save_checkpoint,
)
from blipserve.train.data import (
    IGNORE_INDEX,
    CaptionDataset,
    Collate,
    TrainExample,
    encode_example,
    read_caption_table,
)
from blipserve.train.stage2 import (
    StepBatches,
    TrainConfig,
    stage2_loss,
    train_stage2,
    warmup_cosine,
)
from tests.examples import png_bytes
from tests.stage2_runs import load_cpu, mean_loss, run_training, train_command

CAPTIONS = {
    "astronaut": "a woman in a space suit",
    "camera": "a man with a camera",
    "chelsea": "a cat looking at the camera",
    "coffee": "a cup of coffee on a table",
    "rocket": "a rocket on the launch pad",
    "coins": "old coins on a black cloth",
    "motorcycle": "a red motorcycle",
    "clock": "a clock on the wall",
}
PROMPTS = ["", "a photo of", "Question: what is this? Answer:", ""]
RUN = TrainConfig(
    max_steps=20, batch_size=4, lr=5e-3, warmup_steps=3, save_every=10, log_every=5, progress=False
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples() -> list[TrainExample]:
    """8 real photos (shrunk, so preprocessing is cheap), each with a short caption."""
    import skimage.data

    arrays = {
        "astronaut": skimage.data.astronaut(),
        "camera": skimage.data.camera(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "coins": skimage.data.coins(),
        "motorcycle": skimage.data.stereo_motorcycle()[0],
        "clock": skimage.data.clock(),
    }
    images = {
        name: Image.fromarray(a).convert("RGB").resize((64, 64)) for name, a in arrays.items()
    }
    return [
        TrainExample(images[name], caption, PROMPTS[i % len(PROMPTS)])
        for i, (name, caption) in enumerate(CAPTIONS.items())
    ]


def assembled(checkpoint) -> tuple[blipserve.Pipeline, torch.nn.Module]:
    """The checkpoint's image encoder and language model around a fresh, differently shaped
    Q-Former (hidden 48, 3 layers, cross-attention on every layer, 6 queries)."""
    pipe = load_cpu(checkpoint)
    qformer = QFormerConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        cross_attention_frequency=1,
    )  # fmt: skip
    model = assemble(
        pipe.model.vision_model,
        pipe.model.language_model,
        qformer,
        num_query_tokens=6,
        image_token_index=pipe.tokenizer.image_token_id,
        seed=0,
    )
    pipe.model = model
    return pipe, model


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, examples, tmp_path_factory):
    """(pipeline, state before, loss before, result): one 20-step run, checkpoints at 10
    and 20, evaluated on its own 8 examples."""
    pipe, model = assembled(tiny_checkpoint)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    loss_before = mean_loss(pipe, examples)
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = run_training(pipe, examples, RUN, output_dir, eval_examples=examples)
    return pipe, before, loss_before, result


# -- targets -----------------------------------------------------------------------------------


def test_labels_cover_caption_and_eos_only(tiny_checkpoint):
    tokenizer = load_cpu(tiny_checkpoint).tokenizer
    eos = tokenizer.encode("\n")[-1]  # the BLIP-2 OPT eos is the newline token

    ids, labels = encode_example(tokenizer, "a photo of", " a cat on a mat ", eos)
    prompt_ids = tokenizer.encode("a photo of")  # what generation feeds for this prompt
    target_ids = tokenizer.encode(" a cat on a mat\n")[1:]  # without BOS
    assert ids == prompt_ids + target_ids and target_ids[-1] == eos
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    assert tokenizer.decode(ids) == "a photo of a cat on a mat"
    assert tokenizer.decode(target_ids) == "a cat on a mat"  # what Pipeline.generate returns

    ids, labels = encode_example(tokenizer, "", "a cat on a mat", eos)
    assert ids == tokenizer.encode("a cat on a mat\n")  # BOS, caption, "\n": the LAVIS target
    assert labels == [IGNORE_INDEX, *ids[1:]]

    ids, labels = encode_example(tokenizer, "Answer: ", "yes", eos)  # prompt ends in a space
    assert ids == tokenizer.encode("Answer: ") + tokenizer.encode("yes\n")[1:]


def test_collate_pads_right_and_masks_padding(tiny_checkpoint, examples):
    pipe = load_cpu(tiny_checkpoint)
    dataset = CaptionDataset(examples[:2], pipe.tokenizer, pipe.image_processor, eos_token_id=7)
    batch = Collate(pad_token_id=1)([dataset[0], dataset[1]])
    lengths = [len(dataset.encoded[i][0]) for i in range(2)]
    assert batch.pixel_values.shape == (2, 3, 224, 224)
    assert batch.attention_mask.sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch.input_ids[short, min(lengths) :] == 1).all()
    assert (batch.labels[short, min(lengths) :] == IGNORE_INDEX).all()
    assert batch.num_targets == sum(len(dataset.encoded[i][0]) for i in range(2)) - sum(
        len(pipe.tokenizer.encode(ex.prompt)) for ex in examples[:2]
    )


def test_loss_matches_transformers(tiny_checkpoint, examples):
    """stage2_loss == Blip2ForConditionalGeneration(..., labels=...).loss, with right padding
    and queries, BOS and prompts masked. Both sides read the same checkpoint files (the
    session's ``reference_model`` is not used: another test rounds it through bf16)."""
    pipe = load_cpu(tiny_checkpoint)
    reference_model = Blip2ForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    eos = reference_model.config.text_config.eos_token_id
    dataset = CaptionDataset(examples[:4], pipe.tokenizer, pipe.image_processor, eos_token_id=eos)
    batch = Collate(pad_token_id=1)([dataset[i] for i in range(4)])
    with torch.no_grad():
        ours = stage2_loss(
            pipe.model, batch.pixel_values, batch.input_ids, batch.attention_mask, batch.labels
        )
        # the reference's sequence: Q <image> placeholders, then the text; labels over both
        q = reference_model.config.num_query_tokens
        image_ids = torch.full((4, q), reference_model.config.image_token_index)
        theirs = reference_model(
            pixel_values=batch.pixel_values,
            input_ids=torch.cat([image_ids, batch.input_ids], dim=1),
            attention_mask=torch.cat([torch.ones_like(image_ids), batch.attention_mask], dim=1),
            labels=torch.cat([torch.full_like(image_ids, IGNORE_INDEX), batch.labels], dim=1),
        ).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# -- the shared run ----------------------------------------------------------------------------


def test_training_lowers_the_loss(trained, examples):
    """The random frozen decoder has nearly flat logits (ln 567 = 6.34 nats), so no prefix
    can fit these captions; 20 steps must still take a clear share off the loss."""
    pipe, _, loss_before, result = trained
    assert result.step == 20 and len(result.losses) == 20
    assert result.final_loss == result.losses[-1]
    evaluation = result.eval
    assert evaluation is not None and evaluation.step == 20
    assert evaluation.loss == pytest.approx(mean_loss(pipe, examples), rel=1e-5)
    assert evaluation.loss < loss_before - 0.3, (loss_before, result.losses)
    assert len(evaluation.predictions) == 8 and 0.0 <= evaluation.accuracy <= 1.0
    log = [json.loads(line) for line in (result.output_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [5, 10, 15, 20]
    assert log[-1] == {
        "step": 20,
        "eval_loss": evaluation.loss,
        "eval_accuracy": evaluation.accuracy,
    }


def test_only_qformer_queries_and_projection_change(trained):
    pipe, before, _, _ = trained
    after = pipe.model.state_dict()
    assert after.keys() == before.keys()
    trained_prefixes = ("query_tokens", "qformer.", "language_projection.")
    for name, tensor in after.items():
        if name.startswith(("vision_model.", "language_model.")):
            assert torch.equal(tensor, before[name]), f"frozen {name} changed"
        else:
            assert name.startswith(trained_prefixes), name
            assert not torch.equal(tensor, before[name]), f"{name} did not train"
    assert not any(p.requires_grad for p in pipe.model.language_model.parameters())
    assert not pipe.model.language_model.training and not pipe.model.vision_model.training


def test_checkpoint_round_trips_through_blipserve_and_transformers(trained, photos):
    pipe, _, _, result = trained
    directory = result.output_dir
    images = [photos[name] for name in ("chelsea", "coffee", "astronaut", "china")]
    prompts = ["", "a photo of", "Question: what is in the picture? Answer:", "a"]

    config = json.loads((directory / "config.json").read_text())
    assert Blip2Config.from_hf(config) == pipe.model.config
    reference, info = Blip2ForConditionalGeneration.from_pretrained(
        directory, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert Blip2Processor.from_pretrained(directory).num_query_tokens == 6

    loaded = load_cpu(directory)
    ours = [
        [g.token_ids for g in row] for row in loaded.generate(images, prompts, max_new_tokens=8)
    ]
    assert ours == reference_generate(
        reference.eval(), directory, images, prompts, max_new_tokens=8
    )
    in_memory = pipe.generate(images, prompts, max_new_tokens=8)  # the model as trained
    assert ours == [[g.token_ids for g in row] for row in in_memory]


def test_resume_reproduces_the_uninterrupted_run(
    trained, tiny_checkpoint, examples, tmp_path, monkeypatch
):
    *_, uninterrupted = trained
    pipe, model = assembled(tiny_checkpoint)
    calls, real_loss = [], stage2.stage2_loss

    def crash_at_step_15(*args):
        calls.append(1)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(stage2, "stage2_loss", crash_at_step_15)
    with pytest.raises(KeyboardInterrupt):
        run_training(pipe, examples, RUN, tmp_path)
    assert stage2.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000010"
    with pytest.raises(InvalidRequest, match="resume"):
        run_training(pipe, examples, RUN, tmp_path)  # refuses to overwrite the run

    resumed_calls = []

    def counted(*args):
        resumed_calls.append(1)
        return real_loss(*args)

    monkeypatch.setattr(stage2, "stage2_loss", counted)
    pipe, model = assembled(tiny_checkpoint)  # as a new process would: fresh parts
    result = run_training(pipe, examples, RUN, tmp_path, resume=True)
    assert len(resumed_calls) == 10  # steps 11-20 only
    assert result.step == 20 and result.losses == uninterrupted.losses
    final = load_cpu(uninterrupted.output_dir).model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name]), name


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_bfloat16_model_trains_float32_master_weights(
    tiny_checkpoint, examples, tmp_path, mixed_precision
):
    """Frozen parts in bf16 (the recipe's), trained parts in fp32; CPU bf16 autocast too."""
    pipe = blipserve.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", for_training=True)
    before = {name: t.clone() for name, t in pipe.model.state_dict().items()}
    config = TrainConfig(
        max_steps=3, batch_size=2, lr=5e-3, warmup_steps=1, mixed_precision=mixed_precision,
        progress=False,
    )  # fmt: skip
    result = train_stage2(
        pipe.model,
        pipe.tokenizer,
        pipe.image_processor,
        examples[:2],
        config,
        output_dir=tmp_path,
        generation_config=pipe.generation_config(),
    )
    assert all(torch.isfinite(torch.tensor(result.losses)))
    model = pipe.model
    assert model.language_projection.weight.dtype == torch.float32
    assert model.dtype == model.vision_model.post_layernorm.weight.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        if name.startswith(("vision_model.", "language_model.")):
            assert torch.equal(tensor, before[name]), name
    loaded = blipserve.load(str(tmp_path), device="cpu", dtype="bfloat16", for_training=True)
    loaded = loaded.model.state_dict()
    for name, tensor in model.state_dict().items():  # loading casts the projection to bf16
        assert torch.equal(loaded[name], tensor.to(loaded[name].dtype)), name


# -- checkpoints and parts ---------------------------------------------------------------------


def test_assemble_initialises_fresh_parts_from_the_seed(tiny_checkpoint):
    pipe, model = assembled(tiny_checkpoint)
    _, again = assembled(tiny_checkpoint)
    assert model.vision_model is pipe.model.vision_model
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    layer = model.qformer.encoder.layer[0]
    assert model.config.qformer.encoder_hidden_size == model.config.vision.hidden_size
    assert torch.equal(layer.attention.output.LayerNorm.weight, torch.ones(48))
    assert torch.equal(layer.crossattention.attention.key.bias, torch.zeros(48))
    assert abs(model.query_tokens.std().item() - 0.02) < 0.005
    assert abs(model.language_projection.weight.std().item() - 0.02) < 0.005
    assert model.query_tokens.dtype == model.qformer.layernorm.weight.dtype == torch.float32


def test_save_in_bfloat16_keeps_the_qformer_in_float32(tiny_checkpoint, tmp_path):
    pipe = load_cpu(tiny_checkpoint)
    tensors = checkpoint_tensors(pipe.model, torch.bfloat16)
    assert "language_model.lm_head.weight" not in tensors  # tied: the loaders re-tie it
    for name, tensor in tensors.items():
        assert tensor.dtype == (torch.float32 if keeps_fp32(name) else torch.bfloat16), name
    directory = save_checkpoint(
        pipe.model,
        pipe.tokenizer,
        pipe.image_processor,
        tmp_path,
        generation_config=pipe.generation_config(),
        dtype=torch.bfloat16,
    )
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    gen = json.loads((directory / "generation_config.json").read_text())
    assert gen == {
        "bos_token_id": 2,
        "eos_token_id": pipe.defaults.eos_token_ids[0],
        "pad_token_id": 1,
    }
    loaded = blipserve.load(str(directory), device="cpu", dtype="bfloat16")
    assert loaded.model.qformer.layernorm.weight.dtype == torch.float32


# -- schedule, data order, settings ------------------------------------------------------------


def test_warmup_then_cosine():
    factor = warmup_cosine(warmup_steps=4, max_steps=12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    decay = [factor(s) for s in range(4, 12)]
    assert decay[0] == 1.0 and all(a > b for a, b in itertools.pairwise(decay))
    assert factor(8) == pytest.approx(0.5) and decay[-1] < 0.05


def test_batches_depend_only_on_seed_and_step():
    full = list(StepBatches(10, 4, seed=3, start=0, stop=9))
    assert [len(b) for b in full[:3]] == [4, 4, 2]  # epochs of 3 batches
    assert (
        sorted(i for batch in full[:3] for i in batch) == list(range(10)) and full[:3] != full[3:6]
    )
    assert list(StepBatches(10, 4, seed=3, start=5, stop=9)) == full[5:]
    assert list(StepBatches(10, 4, seed=4, start=0, stop=9)) != full


def test_bad_settings_are_clear_errors():
    with pytest.raises(InvalidRequest, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(InvalidRequest, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8").validate()
    with pytest.raises(InvalidRequest, match="CUDA"):
        stage2.autocast_dtype("fp16", torch.device("cpu"))
    assert stage2.autocast_dtype("auto", torch.device("cpu")) is None
    assert stage2.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16


# -- caption tables ----------------------------------------------------------------------------


def test_read_csv_and_jsonl_tables(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(png_bytes("red"))
    b64 = base64.b64encode(png_bytes("blue")).decode()
    (tmp_path / "t.csv").write_text(
        f',image,caption,prompt\n0,imgs/red.png,a red square,\n1,{b64},"a blue square",a photo of\n'
    )
    rows = [
        {"image": "imgs/red.png", "caption": "red"},
        {"image": b64, "caption": "blue", "prompt": "a"},
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    csv_examples = read_caption_table(tmp_path / "t.csv")
    assert [(e.caption, e.prompt) for e in csv_examples] == [
        ("a red square", ""),
        ("a blue square", "a photo of"),
    ]
    assert csv_examples[0].image == str(tmp_path / "imgs" / "red.png")
    assert csv_examples[1].image == b64 and csv_examples[1].origin == f"{tmp_path / 't.csv'} line 3"
    jsonl_examples = read_caption_table(tmp_path / "t.jsonl")
    assert [(e.caption, e.prompt) for e in jsonl_examples] == [("red", ""), ("blue", "a")]
    assert jsonl_examples[0].image == csv_examples[0].image


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.csv", "image,text\nx.png,hi\n", r"a\.csv line 1: missing column 'caption'"),
        (
            "a.csv",
            "image,caption\nx.png,a cat\nx.png,  \n",
            r"a\.csv line 3, column 'caption': empty",
        ),
        ("a.csv", 'image,caption\nx.png,"two\nlines"\n', r"line 2, column 'caption'.*line break"),
        (
            "a.jsonl",
            '{"image": "x.png", "caption": "a"}\n{"image": "x.png"\n',
            r"line 2: not valid JSON",
        ),
        ("a.jsonl", '{"image": "x.png"}\n', r"a\.jsonl line 1: missing column 'caption'"),
        ("a.jsonl", '{"image": "x.png", "caption": 3}\n', r"column 'caption': expected a string"),
        ("a.jsonl", "\n", r"no examples"),
        ("a.txt", "image,caption\n", r"\.csv or \.jsonl"),
    ],
)
def test_table_errors_name_file_line_and_column(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InvalidRequest, match=message):
        read_caption_table(tmp_path / name)


# -- the command line --------------------------------------------------------------------------


def test_train_command_end_to_end(tiny_checkpoint, tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "blue.png")
    (tmp_path / "data.csv").write_text(
        "image,caption\nred.png,a red square\nblue.png,a blue square\n"
    )
    output = tmp_path / "out"
    done = train_command(tiny_checkpoint, tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["steps"] == 2 and summary["output"] == str(output)
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    assert (output / "checkpoint-000001" / "training_state.pt").is_file()
    assert load_cpu(output).caption([tmp_path / "red.png"], max_new_tokens=3)

    again = train_command(tiny_checkpoint, tmp_path)
    assert again.returncode == 1 and "add --resume" in again.stderr
    assert "resume=True" not in again.stderr  # the command's words, not the library's

    resumed = train_command(tiny_checkpoint, tmp_path, "--resume", "--steps", "3", eval_data=False)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.splitlines()[-1])
    assert summary["steps"] == 3 and "eval_loss" not in summary  # no stale evaluation

    umask = os.umask(0)
    os.umask(umask)
    for path in (output / "model.safetensors", output / "checkpoint-000001" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path  # 0644, like the rest


def test_train_starts_from_the_demo_model_by_default(tmp_path):
    command = [
        sys.executable, "-m", "blipserve", "train", "--synthetic", "2", "--steps", "1",
        "--batch-size", "2", "--output", str(tmp_path), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    trained = json.loads((tmp_path / "config.json").read_text())
    demo = json.loads((resolve_checkpoint("demo") / "config.json").read_text())
    assert Blip2Config.from_hf(trained) == Blip2Config.from_hf(demo)


def test_train_command_reads_synthetic_scenes_and_tables(tmp_path):
    """``--synthetic N`` adds N generated scenes (a caption and three questions each)."""
    import argparse

    from blipserve.train.main import training_examples

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    (tmp_path / "data.csv").write_text("image,caption\nred.png,a red square\n")
    args = argparse.Namespace(data=str(tmp_path / "data.csv"), synthetic=4, synthetic_seed=3)
    examples = training_examples(args)
    assert len(examples) == 1 + 4 * 4
    assert examples[0].caption == "a red square"
    prompts = [e.prompt for e in examples[1:]]
    assert prompts.count("") == 4 and all(p.startswith("Question: ") for p in prompts if p)
    with pytest.raises(BlipserveError, match="--synthetic N"):
        training_examples(argparse.Namespace(data=None, synthetic=None, synthetic_seed=3))
