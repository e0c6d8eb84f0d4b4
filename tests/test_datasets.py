import argparse
import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets import (CocoCaptions, CorruptImageWarning, DataError, EvalTransform, ImageFolder, ShapesDataset,
                      TarShards, TrainTransform, add_data_args, build_datasets, unpack_key)


def noise_image(width, height, seed):
    """Random pixels, so that any two different crops differ."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def save(path, image, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **kwargs)
    return str(path)


def image_bytes(image, format):
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    return parser.parse_args(list(argv))


# ---- transforms -------------------------------------------------------------------------------------


def test_unpack_key():
    assert unpack_key(5) == (5, None)
    assert unpack_key((5, 9)) == (5, 9)
    assert unpack_key(np.int64(5)) == (5, None)
    with pytest.raises(TypeError):
        unpack_key((1, 2, 3))


def test_train_crop_is_a_function_of_the_seed():
    image = noise_image(80, 64, seed=0)  # shorter side already 64: crops are slices of the original
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    transform = TrainTransform(64)
    crops = [transform(image, seed) for seed in range(10)]
    for crop in crops:
        assert crop.shape == (3, 64, 64) and crop.dtype == torch.float32
        assert any(torch.allclose(crop, pixels[:, :, left:left + 64]) for left in range(17))
    assert torch.equal(transform(image, 3), crops[3])
    assert len({tuple(c[0, 0, :4].tolist()) for c in crops}) > 1


def test_eval_crop_is_centred_and_in_range():
    image = noise_image(80, 64, seed=1)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(EvalTransform(64)(image), pixels[:, :, 8:72])
    for transform in (EvalTransform(32), TrainTransform(32)):
        out = transform(noise_image(50, 120, seed=2), 0)  # portrait, resized and cropped
        assert out.shape == (3, 32, 32)
        assert out.min() >= -1 and out.max() <= 1 and out.min() < -0.5 and out.max() > 0.5


# ---- image folder -----------------------------------------------------------------------------------


def test_folder_finds_images_recursively_in_any_case(tmp_path):
    save(tmp_path / "a.JPG", noise_image(8, 8, 0))
    save(tmp_path / "sub" / "b.png", noise_image(8, 8, 1))
    save(tmp_path / "sub" / "deeper" / "c.JpEg", noise_image(8, 8, 2), format="JPEG")
    save(tmp_path / "sub" / "d.Tiff", noise_image(8, 8, 3), format="TIFF")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "labels.json").write_text("{}")
    ds = ImageFolder(tmp_path, EvalTransform(8))
    assert len(ds) == 4
    names = [os.path.relpath(ds.describe(r), tmp_path) for r in ds.records]
    assert names == sorted(names) and "notes.txt" not in names
    assert all(ds[i]["image"].shape == (3, 8, 8) for i in range(len(ds)))


def test_folder_skips_corrupt_and_truncated_images(tmp_path):
    save(tmp_path / "0_good.png", noise_image(16, 16, 0))
    bad = tmp_path / "1_bad.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    full_jpeg = image_bytes(noise_image(64, 64, 1), "JPEG")
    truncated = tmp_path / "2_truncated.jpg"
    truncated.write_bytes(full_jpeg[: len(full_jpeg) // 2])
    good = save(tmp_path / "3_good.png", noise_image(16, 16, 3))
    ds = ImageFolder(tmp_path, EvalTransform(16))

    with pytest.warns(CorruptImageWarning) as caught:
        item = ds[1]
    messages = " ".join(str(w.message) for w in caught)
    assert str(bad) in messages and str(truncated) in messages
    assert item["index"] == 3 and item["skipped"] == 2
    assert torch.equal(item["image"], EvalTransform(16)(Image.open(good)))
    assert item["image"].abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a path already reported is not reported again
        assert ds[2]["skipped"] == 1


def test_all_corrupt_folder_raises_one_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not a png at all")
    ds = ImageFolder(tmp_path, EvalTransform(16))
    with pytest.warns(CorruptImageWarning), pytest.raises(DataError, match="unreadable images") as error:
        ds[0]
    assert "\n" not in str(error.value)


def test_empty_or_missing_folder_is_a_data_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found under"):
        ImageFolder(tmp_path, EvalTransform(16))
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", EvalTransform(16))


def test_dataloader_workers_reproduce_the_single_process_batches(tmp_path):
    for i in range(8):
        save(tmp_path / f"{i}.png", noise_image(40, 24, i))
    ds = ImageFolder(tmp_path, TrainTransform(16))
    keys = [(i, 1000 + i) for i in range(8)]  # a trainer's sampler hands out (index, seed) keys

    def batches(workers, sampler=None):
        loader = DataLoader(ds, batch_size=4, num_workers=workers, sampler=sampler)
        return [(b["image"], b["index"]) for b in loader]

    for sampler in (None, keys):
        serial, parallel = batches(0, sampler), batches(2, sampler)
        assert len(serial) == 2
        for (a, ia), (b, ib) in zip(serial, parallel):
            assert torch.equal(a, b) and torch.equal(ia, ib)
    assert not torch.equal(batches(0)[0][0], batches(0, keys)[0][0])  # the seed moved the crops


# ---- COCO -------------------------------------------------------------------------------------------


def write_coco(tmp_path):
    images = [{"id": i, "file_name": f"{i:012d}.png", "width": 20, "height": 16} for i in (3, 1, 2)]
    for image in images:
        save(tmp_path / "images" / image["file_name"], noise_image(20, 16, image["id"]))
    annotations = [
        {"id": 11, "image_id": 1, "caption": "second caption of one"},
        {"id": 10, "image_id": 1, "caption": "first caption of one "},
        {"id": 20, "image_id": 3, "caption": "only caption of three"},
    ]  # image 2 has no caption: it is left out
    path = tmp_path / "captions_train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return tmp_path / "images", path


def test_coco_gives_one_item_per_captioned_image(tmp_path):
    root, annotations = write_coco(tmp_path)
    ds = CocoCaptions(root, annotations, EvalTransform(16))
    assert len(ds) == 2
    assert ds.captions(0) == ["first caption of one", "second caption of one"]
    item = ds[0]
    assert item["caption"] == "first caption of one" and item["image"].shape == (3, 16, 16)
    assert ds[1]["caption"] == "only caption of three"
    with pytest.raises(DataError, match="is .* the image folder"):
        CocoCaptions(tmp_path, annotations, EvalTransform(16))
    with pytest.raises(DataError, match="not found"):
        CocoCaptions(root, tmp_path / "missing.json", EvalTransform(16))


# ---- tar shards -------------------------------------------------------------------------------------


def write_shard(path, samples):
    """samples: (member name, bytes) pairs, written in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_shards(directory):
    directory.mkdir(exist_ok=True)
    write_shard(directory / "shards-000000.tar", [
        ("s0.png", image_bytes(noise_image(20, 16, 0), "PNG")), ("s0.txt", b"a red circle\n"),
        ("s1.jpg", image_bytes(noise_image(20, 16, 1), "JPEG")), ("s1.txt", b"a blue square"),
        ("s1.json", b"{}"),
        ("meta.json", b"{}"),  # no image: not a sample
    ])
    write_shard(directory / "shards-000001.tar", [
        ("dir.v1/s2.png", image_bytes(noise_image(20, 16, 2), "PNG")), ("dir.v1/s2.txt", b"a cyan diamond"),
        ("s3.PNG", image_bytes(noise_image(20, 16, 3), "PNG")),  # no caption
        ("s4.jpg", b"garbage"), ("s4.txt", b"unreadable"),
    ])
    return directory


def test_tar_shards_index_every_sample(tmp_path):
    shards = write_shards(tmp_path / "shards")
    ds = TarShards(shards, EvalTransform(16))
    assert len(ds) == 5
    assert [ds[i]["caption"] for i in range(3)] == ["a red circle", "a blue square", "a cyan diamond"]
    assert ds[3]["caption"] == "" and ds[3]["image"].shape == (3, 16, 16)
    with pytest.warns(CorruptImageWarning, match="s4"):
        item = ds[4]
    assert item["index"] == 0 and item["skipped"] == 1  # wrapped around to the first sample
    reference = EvalTransform(16)(noise_image(20, 16, 0))
    assert torch.equal(ds[0]["image"], reference)


@pytest.mark.parametrize("pattern", ["shards-{000000..000001}.tar", "shards-*.tar", "shards-00000[01].tar"])
def test_tar_shard_patterns(tmp_path, pattern):
    shards = write_shards(tmp_path / "shards")
    ds = TarShards(str(shards / pattern), EvalTransform(16))
    assert len(ds) == 5 and len(ds.shard_paths) == 2


def test_tar_shard_errors(tmp_path):
    shards = write_shards(tmp_path / "shards")
    with pytest.raises(DataError, match="not found"):
        TarShards(str(shards / "shards-{000000..000002}.tar"), EvalTransform(16))
    with tarfile.open(tmp_path / "compressed.tar", "w:gz") as tar:
        tar.add(shards / "shards-000000.tar", arcname="x.png")
    with pytest.raises(DataError, match="uncompressed"):
        TarShards(str(tmp_path / "compressed.tar"), EvalTransform(16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        TarShards(tmp_path / "empty", EvalTransform(16))


# ---- build_datasets ---------------------------------------------------------------------------------


def test_build_shapes_defaults():
    train, val = build_datasets(parse(), resolution=32)
    assert isinstance(train, ShapesDataset) and isinstance(val, ShapesDataset)
    assert (train.split, len(train), val.split, len(val)) == ("unlabeled-train", 50_000, "unlabeled-val", 1_000)
    item = train[0]
    assert item["image"].shape == (3, 32, 32) and "caption" not in item


def test_build_folder_holds_out_the_same_disjoint_items(tmp_path):
    for i in range(20):
        save(tmp_path / "train" / f"{i:02d}.png", noise_image(24, 24, i))
    (tmp_path / "train" / "04.png").write_bytes(b"broken")  # just before held-out file 05
    args = parse("--dataset", "folder", "--data-path", str(tmp_path / "train"), "--val-fraction", "0.1")
    train, val = build_datasets(args, resolution=16)
    assert (len(train), len(val)) == (18, 2)
    assert set(train.records).isdisjoint(val.records) and set(train.records) | set(val.records) == set(range(20))
    assert isinstance(train.transform, TrainTransform) and isinstance(val.transform, EvalTransform)
    assert list(build_datasets(args, resolution=16)[1].records) == list(val.records)
    assert [os.path.basename(val.describe(r)) for r in val.records] == ["05.png", "15.png"]
    # Skipping the broken training file must land on the next training image, not on held-out 05.
    with pytest.warns(CorruptImageWarning):
        item = train[4]
    assert item["skipped"] == 1 and os.path.basename(train.describe(train.records[item["index"]])) == "06.png"

    val_dir = tmp_path / "val"
    save(val_dir / "x.png", noise_image(24, 24, 99))
    train, val = build_datasets(parse("--dataset", "folder", "--data-path", str(tmp_path / "train"),
                                      "--val-data-path", str(val_dir)), resolution=16)
    assert (len(train), len(val)) == (20, 1)


def test_build_coco_and_tar(tmp_path):
    root, annotations = write_coco(tmp_path)
    train, val = build_datasets(parse("--dataset", "coco", "--data-path", str(root),
                                      "--coco-annotations", str(annotations)), resolution=16)
    assert (len(train), len(val)) == (1, 1) and "caption" in train[0]
    train, val = build_datasets(parse("--dataset", "coco", "--data-path", str(root), "--coco-annotations",
                                      str(annotations), "--val-coco-annotations", str(annotations)), resolution=16)
    assert (len(train), len(val)) == (2, 2)

    shards = write_shards(tmp_path / "shards")
    train, val = build_datasets(parse("--dataset", "tar", "--data-path", str(shards / "shards-*.tar"),
                                      "--val-fraction", "0.2"), resolution=16)
    assert (len(train), len(val)) == (4, 1) and set(train.records).isdisjoint(val.records)


@pytest.mark.parametrize("argv, missing", [
    (["--dataset", "folder"], "--data-path"),
    (["--dataset", "tar"], "--data-path"),
    (["--dataset", "coco", "--data-path", "x"], "--coco-annotations"),
])
def test_build_names_the_missing_flag(argv, missing):
    with pytest.raises(DataError, match=missing):
        build_datasets(parse(*argv), resolution=16)
