import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from captioner.checkpoint import save_checkpoint
from captioner.model import CaptionModel, ModelConfig
from captioner.vocab import Vocabulary

# Exported ONNX encoders go to a folder of this test session, not the user's cache (set
# before captioner is imported: backends.DEFAULT_CACHE_DIR reads it at import).
TEST_CACHE = os.environ["CAPTIONER_CACHE"] = tempfile.mkdtemp(prefix="captioner-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


WORDS = "a cat floor sits on the chair hot of coffee rocket launch pad woman in space suit".split()


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


def png_1bit(width, height, rows=None):
    """A 1-bit greyscale PNG of width x height. With `rows`, only that many rows of pixel data
    are written (a header that lies); without, the full image, all black: at 30000x30000 a
    decompression bomb that is a few hundred KB on disk."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- shared by the core tests
# (appended; the fixtures above are used by the server tests too)

# What `trained_model` learns to say about each photo of `photos`.
PHOTO_CAPTIONS = {
    "cat": "a cat sits on the floor",
    "coffee": "a hot coffee",
    "rocket": "a rocket on the launch pad",
    "astronaut": "a woman in a space suit",
}


def train_decoder(decoder, features, captions, vocab, steps=150, lr=1e-2, noise=0.0, seed=0, spatial=None):
    """Teacher-force `decoder` (a CaptionDecoder) to say captions[i] for features[i] (and
    spatial[i], for an attention decoder) with Adam; `noise` adds Gaussian jitter to the
    features so that nearby features give the same caption."""
    from captioner.vocab import PAD_ID

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(vocab.encode(c)) for c in captions],
                                             batch_first=True, padding_value=PAD_ID)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    decoder.train()
    for _ in range(steps):
        x = features + noise * torch.randn(features.shape, generator=generator) * features.std() if noise else features
        logits = decoder(x, tokens[:, :-1], None, spatial)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                                 ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return decoder.eval()


# What the `synthetic` decoder learns to say for each of its four random feature vectors.
SYNTHETIC_CAPTIONS = ["a cat sits on the chair", "a rocket on the launch pad", "a cup of coffee",
                      "two dogs play in the snow"]


@pytest.fixture(scope="session")
def synthetic():
    """(decoder, vocab, features): a decoder (hidden 64) trained on random 16-d feature
    vectors -> SYNTHETIC_CAPTIONS. Do not modify it."""
    vocab = Vocabulary.build(SYNTHETIC_CAPTIONS, min_count=1)
    features = torch.randn(len(SYNTHETIC_CAPTIONS), 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(vocab), feature_dim=16, embed_dim=32, hidden_dim=64, dropout=0.0)
    from captioner.model import CaptionDecoder

    decoder = train_decoder(CaptionDecoder(config), features, SYNTHETIC_CAPTIONS, vocab, steps=150)
    return decoder, vocab, features


def sequence_log_prob(decoder, feature, ids):
    """Teacher-forced log-probability of <START> ids <END> under `decoder`."""
    from captioner.vocab import END_ID, START_ID

    tokens = torch.tensor([[START_ID] + ids + [END_ID]])
    with torch.no_grad():
        logp = decoder(feature.unsqueeze(0), tokens[:, :-1]).log_softmax(-1)
    return logp[0].gather(1, tokens[0, 1:].unsqueeze(1)).sum().item()


@pytest.fixture(scope="session")
def encoder():
    """The pretrained EfficientNet-Lite0, loaded once."""
    from captioner.encoder import load_encoder

    return load_encoder()


@pytest.fixture(scope="session")
def photo_features(photos, encoder):
    """Pooled encoder features (4, 1280) of `photos`, in PHOTO_CAPTIONS order."""
    from captioner.images import load_image, preprocess

    pixels = torch.stack([preprocess(load_image(photos[name])) for name in PHOTO_CAPTIONS])
    with torch.no_grad():
        return encoder(pixels)


@pytest.fixture(scope="session")
def photo_maps(photos, encoder):
    """The spatial maps (4, 49, 1280) of `photos`, in PHOTO_CAPTIONS order."""
    from captioner.images import load_image, preprocess

    pixels = torch.stack([preprocess(load_image(photos[name])) for name in PHOTO_CAPTIONS])
    with torch.no_grad():
        return encoder.forward_maps(pixels)[1]


@pytest.fixture(scope="session")
def attention_model(tiny_vocab, photo_features, photo_maps):
    """Like `trained_model`, with a soft-attention decoder that reads the photos' maps. Do
    not modify it; copy it."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(tiny_vocab), embed_dim=32, hidden_dim=64, dropout=0.0, attention=True,
                         attention_dim=32)
    model = CaptionModel(config)
    train_decoder(model.decoder, photo_features, list(PHOTO_CAPTIONS.values()), tiny_vocab, noise=0.3,
                  spatial=photo_maps)
    return model.eval()


@pytest.fixture(scope="session")
def attention_checkpoint(tmp_path_factory, attention_model, tiny_vocab):
    """`attention_model` saved as a checkpoint file (session-wide: do not modify it)."""
    path = tmp_path_factory.mktemp("attention") / "attention.safetensors"
    save_checkpoint(path, attention_model, tiny_vocab, {"name": "attention-test"})
    return path


@pytest.fixture(scope="session")
def attention_captioner(attention_checkpoint):
    from captioner.inference import Captioner

    return Captioner.from_pretrained(attention_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def trained_model(tiny_vocab, photo_features):
    """A small CaptionModel (real encoder, LSTM decoder with hidden 64) trained to give each
    skimage photo its PHOTO_CAPTIONS caption. Do not modify it; copy it."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(tiny_vocab), embed_dim=32, hidden_dim=64, dropout=0.0)
    model = CaptionModel(config)
    train_decoder(model.decoder, photo_features, list(PHOTO_CAPTIONS.values()), tiny_vocab, noise=0.3)
    return model.eval()


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, trained_model, tiny_vocab):
    """`trained_model` saved as a checkpoint file (a session-wide tmp dir: do not modify it)."""
    path = tmp_path_factory.mktemp("trained") / "trained.safetensors"
    save_checkpoint(path, trained_model, tiny_vocab, {"name": "trained-test"})
    return path


@pytest.fixture(scope="session")
def calibrated_checkpoint(tmp_path_factory, trained_model, tiny_vocab):
    """`trained_model` with a person head and a calibration (confidence = sigmoid(score + 3)),
    saved as a checkpoint file."""
    from captioner.evidence import Calibration, PersonHead

    path = tmp_path_factory.mktemp("calibrated") / "calibrated.safetensors"
    torch.manual_seed(0)
    model = CaptionModel(trained_model.config)
    model.decoder.load_state_dict(trained_model.decoder.state_dict())
    model.person_head = PersonHead(model.config.feature_dim)
    model.calibration = Calibration([1.0, 0, 0, 0, 0, 0], 3.0, fitted_on="a test")
    save_checkpoint(path, model.eval(), tiny_vocab, {"name": "calibrated-test"})
    return path


@pytest.fixture(scope="session")
def trained_captioner(trained_checkpoint):
    from captioner.inference import Captioner

    return Captioner.from_pretrained(trained_checkpoint, device="cpu")


@pytest.fixture
def photo_files(tmp_path, photos):
    """A fresh folder with the four photos saved as cat.jpg, coffee.jpg, rocket.jpg, astronaut.jpg."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, img in photos.items():
        img.save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    """A --cache-dir for training runs, shared by the session so images are encoded once."""
    return tmp_path_factory.mktemp("feature-cache")


java_missing = pytest.mark.skipif(
    not __import__("shutil").which("java") and __import__("os").environ.get("CI") != "true",
    reason="Java is not installed (make java); CI (CI=true) always runs this")
