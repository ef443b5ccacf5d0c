"""Detection data: each box format to the internal form and back, bad input, augmentation consistency."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnv4.detect.data import DetectionDataset, collate_detection, detect_format, load_detection_data
from mnv4.detect.digits import make_digits_detection
from mnv4.detect.formats import DetRecord, write_coco_json, write_voc_xml, write_yolo_txt
from mnv4.detect.transforms import DetectionAugment, unletterbox
from mnv4.errors import MNv4Error

CLASSES = ["cat", "dog", "fish"]


def _records(folder: Path, n: int = 4) -> list[DetRecord]:
    """n images of different sizes with 0-3 integer boxes each (image 0 has none: a negative)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = 60 + 10 * i, 40 + 5 * i
        Image.new("RGB", (w, h), (i * 40, 90, 200)).save(folder / f"im{i}.png")
        boxes, labels = [], []
        for _ in range(i % 4):
            x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            boxes.append([x1, y1, x1 + int(rng.integers(4, w // 2)), y1 + int(rng.integers(4, h // 2))])
            labels.append(int(rng.integers(0, len(CLASSES))))
        out.append(
            DetRecord(str(folder / f"im{i}.png"), w, h, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels))
        )
    return out


def _by_name(data, split: str) -> dict[str, DetRecord]:
    return {Path(r.path).name: r for r in data.split(split)}


def _assert_same(got: dict[str, DetRecord], want: list[DetRecord], classes: list[str], atol: float = 1e-3) -> None:
    assert sorted(got) == sorted(Path(r.path).name for r in want)
    for r in want:
        g = got[Path(r.path).name]
        assert (g.width, g.height) == (r.width, r.height)
        np.testing.assert_allclose(g.boxes, r.boxes, atol=atol)
        assert [classes[i] for i in g.labels] == [CLASSES[i] for i in r.labels]


def _write_yolo(root: Path, train: list[DetRecord], val: list[DetRecord], names=CLASSES) -> None:
    for split, recs in (("train", train), ("valid", val)):
        for r in recs:
            write_yolo_txt(root / split / "labels" / (Path(r.path).stem + ".txt"), r)
    (root / "data.yaml").write_text(f"path: .\ntrain: train/images\nval: valid/images\nnames: {list(names)}\n")


def test_yolo_round_trip(tmp_path):
    train, val = _records(tmp_path / "train" / "images"), _records(tmp_path / "valid" / "images", 2)
    _write_yolo(tmp_path, train, val)
    data = load_detection_data(tmp_path)
    assert detect_format(tmp_path) == "yolo" and data.classes == CLASSES
    _assert_same(_by_name(data, "train"), train, data.classes)
    _assert_same(_by_name(data, "val"), val, data.classes)
    assert len(_by_name(data, "train")["im0.png"].boxes) == 0  # a negative is kept


def test_voc_round_trip(tmp_path):
    recs = _records(tmp_path / "JPEGImages", 6)
    for r in recs:
        write_voc_xml(tmp_path / "Annotations" / (Path(r.path).stem + ".xml"), r, CLASSES)
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("im0\nim1\nim2\nim3\n")
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("im4\nim5\n")
    data = load_detection_data(tmp_path, classes=CLASSES)
    assert data.format == "voc"
    _assert_same(_by_name(data, "train"), recs[:4], data.classes)
    _assert_same(_by_name(data, "val"), recs[4:], data.classes)


def test_coco_round_trip_and_category_ids(tmp_path):
    recs = _records(tmp_path / "images", 5)
    write_coco_json(tmp_path / "annotations" / "instances_train.json", recs[:3], CLASSES, root=tmp_path / "images")
    write_coco_json(tmp_path / "annotations" / "instances_val.json", recs[3:], CLASSES, root=tmp_path / "images")
    data = load_detection_data(tmp_path)
    assert data.format == "coco" and data.classes == CLASSES
    _assert_same(_by_name(data, "train"), recs[:3], data.classes)
    _assert_same(_by_name(data, "val"), recs[3:], data.classes)


def test_formats_read_by_hand_written_files(tmp_path):
    """Independent of the writers: one box in each format's own convention, read as xyxy pixels."""
    # YOLO: centre 0.5, 0.5, size 0.2 x 0.4 of a 100 x 50 image = [40, 15, 60, 35]; ids map through `names`
    (tmp_path / "y" / "images").mkdir(parents=True)
    Image.new("RGB", (100, 50)).save(tmp_path / "y" / "images" / "a.jpg")
    (tmp_path / "y" / "labels").mkdir()
    (tmp_path / "y" / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n")
    (tmp_path / "y" / "data.yaml").write_text("train: images\nval: images\nnames: {0: a, 1: b}\n")
    r = load_detection_data(tmp_path / "y").split("val")[0]
    np.testing.assert_allclose(r.boxes, [[40, 15, 60, 35]], atol=1e-4)
    assert r.labels.tolist() == [1]
    # COCO: bbox is x, y, w, h; category ids need not start at 0 or be contiguous
    (tmp_path / "c" / "train").mkdir(parents=True)
    Image.new("RGB", (100, 50)).save(tmp_path / "c" / "train" / "a.jpg")
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 50}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 9, "bbox": [10, 5, 20, 30], "iscrowd": 0}],
        "categories": [{"id": 9, "name": "late"}, {"id": 3, "name": "early"}],
    }
    (tmp_path / "c" / "train" / "_annotations.coco.json").write_text(json.dumps(coco))
    (tmp_path / "c" / "valid").mkdir()
    (tmp_path / "c" / "valid" / "_annotations.coco.json").write_text(json.dumps(coco))
    (tmp_path / "c" / "valid" / "a.jpg").write_bytes((tmp_path / "c" / "train" / "a.jpg").read_bytes())
    data = load_detection_data(tmp_path / "c")
    assert data.classes == ["early", "late"]
    np.testing.assert_allclose(data.split("train")[0].boxes, [[10, 5, 30, 35]])
    assert data.split("val")[0].labels.tolist() == [1]


def _coco_file(path: Path, images, annotations, categories) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_coco_2017_layout_reads_instances_and_split_folders(tmp_path):
    """COCO's own download: annotations/{captions,instances,person_keypoints}_{train,val}2017.json with bare
    file names and the images in train2017/ and val2017/. The boxes come from instances_*, crowd regions
    are kept apart (for evaluation to ignore) and the annotation's own `area` is kept."""
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (64, 48)).save(tmp_path / split / "000000000001.jpg")
        images = [{"id": 1, "file_name": "000000000001.jpg", "width": 64, "height": 48}]
        anns = [
            {"id": 1, "image_id": 1, "category_id": 18, "bbox": [4, 4, 20, 10], "area": 150.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 10, 30, 30], "area": 700.0, "iscrowd": 1},
        ]
        _coco_file(tmp_path / "annotations" / f"instances_{split}.json", images, anns, cats)
        _coco_file(tmp_path / "annotations" / f"captions_{split}.json", images, [{"id": 1, "image_id": 1}], [])
        _coco_file(tmp_path / "annotations" / f"person_keypoints_{split}.json", images, [], cats[:1])
    data = load_detection_data(tmp_path, warn=False)
    assert data.format == "coco" and data.classes == ["person", "dog"]
    for split in ("train", "val"):
        (r,) = data.split(split)
        assert Path(r.path).parent.name == f"{split}2017"
        assert r.boxes.tolist() == [[4, 4, 24, 14]] and r.labels.tolist() == [1]
        assert r.areas.tolist() == [150.0]
        assert r.crowd_boxes.tolist() == [[30, 10, 60, 40]] and r.crowd_labels.tolist() == [0]
    assert data.issues.as_dict() == {"crowd_box": 2}


def test_coco_files_that_cannot_be_a_dataset_are_one_error_naming_the_file(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.jpg")
    images = [{"id": 1, "file_name": "a.jpg", "width": "sixty", "height": 20}, "not an image entry"]
    anns = [["a list"], {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    for split in ("train", "val"):
        _coco_file(tmp_path / "annotations" / f"instances_{split}.json", images, anns, [{"id": 1, "name": "x"}])
    data = load_detection_data(tmp_path, warn=False)  # a bad size is read from the file; bad entries counted
    (r,) = data.split("train")
    assert (r.width, r.height) == (20, 20) and r.boxes.tolist() == [[1, 1, 6, 6]]
    assert data.issues.as_dict() == {"malformed_label": 4}
    _coco_file(tmp_path / "annotations" / "instances_train.json", images, anns, [{"name": "no id"}])
    with pytest.raises(MNv4Error, match=r"instances_train.json: .*categories\[0\]"):
        load_detection_data(tmp_path)
    (tmp_path / "annotations" / "instances_train.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(MNv4Error, match="instances_train.json: cannot read it as COCO JSON"):
        load_detection_data(tmp_path)


def test_yolo_names_must_be_ids_without_gaps(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("2 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: {0: cat, 2: dog, 3: bird}\n")
    with pytest.raises(MNv4Error, match=r"data.yaml: `names` ids must be 0..2 without gaps"):
        load_detection_data(tmp_path)
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: {a: cat}\n")
    with pytest.raises(MNv4Error, match="keys must be class ids"):
        load_detection_data(tmp_path)


def test_label_files_that_are_not_text_drop_their_image(tmp_path):
    """A UTF-8 byte-order mark is read through; a UTF-16 file's boxes are unknown, so its image is dropped
    (a negative would teach the detector that its objects are background)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("bom", "utf16"):
        Image.new("RGB", (20, 20)).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "labels" / "bom.txt").write_bytes("0 0.5 0.5 0.5 0.5\n".encode("utf-8-sig"))
    (tmp_path / "labels" / "utf16.txt").write_bytes("0 0.5 0.5 0.5 0.5\n".encode("utf-16"))
    (tmp_path / "data.yaml").write_text("val: images\nnames: [x]\n")
    data = load_detection_data(tmp_path, warn=False)
    (r,) = data.split("val")
    assert Path(r.path).name == "bom.png" and r.boxes.tolist() == [[5, 5, 15, 15]]
    assert data.issues.as_dict() == {"unreadable_label_file": 1}


def test_exif_rotated_image_gets_the_viewer_size(tmp_path):
    """A phone photo stored 100 x 50 with EXIF orientation 6 is seen (and normalised) as 50 x 100."""
    (tmp_path / "images").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (100, 50)).save(tmp_path / "images" / "p.jpg", exif=exif)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "p.txt").write_text("0 0.5 0.5 1.0 1.0\n")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [x]\n")
    r = load_detection_data(tmp_path).split("val")[0]
    assert (r.width, r.height) == (50, 100)
    np.testing.assert_allclose(r.boxes, [[0, 0, 50, 100]])


def test_bad_input_is_fixed_or_counted(tmp_path):
    """Class id out of range, inverted, degenerate, outside and partly-outside boxes, a malformed line,
    a missing label file, an image without boxes and an unreadable image: counted, never a crash."""
    root = tmp_path
    (root / "images").mkdir()
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (100, 100)).save(root / "images" / f"{name}.png")
    (root / "images" / "broken.png").write_bytes(b"not an image")
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text(
        "7 0.5 0.5 0.1 0.1\n"  # class id out of range (2 classes)
        "0 0.5 0.5 0.0 0.2\n"  # degenerate: zero width
        "0 1.5 1.5 0.2 0.2\n"  # wholly outside
        "1 0.95 0.5 0.2 0.2\n"  # partly outside: clipped to [85, 40, 100, 60]
        "x y z\n"  # malformed
        "0 0.5 0.5 0.2 0.2\n"  # fine
    )
    (root / "labels" / "b.txt").write_text("")  # an image without boxes: a valid negative
    (root / "labels" / "broken.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    # c and d have no label file: negatives, counted
    (root / "data.yaml").write_text("val: images\nnames: [p, q]\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_detection_data(root)
    assert data.issues.as_dict() == {
        "class_out_of_range": 1,
        "clipped_box": 1,
        "degenerate_box": 1,
        "malformed_label": 1,
        "missing_label_file": 2,
        "outside_box": 1,
        "unreadable_image": 1,
    }
    assert len(caught) == 1 and "1 boxes clipped" in str(caught[0].message)
    recs = _by_name(data, "val")
    assert sorted(recs) == ["a.png", "b.png", "c.png", "d.png"]
    np.testing.assert_allclose(recs["a.png"].boxes, [[85, 40, 100, 60], [40, 40, 60, 60]], atol=1e-4)
    assert recs["a.png"].labels.tolist() == [1, 0]


def test_voc_inverted_and_unknown_class(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    Image.new("RGB", (50, 50)).save(tmp_path / "JPEGImages" / "x.jpg")
    (tmp_path / "Annotations").mkdir()
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>1</ymin><xmax>{b}</xmax><ymax>20</ymax></bndbox></object>"
        for n, a, b in (("cat", 30, 10), ("cow", 1, 20), ("dog", 2, 22))
    )
    (tmp_path / "Annotations" / "x.xml").write_text(f"<annotation><filename>x.jpg</filename>{objs}</annotation>")
    (tmp_path / "Annotations" / "y.xml").write_text("<annotation><filename>y.jpg</filename>")  # broken XML
    Image.new("RGB", (50, 50)).save(tmp_path / "JPEGImages" / "y.jpg")  # its boxes are unknown: no negative
    (tmp_path / "Annotations" / "z.xml").write_text("<annotation><filename>z.jpg</filename></annotation>")
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("x\ny\nz\n")
    data = load_detection_data(tmp_path, classes=["dog", "cat"], warn=False)
    assert [Path(r.path).name for r in data.split("val")] == ["x.jpg"]
    issues = data.issues.as_dict()
    assert issues["inverted_box"] == 1 and issues["unknown_class"] == 1
    assert issues["unreadable_label_file"] == 1 and issues["missing_image"] == 1
    r = data.split("val")[0]
    assert r.labels.tolist() == [0] and r.boxes.tolist() == [[2, 1, 22, 20]]


def test_not_a_dataset_is_one_error(tmp_path):
    with pytest.raises(MNv4Error, match="not a detection dataset"):
        load_detection_data(tmp_path)
    with pytest.raises(MNv4Error, match="no such folder"):
        load_detection_data(tmp_path / "missing")
    (tmp_path / "data.yaml").write_text("train: nowhere\nnames: [a]\n")
    with pytest.raises(MNv4Error, match="nowhere"):
        load_detection_data(tmp_path)


def test_unreadable_image_at_load_time_is_dropped_by_collate(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    recs = [
        DetRecord(str(tmp_path / "ok.png"), 40, 40, np.array([[1, 1, 20, 20]], np.float32), np.array([0])),
        DetRecord(str(tmp_path / "bad.png"), 40, 40, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
    ]
    ds = DetectionDataset(recs, DetectionAugment(32))
    images, targets, bad = collate_detection([ds[0], ds[1]])
    assert images.shape == (1, 3, 32, 32) and len(targets) == 1 and bad[0].path.endswith("bad.png")


# ---------------------------------------------------------------------------------------------- augmentation
def _scene(w: int = 120, h: int = 80, rect: tuple[int, int, int, int] = (30, 20, 70, 50)):
    """Blue image with a red rectangle at ``rect`` (xyxy), and that box."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[2] = 255
    x1, y1, x2, y2 = rect
    img[:, y1:y2, x1:x2] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
    return img, torch.tensor([[float(v) for v in rect]])


def test_flip_twice_is_the_identity():
    img, box = _scene(96, 96)
    flip = DetectionAugment(96, train=True, hflip=1.0, scale_jitter=(1.0, 1.0))
    x1, b1, _, _ = flip(img, box, torch.tensor([0]))
    assert torch.allclose(b1, torch.tensor([[96 - 70.0, 20, 96 - 30.0, 50]]))
    x2, b2, _, _ = flip((x1 * 255).round().byte(), b1, torch.tensor([0]))
    assert torch.allclose(b2, box) and torch.equal((x2 * 255).round().byte(), img)


def test_crops_keep_boxes_on_their_objects():
    """Over many seeds of flip + scale jitter + crop: every box stays inside the canvas and on the red
    rectangle (red inside, none outside), and boxes leaving the crop are clipped or dropped."""
    img, box = _scene(200, 100, (10, 10, 40, 35))
    aug = DetectionAugment(64, train=True, hflip=0.5, scale_jitter=(0.5, 4.0))
    dropped = clipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, b, lab, _ = aug(img, box, torch.tensor([2]))
        red = (x[0] > 0.5) & (x[2] < 0.5)
        assert len(b) == len(lab)
        if len(b) == 0:
            dropped += 1
            assert red.float().mean() < 0.02  # dropped only when (almost) nothing of it is left
            continue
        x1, y1, x2, y2 = b[0].tolist()
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and lab.tolist() == [2]
        clipped += int(min(x1, y1) <= 0 or max(x2, y2) >= 64)
        inside = red[int(y1) + 1 : int(y2) - 1, int(x1) + 1 : int(x2) - 1]
        if inside.numel():  # (a sliver clipped at the border has no interior)
            assert inside.float().mean() > 0.9
        outside = red.clone()
        outside[max(int(y1) - 1, 0) : int(y2) + 2, max(int(x1) - 1, 0) : int(x2) + 2] = False
        assert outside.sum() == 0
    assert dropped > 0 and clipped > 0


def test_letterbox_round_trips_to_original_pixels():
    img, box = _scene(120, 80)
    x, b, _, lb = DetectionAugment(60)(img, box, torch.tensor([0]))
    assert x.shape == (3, 60, 60) and lb[1:] == (0.0, 10.0, 120, 80)
    assert torch.allclose(b, torch.tensor([[15.0, 20.0, 35.0, 35.0]]))
    assert torch.allclose(unletterbox(b, lb), box, atol=1e-4)
    x, b, _, lb = DetectionAugment(60, mode="fixed")(img, box, torch.tensor([0]))
    assert torch.allclose(unletterbox(b, lb), box, atol=1e-4)


def test_randaugment_leaves_boxes_alone():
    img, box = _scene()
    aug = DetectionAugment(64, train=True, hflip=0.0, scale_jitter=(1.0, 1.0), randaug_prob=1.0, randaug_magnitude=9)
    plain = DetectionAugment(64)
    torch.manual_seed(0)
    x, b, _, _ = aug(img, box, torch.tensor([0]))
    x0, b0, _, _ = plain(img, box, torch.tensor([0]))
    assert torch.equal(b, b0) and not torch.equal(x, x0)


def test_dataset_is_seeded_per_epoch_and_sample(tmp_path):
    recs = _records(tmp_path, 4)
    ds = DetectionDataset(recs, DetectionAugment(32, train=True, randaug_prob=0.5), seed=3)
    a, b = ds[(1, 3)], ds[(1, 3)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert not torch.equal(ds[(2, 3)][0], a[0])


def test_digits_set_is_deterministic(tmp_path):
    a = make_digits_detection(tmp_path / "a", seed=1, num_train=6, num_val=3, canvas=64)
    b = make_digits_detection(tmp_path / "b", seed=1, num_train=6, num_val=3, canvas=64)
    labels = sorted((a / "train" / "labels").glob("*.txt"))
    assert len(labels) == 6
    assert all(p.read_text() == (b / "train" / "labels" / p.name).read_text() for p in labels)
    data = load_detection_data(a)
    recs = data.split("train") + data.split("val")
    assert sum(len(r.boxes) for r in recs) >= len(recs) and all(r.labels.max() <= 9 for r in recs)
    # the box is the ink: the darkest pixel of each canvas lies inside one of its boxes
    for r in recs:
        g = np.asarray(Image.open(r.path).convert("L"))
        y, x = np.unravel_index(np.argmin(g), g.shape)
        assert any(x1 <= x < x2 and y1 <= y < y2 for x1, y1, x2, y2 in r.boxes)
