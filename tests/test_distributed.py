"""Multi-process training as users run it: `torchrun --nproc_per_node 2 -m captioner train`,
two CPU processes over gloo, against one process with the same global batch."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import ImageOps
from safetensors.torch import load_file

TIMING = {"train_time_s", "captions_per_s", "epoch_time_s"}
CAPTIONS = {
    "cat": "a cat sits on a chair", "coffee": "a cup of coffee on a table",
    "rocket": "a rocket on the launch pad", "astronaut": "a woman in a space suit",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos):
    """8 images (the photos and their mirror images), 2 of them validation, 2 captions each:
    12 training captions, an even number, so no process's share is padded."""
    folder = tmp_path_factory.mktemp("ddp-data")
    rows = ["image,caption,split"]
    for name, img in photos.items():
        for variant, picture in (("", img), ("-mirror", ImageOps.mirror(img))):
            picture.save(folder / f"{name}{variant}.jpg")
            split = "val" if name == "astronaut" else "train"
            rows += [f"{name}{variant}.jpg,{CAPTIONS[name]},{split}",
                     f"{name}{variant}.jpg,{CAPTIONS[name].replace(' a ', ' the ')},{split}"]
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def run_training(processes, dataset, out, cache, *extra):
    flags = ["train", "--from-scratch", "--data", dataset, "--out", out, "--cache-dir", cache, "--embed-dim", 32,
             "--hidden-dim", 32,
             "--min-word-count", 1, "--workers", 0, "--lr", 5e-3, "--dropout", 0, "--device", "cpu",
             "--lr-decay-epochs", 3, *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "-m", "captioner"] if processes > 1 else [sys.executable, "-m", "captioner"]
    result = subprocess.run(launcher + [str(f) for f in flags], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rows(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_the_model_one_process_trains_and_resume(tmp_path, dataset, feature_cache):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run_training(1, dataset, one, feature_cache, "--epochs", 3, "--batch-size", 4)
    result = run_training(2, dataset, two, feature_cache, "--epochs", 3, "--batch-size", 2)
    assert "2 processes" in result.stderr  # process 0 logs; the other one stays quiet
    assert result.stderr.count("vocabulary of") == 1
    assert result.stdout.count("best val CIDEr") == 1

    # The same global batch of 4: the same loss curve and nearly the same weights. Not
    # exactly: each process averages the loss over its own captions' words.
    a, b = rows(one), rows(two)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    assert [r["captions"] for r in b] == [r["captions"] for r in a] == [12] * 3
    for x, y in zip(a, b, strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=0.005)
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=0.005)
    wa, wb = load_file(str(one / "last.safetensors")), load_file(str(two / "last.safetensors"))
    for k in wa:  # measured: 0.1% to 18% of each tensor's norm (Adam magnifies small differences; the
        # most, 18%, in decoder.init_h.bias, a small tensor that the attention decoder barely moves)
        assert (wa[k] - wb[k]).norm() <= 0.25 * wa[k].norm(), k
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # two runs that really were different

    # Every process resumes from process 0's state: stopping after epoch 1 changes nothing.
    run_training(2, dataset, resumed, feature_cache, "--epochs", 1, "--batch-size", 2)
    run_training(2, dataset, resumed, feature_cache, "--epochs", 3, "--resume")
    assert rows(resumed) == b
    wr = load_file(str(resumed / "last.safetensors"))
    for k in wb:
        assert torch.equal(wr[k], wb[k]), k
