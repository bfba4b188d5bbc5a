"""Checkpoint loading: model names, configs and weight files, and the errors for each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blipserve
from blipserve import resolve
from blipserve.errors import CheckpointError, ModelNotFound, UnsupportedModel
from blipserve.model.blip2 import Blip2Config
from blipserve.resolve import resolve_checkpoint
from blipserve.testing import checkpoints
from blipserve.weights import read_safetensors


@pytest.fixture
def single(tmp_path, reference_model, checkpoint_root):
    """A writable single-file copy of the tiny checkpoint."""
    source = checkpoints.save_checkpoint(reference_model, checkpoint_root, "single")
    return shutil.copytree(source, tmp_path / "ckpt")


def rewrite_weights(directory, change) -> None:
    path = directory / "model.safetensors"
    save_file(change(load_file(path)), path, metadata={"format": "pt"})


def test_config_defaults_follow_the_reference():
    """The Hub config is a compact diff: omitted fields take transformers' defaults."""
    from transformers import Blip2Config as ReferenceConfig

    ours = Blip2Config.from_hf({"model_type": "blip-2", "text_config": {"model_type": "opt"}})
    ref = ReferenceConfig(text_config={"model_type": "opt"})
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "layer_norm_eps",
        "qkv_bias",
        "hidden_act",
    ):
        assert getattr(ours.vision, name) == getattr(ref.vision_config, name), name
    for name in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "layer_norm_eps",
        "cross_attention_frequency",
        "encoder_hidden_size",
    ):
        assert getattr(ours.qformer, name) == getattr(ref.qformer_config, name), name
    assert ours.num_query_tokens == ref.num_query_tokens == 32
    assert ours.vision.num_positions == 257 and ours.vision.head_dim == 88


def test_t5_text_config_picks_t5_and_other_language_models_are_refused():
    config = Blip2Config.from_hf({"model_type": "blip-2", "text_config": {"model_type": "t5"}})
    assert config.is_encoder_decoder and config.text.model_type == "t5"
    with pytest.raises(UnsupportedModel, match="'llama' language model is not supported"):
        Blip2Config.from_hf({"model_type": "blip-2", "text_config": {"model_type": "llama"}})


def test_other_model_types_are_refused():
    with pytest.raises(UnsupportedModel, match="instructblip"):
        Blip2Config.from_hf({"model_type": "instructblip"})


def test_missing_tensor_names_tensor_and_directory(single):
    victim = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    rewrite_weights(single, lambda state: {k: v for k, v in state.items() if k != victim})
    with pytest.raises(CheckpointError, match="missing 1 tensors") as info:
        blipserve.load(str(single), device="cpu")
    assert victim in str(info.value) and str(single) in str(info.value)


def test_unexpected_tensor_names_tensor_and_file(single):
    rewrite_weights(single, lambda state: {**state, "vision_model.extra.weight": torch.zeros(2)})
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'vision_model\.extra\.weight'"
    ) as info:
        blipserve.load(str(single), device="cpu")
    assert "model.safetensors" in str(info.value)


def test_misshaped_tensor_names_both_shapes(single):
    name = "language_projection.weight"
    rewrite_weights(single, lambda state: {**state, name: state[name][:, :-1].contiguous()})
    with pytest.raises(
        CheckpointError, match=r"language_projection\.weight.*\(32, 31\).*\(32, 32\)"
    ):
        blipserve.load(str(single), device="cpu")


def test_config_that_disagrees_with_weights(single):
    config = json.loads((single / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] += 1
    (single / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"missing \d+ tensors: language_model\.model\.decoder\.layers\.2"
    ):
        blipserve.load(str(single), device="cpu")


def test_shard_listed_in_index_but_absent(tmp_path, reference_model, checkpoint_root):
    source = checkpoints.save_checkpoint(reference_model, checkpoint_root, "sharded")
    directory = shutil.copytree(source, tmp_path / "sharded")
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        blipserve.load(str(directory), device="cpu")


def test_directory_without_weights(single):
    (single / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        blipserve.load(str(single), device="cpu")


def test_bin_files_are_loaded_weights_only(single):
    """A pickle that would run code on load is refused, not executed."""
    (single / "model.safetensors").unlink()

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    torch.save({"x": Exploit()}, single / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        blipserve.load(str(single), device="cpu")


def test_lm_head_is_tied_when_absent(single):
    model = blipserve.load(str(single), device="cpu", for_training=True).model  # unpacked
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.decoder.embed_tokens.weight.data_ptr()


def test_weights_load_straight_into_the_target_dtype(single):
    """bf16 load: the big parts are bf16, nothing random, values equal the file's."""
    model = blipserve.load(str(single), device="cpu", dtype="bfloat16", for_training=True).model
    stored = load_file(single / "model.safetensors")
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    ours = dict(model.named_parameters())[name]
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, stored[name].to(torch.bfloat16))
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_cpu_is_bfloat16_only_where_the_processor_computes_it(
    single, monkeypatch, native
):
    """bfloat16 is emulated (5x slower than float32) on CPUs without AVX512-BF16 or AMX."""
    monkeypatch.setattr(resolve, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert resolve.resolve_dtype("auto", torch.device("cpu")) == expected
    assert blipserve.load(str(single), device="cpu").model.dtype == expected
    assert resolve.resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_native_bf16_probe_agrees_with_the_processor_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert resolve.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_safetensors_are_read_tensor_by_tensor_as_the_library_reads_them(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).bfloat16(),
        "f32": torch.randn(7),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(4),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    ours = dict(read_safetensors(path))
    theirs = load_file(path)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_cut_or_malformed_safetensors_name_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="ends inside tensor 'w'"):
        list(read_safetensors(path))
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        list(read_safetensors(path))


def test_model_names_resolve(single, tmp_path):
    assert resolve_checkpoint(str(single)) == single
    with pytest.raises(ModelNotFound, match=r"no config\.json"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(ModelNotFound, match="neither 'demo', an existing directory, nor a Hub id"):
        resolve_checkpoint("./no/such/dir/anywhere")


def test_demo_resolves_to_the_bundled_checkpoint():
    directory = resolve_checkpoint("demo")
    assert directory.name == "demo_model" and directory.parent.name == "blipserve"
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


def run_offline(code: str, hf_home) -> subprocess.CompletedProcess:
    """Run ``code`` in a child with the Hub forced offline and its endpoint on a closed
    loopback port, so no packet leaves this machine even if the code under test were broken."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(hf_home),
    }
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_uncached_hub_id_offline_names_id_and_fix(tmp_path):
    """Offline and not cached: the error names the id and how to get the files."""
    code = (
        "import blipserve, sys\n"
        "try:\n    blipserve.load('Salesforce/blip2-opt-2.7b', device='cpu')\n"
        "except blipserve.ModelNotFound as e:\n    print(e); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    done = run_offline(code, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert "'Salesforce/blip2-opt-2.7b'" in done.stdout
    assert "hf download Salesforce/blip2-opt-2.7b" in done.stdout


def test_cached_hub_snapshot_loads_offline(tmp_path, single):
    """A snapshot in the Hugging Face cache layout is found without any network."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-blip2"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(single, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    code = (
        "import blipserve\n"
        "pipe = blipserve.load('acme/tiny-blip2', device='cpu')\n"
        "print(pipe.model.config.num_query_tokens)"
    )
    done = run_offline(code, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "8"
