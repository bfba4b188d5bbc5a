"""Shared fixtures: real photos from installed packages and tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import blipserve
from blipserve.testing import checkpoints


@pytest.fixture(scope="session", autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny training steps: these matrices gain nothing
    from more, and on a busy machine the threads' synchronisation makes a step many times
    slower. Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photos shipped inside scikit-image and scikit-learn."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    arrays = {
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "astronaut": skimage.data.astronaut(),
        "china": load_sample_image("china.jpg"),
    }
    return {name: Image.fromarray(a) for name, a in arrays.items()}


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def reference_model(checkpoint_root):
    """transformers' BLIP-2 with small random weights (config variant 0)."""
    return checkpoints.build_reference(checkpoint_root, variant=0, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_root, reference_model):
    """The reference model saved as a sharded-safetensors checkpoint directory."""
    return checkpoints.save_checkpoint(reference_model, checkpoint_root, "sharded")


@pytest.fixture(scope="session")
def t5_checkpoint_root(tmp_path_factory):
    return tmp_path_factory.mktemp("t5-checkpoints")


@pytest.fixture(scope="session")
def t5_reference_model(t5_checkpoint_root):
    """transformers' BLIP-2 Flan-T5 with small random weights (config variant 0)."""
    return checkpoints.build_t5_reference(t5_checkpoint_root, variant=0, seed=0)


@pytest.fixture(scope="session")
def tiny_t5_checkpoint(t5_checkpoint_root, t5_reference_model):
    """The Flan-T5 reference model saved as a sharded-safetensors checkpoint directory."""
    return checkpoints.save_checkpoint(t5_reference_model, t5_checkpoint_root, "sharded")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    """The tiny checkpoint loaded on CPU in float32 (one per test module)."""
    return blipserve.load(str(tiny_checkpoint), device="cpu", dtype="float32")
