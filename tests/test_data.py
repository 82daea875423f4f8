"""Dataset readers: every layout gives the same records; bad data gives a DataError naming
the file (and line) at fault."""
import json
import logging

import pytest

from captioner.data import DataError, assign_split, detect_format, read_dataset


@pytest.fixture
def images(tmp_path):
    """An image folder; the readers only check that files exist, so they need not be photos."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("cat", "coffee", "rocket", "astronaut"):
        (folder / f"{name}.jpg").write_bytes(b"\xff\xd8 stand-in")
    return folder


def _summary(records):
    return [(r.image.name, r.split, r.captions) for r in records]


def test_flickr8k_layout_skips_missing_images(images, caplog):
    root = images.parent
    lines = [f"cat.jpg#{i}\tA cat sits .\n" for i in range(5)] + [
        "coffee.jpg#0\tA cup of coffee .\n", "\n", "rocket.jpg#0\tA rocket .\n", "rocket.jpg#1\t  \n",
        "astronaut.jpg#0\tA woman .\n",  # in no split file
        "ghost.jpg.1#0\tAn image that does not exist .\n", "ghost2.jpg#0\tNor this one .\n"]
    (root / "Flickr8k.token.txt").write_text("".join(lines))
    (root / "Flickr_8k.trainImages.txt").write_text("cat.jpg\nghost2.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("coffee.jpg\n")
    (root / "Flickr_8k.testImages.txt").write_text("rocket.jpg\n")
    assert detect_format(root) == "flickr8k"
    with caplog.at_level(logging.WARNING, logger="captioner.data"):
        records = read_dataset(root)
    assert "skipped 2 captioned images whose file is missing" in caplog.text
    assert _summary(records) == [
        ("cat.jpg", "train", ["A cat sits ."] * 5), ("coffee.jpg", "val", ["A cup of coffee ."]),
        ("rocket.jpg", "test", ["A rocket ."]), ("astronaut.jpg", "", ["A woman ."])]
    assert all(r.image.parent == images for r in records)


def test_flickr8k_original_folder_name_and_malformed_line(tmp_path, images):
    images.rename(tmp_path / "Flicker8k_Dataset")  # the name in the original zip
    (tmp_path / "Flickr8k.token.txt").write_text("cat.jpg#0\tA cat.\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("cat.jpg\n")
    records = read_dataset(tmp_path)
    assert records[0].image == tmp_path / "Flicker8k_Dataset" / "cat.jpg"
    (tmp_path / "Flickr8k.token.txt").write_text("cat.jpg#0\tok\nno tab here\n")
    with pytest.raises(DataError, match=r"Flickr8k.token.txt:2: expected"):
        read_dataset(tmp_path)


def test_karpathy_json(tmp_path, images):
    data = {"images": [
        {"filename": "cat.jpg", "split": "train", "sentences": [{"raw": "A cat."}, {"raw": " "}, {"raw": "A tabby."}]},
        {"filename": "coffee.jpg", "split": "val", "sentences": [{"raw": "Coffee."}]},
        {"filename": "rocket.jpg", "split": "restval", "sentences": [{"raw": "A rocket."}]},
        {"filename": "astronaut.jpg", "split": "test", "sentences": []},  # no caption: left out
        {"filename": "gone.jpg", "split": "test", "sentences": [{"raw": "Gone."}]},  # no file: left out
    ]}
    path = images.parent / "dataset_flickr8k.json"
    path.write_text(json.dumps(data))
    assert detect_format(path) == "karpathy" and detect_format(path.parent) == "karpathy"
    expected = [("cat.jpg", "train", ["A cat.", "A tabby."]), ("coffee.jpg", "val", ["Coffee."]),
                ("rocket.jpg", "train", ["A rocket."])]
    assert _summary(read_dataset(path)) == expected  # images/ beside the json is the default root
    assert _summary(read_dataset(path.parent)) == expected
    path.write_text(json.dumps({"images": [{"split": "train", "sentences": []}]}))
    with pytest.raises(DataError, match=r"dataset_flickr8k.json: images\[0\] lacks 'filename'"):
        read_dataset(path)
    path.write_text(json.dumps({"images": [{"filename": "cat.jpg", "split": "holdout", "sentences": []}]}))
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        read_dataset(path)


def test_coco_json_with_image_root(tmp_path, images):
    data = {"images": [{"id": 1, "file_name": "cat.jpg"}, {"id": 2, "file_name": "astronaut.jpg"}],
            "annotations": [{"image_id": 1, "caption": "A cat."}, {"image_id": 2, "caption": "A woman."},
                            {"image_id": 1, "caption": "A cat on a chair."}, {"image_id": 2, "caption": " "}]}
    path = tmp_path / "annotations" / "captions_train2014.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    assert detect_format(path) == "coco"
    records = read_dataset(path, images=images)
    assert [(name, caps) for name, _, caps in _summary(records)] == [
        ("cat.jpg", ["A cat.", "A cat on a chair."]), ("astronaut.jpg", ["A woman."])]
    assert sorted(r.split for r in records) == ["train", "val"]  # split within the file, not by its name
    # Karpathy's split file, by image file name (restval is train; unlisted images are left out)
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "cat.jpg", "split": "restval"},
                                               {"filename": "astronaut.jpg", "split": "test"}]}))
    assert [(n, s) for n, s, _ in _summary(read_dataset(path, images=images, split_file=karpathy))] == [
        ("cat.jpg", "train"), ("astronaut.jpg", "test")]
    listing = tmp_path / "val.txt"
    listing.write_text("cat.jpg\n")
    assert [(n, s) for n, s, _ in _summary(read_dataset(path, images=images, split_file=listing))] == [
        ("cat.jpg", "val"), ("astronaut.jpg", "train")]
    with pytest.raises(DataError, match="none of the .* captioned images is there.*--images"):  # no root: not found
        read_dataset(path)
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(DataError, match=r"captions_train2014.json: not COCO captions layout \(missing 'file_name'\)"):
        read_dataset(path, images=images)


def test_csv_several_rows_per_image_and_seeded_split(tmp_path, images):
    names = ["cat", "coffee", "rocket", "astronaut"]
    rows = ["image,caption"] + [f"{n}.jpg,\"caption {i}, of {n}\"" for i in range(3) for n in names]
    path = images / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    assert detect_format(path) == "csv"
    records = read_dataset(path, val_fraction=0.25)
    assert [r.image.name for r in records] == [f"{n}.jpg" for n in names]  # first-seen order
    assert records[0].captions == ["caption 0, of cat", "caption 1, of cat", "caption 2, of cat"]
    assert {r.split for r in records} == {"train", "val"}
    again = read_dataset(path, val_fraction=0.25)
    assert [r.split for r in again] == [r.split for r in records]
    # The same CSV with a split column keeps it; "dev" means val.
    rows = ["image,caption,split"] + [f"{n}.jpg,a {n},{'dev' if n == 'cat' else 'train'}" for n in names]
    path.write_text("\n".join(rows) + "\n")
    assert [r.split for r in read_dataset(path)] == ["val", "train", "train", "train"]


def test_split_is_stable_and_by_image(tmp_path):
    def write(n):
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": f"picture {i} version {v}"}) + "\n"
                                for v in range(2) for i in range(n)))
        return {r.image.name: r.split for r in read_dataset(path, val_fraction=0.1)}
    for i in range(201):
        (tmp_path / f"{i}.jpg").write_bytes(b"x")
    split = write(200)
    assert len(split) == 200 and 10 <= list(split.values()).count("val") <= 30  # about a tenth, by image
    assert write(200) == split  # the same every time: training, --resume and evaluate agree
    grown = write(201)  # adding a photo moves no other photo
    assert {k: v for k, v in grown.items() if k != "200.jpg"} == split
    write(200)
    half = read_dataset(tmp_path / "data.jsonl", val_fraction=0.5)
    assert 70 <= sum(r.split == "val" for r in half) <= 130
    from captioner.data import Record
    assert [r.split for r in assign_split([Record(tmp_path / "0.jpg")])] == ["train"]  # one image: no val
    two = assign_split([Record(tmp_path / "0.jpg"), Record(tmp_path / "1.jpg")], val_fraction=0.01)
    assert sorted(r.split for r in two) == ["train", "val"]  # at least one val image
    two = assign_split([Record(tmp_path / "0.jpg"), Record(tmp_path / "1.jpg")], val_fraction=0.99)
    assert sorted(r.split for r in two) == ["train", "val"]  # and at least one train image


def test_csv_errors_name_file_and_line(images):
    path = images / "bad.csv"
    cases = {
        "file,text\ncat.jpg,a cat\n": r"bad.csv:1: missing column\(s\) caption, image",
        "image,text\ncat.jpg,a cat\n": r"bad.csv:1: missing column\(s\) caption",
        "": r"bad.csv:1: missing column",
        "image,caption\ncat.jpg,a cat\ncoffee.jpg,\n": r"bad.csv:3: empty caption for coffee.jpg",
        "image,caption\ncat.jpg,a cat\n,a thing\n": r"bad.csv:3: empty image name",
        "image,caption,split\ncat.jpg,a cat,train\ncoffee.jpg,a cup,\n": r"bad.csv: some rows have a split",
        "image,caption,split\ncat.jpg,a cat,holdout\n": r"unknown split 'holdout'",
        "image,caption\n": r"bad.csv: the dataset is empty",
        "image,caption\nmissing.jpg,a thing\n": r"bad.csv: none of the 1 captioned images is there: looked in .*; "
                                          r"give the image folder with --images",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_dataset(path)


def test_jsonl_and_its_errors(images):
    path = images / "data.jsonl"
    path.write_text('{"image": "cat.jpg", "caption": "a cat", "split": "train"}\n\n'
                    '{"image": "coffee.jpg", "caption": "a cup", "split": "test"}\n'
                    '{"image": "cat.jpg", "caption": "a tabby", "split": "train"}\n')
    assert detect_format(path) == "jsonl"
    assert _summary(read_dataset(path)) == [("cat.jpg", "train", ["a cat", "a tabby"]),
                                            ("coffee.jpg", "test", ["a cup"])]
    cases = {
        '{"image": "cat.jpg", "caption": "a cat"}\n{not json}\n': r"data.jsonl:2: not valid JSON",
        '{"image": "cat.jpg"}\n': r"data.jsonl:1: each line needs \"image\" and \"caption\"",
        '["cat.jpg", "a cat"]\n': r"data.jsonl:1: each line needs",
        '{"image": "cat.jpg", "caption": "a cat"}\n\n{"image": "coffee.jpg", "caption": ""}\n':
            r"data.jsonl:3: empty caption for coffee.jpg",
        "\n\n": r"data.jsonl: the dataset is empty",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_dataset(path)


def test_folder_of_images_with_txt(images):
    (images / "cat.txt").write_text("a cat\n\na striped cat\n")
    (images / "rocket.txt").write_text("a rocket\n")
    (images / "sub").mkdir()
    (images / "sub" / "deep.PNG").write_bytes(b"x")
    (images / "sub" / "deep.txt").write_text("a deep picture")
    assert detect_format(images) == "folder"
    records = read_dataset(images)
    assert {r.image.name: r.captions for r in records} == {
        "cat.jpg": ["a cat", "a striped cat"], "rocket.jpg": ["a rocket"], "deep.PNG": ["a deep picture"]}
    assert sorted(r.split for r in records) == ["train", "train", "val"]
    (images / "coffee.txt").write_text("\n")
    with pytest.raises(DataError, match="coffee.txt: empty caption file"):
        read_dataset(images)
    for txt in images.rglob("*.txt"):
        txt.unlink()
    with pytest.raises(DataError, match="images: the dataset is empty"):
        read_dataset(images)


def test_unknown_inputs(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        read_dataset(tmp_path / "nothing.csv")
    (tmp_path / "x.json").write_text('{"foo": 1}')
    with pytest.raises(DataError, match="x.json: JSON is neither Karpathy"):
        read_dataset(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"images": [')
    with pytest.raises(DataError, match="y.json: not valid JSON"):
        read_dataset(tmp_path / "y.json")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match="pass --format"):
        read_dataset(tmp_path / "x.xml")
    with pytest.raises(DataError, match="unknown dataset format 'xml'"):
        read_dataset(tmp_path / "x.xml", format="xml")
