import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from captioner.checkpoint import save_checkpoint
from captioner.model import CaptionModel, ModelConfig
from captioner.vocab import Vocabulary

WORDS = "a cat dog sits on the chair cup of coffee rocket launch pad woman in space suit".split()


@pytest.fixture(scope="session")
def photos():
    """Real photos that scikit-image ships, as RGB PIL images."""
    return {
        "cat": Image.fromarray(data.chelsea()),
        "coffee": Image.fromarray(data.coffee()),
        "rocket": Image.fromarray(data.rocket()),
        "astronaut": Image.fromarray(data.astronaut()),
    }


@pytest.fixture(scope="session")
def tiny_vocab():
    return Vocabulary(["<PAD>", "<START>", "<END>", "<UNK>"] + WORDS)


@pytest.fixture(scope="session")
def tiny_model(tiny_vocab):
    """A small untrained captioning model on the real pretrained encoder."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(tiny_vocab), embed_dim=32, hidden_dim=32, dropout=0.0)
    return CaptionModel(config).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tiny_vocab):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, tiny_model, tiny_vocab, {"name": "tiny-test"})
    return path


@pytest.fixture
def image_folder(tmp_path, photos):
    """Two good JPEGs (one with an upper-case extension), a PNG, and broken files."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    photos["cat"].save(folder / "cat.jpg")
    photos["coffee"].save(folder / "coffee.JPG")
    photos["rocket"].save(folder / "rocket.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "random.png").write_bytes(np.random.default_rng(0).bytes(2000))
    good = (folder / "cat.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.txt").write_text("not an image, and not picked up by extension")
    return folder


@pytest.fixture(scope="session")
def tiny_captioner(tiny_checkpoint):
    from captioner.inference import Captioner

    return Captioner.from_pretrained(tiny_checkpoint, device="cpu")


def image_bytes(img, fmt="JPEG", **kw):
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()
