"""Dataset readers: every layout gives the same records; bad data gives a clear DataError."""
import json
import logging

import pytest

from captioner.data import DataError, detect_format, read_dataset


@pytest.fixture
def images(tmp_path, photos):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, img in photos.items():
        img.save(folder / f"{name}.jpg")
    return folder


def test_flickr8k_layout(tmp_path, images, caplog):
    root = images.parent
    lines = [f"cat.jpg#{i}\tA cat sits .\n" for i in range(5)] + ["coffee.jpg#0\tA cup of coffee .\n",
             "rocket.jpg#0\tA rocket .\n", "ghost.jpg.1#0\tAn image that does not exist .\n"]
    (root / "Flickr8k.token.txt").write_text("".join(lines))
    (root / "Flickr_8k.trainImages.txt").write_text("cat.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("coffee.jpg\n")
    (root / "Flickr_8k.testImages.txt").write_text("rocket.jpg\n")
    assert detect_format(root) == "flickr8k"
    with caplog.at_level(logging.WARNING):
        records = read_dataset(root)
    assert "skipped 1 captioned images whose file is missing" in caplog.text
    by_name = {r.image.name: r for r in records}
    assert set(by_name) == {"cat.jpg", "coffee.jpg", "rocket.jpg"}
    assert by_name["cat.jpg"].captions == ["A cat sits ."] * 5
    assert [by_name[n].split for n in ("cat.jpg", "coffee.jpg", "rocket.jpg")] == ["train", "val", "test"]


def test_flickr8k_malformed_line(tmp_path, images):
    (images.parent / "Flickr8k.token.txt").write_text("cat.jpg#0\tok\nno tab here\n")
    with pytest.raises(DataError, match=r"Flickr8k.token.txt:2"):
        read_dataset(images.parent)


def test_karpathy_json(tmp_path, images):
    data = {"images": [
        {"filename": "cat.jpg", "split": "train", "sentences": [{"raw": "A cat."}, {"raw": "A tabby."}]},
        {"filename": "coffee.jpg", "split": "val", "sentences": [{"raw": "Coffee."}]},
        {"filename": "rocket.jpg", "split": "restval", "sentences": [{"raw": "A rocket."}]},
    ]}
    path = tmp_path / "dataset_test.json"
    path.write_text(json.dumps(data))
    assert detect_format(path) == "karpathy"
    records = read_dataset(path)
    assert [(r.image.name, r.split, len(r.captions)) for r in records] == \
        [("cat.jpg", "train", 2), ("coffee.jpg", "val", 1), ("rocket.jpg", "train", 1)]
    path.write_text(json.dumps({"images": [{"split": "train", "sentences": []}]}))
    with pytest.raises(DataError, match="images\\[0\\] lacks"):
        read_dataset(path)


def test_coco_json_with_image_root(tmp_path, images):
    data = {"images": [{"id": 1, "file_name": "cat.jpg"}, {"id": 2, "file_name": "astronaut.jpg"}],
            "annotations": [{"image_id": 1, "caption": "A cat."}, {"image_id": 2, "caption": "A woman."},
                            {"image_id": 1, "caption": "A cat on a chair."}]}
    path = tmp_path / "ann" / "captions_val2014.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    records = read_dataset(path, images=images)
    assert [(r.image.name, r.split, r.captions) for r in records] == [
        ("cat.jpg", "val", ["A cat.", "A cat on a chair."]), ("astronaut.jpg", "val", ["A woman."])]


def test_csv_with_random_split(tmp_path, images):
    rows = ["image,caption"] + [f"{n}.jpg,caption {i} of {n}" for n in ["cat", "coffee", "rocket", "astronaut"]
                                for i in range(2)]
    path = images / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    records = read_dataset(path, seed=1, val_fraction=0.25)
    assert len(records) == 4 and all(len(r.captions) == 2 for r in records)
    assert sorted(r.split for r in records) == ["train", "train", "train", "val"]
    again = read_dataset(path, seed=1, val_fraction=0.25)
    assert [r.split for r in again] == [r.split for r in records]  # seeded


def test_csv_errors(tmp_path, images):
    path = images / "bad.csv"
    path.write_text("file,text\ncat.jpg,a cat\n")
    with pytest.raises(DataError, match=r"bad.csv:1: missing column\(s\) caption, image"):
        read_dataset(path)
    path.write_text("image,caption\ncat.jpg,a cat\ncoffee.jpg,\n")
    with pytest.raises(DataError, match=r"bad.csv:3: empty caption"):
        read_dataset(path)
    path.write_text("image,caption\n")
    with pytest.raises(DataError, match="empty"):
        read_dataset(path)
    path.write_text("image,caption\nmissing.jpg,a thing\n")
    with pytest.raises(DataError, match="empty"):
        read_dataset(path)


def test_jsonl_and_its_errors(tmp_path, images):
    path = images / "data.jsonl"
    path.write_text('{"image": "cat.jpg", "caption": "a cat", "split": "train"}\n\n'
                    '{"image": "coffee.jpg", "caption": "a cup", "split": "test"}\n')
    assert [(r.image.name, r.split) for r in read_dataset(path)] == [("cat.jpg", "train"), ("coffee.jpg", "test")]
    path.write_text('{"image": "cat.jpg", "caption": "a cat"}\n{not json}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        read_dataset(path)
    path.write_text('{"image": "cat.jpg"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:1: each line needs"):
        read_dataset(path)


def test_folder_of_images_with_txt(tmp_path, images):
    (images / "cat.txt").write_text("a cat\n\na striped cat\n")
    (images / "rocket.txt").write_text("a rocket\n")
    records = read_dataset(images)
    assert {r.image.name: r.captions for r in records} == {"cat.jpg": ["a cat", "a striped cat"],
                                                           "rocket.jpg": ["a rocket"]}
    assert {r.split for r in records} == {"train", "val"}
    (images / "coffee.txt").write_text("\n")
    with pytest.raises(DataError, match="coffee.txt: empty caption file"):
        read_dataset(images)


def test_unknown_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_dataset(tmp_path / "nothing.csv")
    (tmp_path / "x.json").write_text('{"foo": 1}')
    with pytest.raises(DataError, match="neither Karpathy"):
        read_dataset(tmp_path / "x.json")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match="pass --format"):
        read_dataset(tmp_path / "x.xml")
