"""Tests for pibconv_tf.data: sources, splits, pipelines, augmentation and bad input."""

import json
import logging
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from pibconv_tf import data
from pibconv_tf.errors import UserInputError


def _id_source(num_train=40, num_test=10, size=8, horizontal_flip=True):
    """Random images whose first two pixel values encode their index in the split."""
    rng = np.random.default_rng(0)

    def split(n, offset):
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        return images, (np.arange(n) + offset) % 3

    return data.array_source(
        "ids", split(num_train, 0), split(num_test, 1), ["a", "b", "c"], horizontal_flip
    )


def _ids(normalized, info):
    pixels = np.round(data.denormalize(normalized, info).numpy() * 255.0).astype(int)
    return pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 0, 1]


@pytest.fixture(scope="module")
def digits():
    return data.load_source("digits", seed=0)


@pytest.fixture
def mock_tfds():
    with (
        tfds.testing.mock_data(num_examples=12),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        yield


def test_tfds_cifar10_uses_darts_constants(mock_tfds, tmp_path):
    source = data.load_source("cifar10", data_dir=str(tmp_path))
    info = source.info
    expected_names = tfds.builder("cifar10").info.features["label"].names
    assert info.class_names == tuple(expected_names) and info.num_classes == 10
    assert (info.num_train, info.num_test, info.image_size) == (12, 12, 32)
    assert info.mean == data.CIFAR10_MEAN and info.std == data.CIFAR10_STD
    assert info.horizontal_flip
    x, y = next(iter(source.split("train")))
    assert x.dtype == tf.uint8 and x.shape == (32, 32, 3) and y.dtype == tf.int32
    images, labels = source.numpy("test")
    batches = list(data.eval_pipeline(source, 5))
    assert [len(b[1]) for b in batches] == [5, 5, 2]
    expected = (images / 255.0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
    np.testing.assert_allclose(np.concatenate([b[0] for b in batches]), expected, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)


def test_pipelines_over_a_tfds_source(mock_tfds):
    source = data.load_source("cifar10", seed=0)
    search, steps = data.search_pipeline(source, 3, train_portion=0.5, seed=0)
    batches = list(search)
    assert steps == len(batches) == 2
    assert batches[0][0][0].shape == batches[0][1][0].shape == (3, 32, 32, 3)
    weights, _ = data.search_split_indices(12, 0.5, seed=0)
    subset_images, _ = next(iter(source.subset("train", weights).batch(12)))
    np.testing.assert_array_equal(subset_images, source.numpy("train")[0][weights])
    (x, y), *rest = list(data.train_pipeline(source, 4, seed=0))
    assert len(rest) == 2 and x.shape == (4, 32, 32, 3) and x.dtype == tf.float32


def test_tfds_grayscale_is_resized_to_rgb_with_own_statistics(mock_tfds):
    source = data.load_source("mnist", image_size=16)
    images, _ = source.numpy("train")
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    np.testing.assert_allclose(source.info.mean, images.mean(axis=(0, 1, 2)) / 255.0, atol=1e-6)
    assert not source.info.horizontal_flip


def test_tfds_not_prepared_fails_fast_without_download(tmp_path):
    with pytest.raises(UserInputError, match=r"'cifar10' is not prepared.*--data_dir.*digits"):
        data.load_source("cifar10", data_dir=str(tmp_path / "empty"))


@pytest.mark.parametrize("name", ["cifar1O", "cifra10"])
def test_unknown_dataset_name_suggests_close_match(name):
    with pytest.raises(UserInputError, match=rf"'{name}'.*did you mean cifar10.*folder:PATH"):
        data.load_source(name)


def test_digits_shapes_range_and_classes(digits):
    info = digits.info
    assert info.class_names == tuple(str(d) for d in range(10))
    assert (info.num_train, info.num_test) == (1437, 360) and not info.horizontal_flip
    for split, n in (("train", 1437), ("test", 360)):
        images, labels = digits.numpy(split)
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert images.min() == 0 and images.max() == 255
        np.testing.assert_array_equal(images[..., 0], images[..., 1])
        counts = np.bincount(labels, minlength=10)
        share = 0.8 if split == "train" else 0.2
        expected = share * np.bincount(np.concatenate([digits.numpy(s)[1] for s in data.SPLITS]))
        assert np.all(np.abs(counts - expected) <= 1), counts
    images, labels = digits.numpy("train", limit=7)
    assert images.shape == (7, 32, 32, 3) and labels.dtype == np.int32


def test_flip_flag_can_be_overridden():
    assert data.load_source("digits", horizontal_flip=True).info.horizontal_flip


def test_digits_split_is_seeded(digits):
    same = data.load_source("digits", seed=0)
    other = data.load_source("digits", seed=1)
    np.testing.assert_array_equal(same.numpy("test")[0], digits.numpy("test")[0])
    assert not np.array_equal(other.numpy("test")[0], digits.numpy("test")[0])


def _write(path, size, color, mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


def test_folder_with_train_and_test_and_an_unreadable_file(tmp_path, caplog):
    for split in data.SPLITS:
        _write(tmp_path / split / "red" / "a.png", (10, 14), (255, 0, 0))
        _write(tmp_path / split / "red" / "b.jpg", (40, 30), (255, 0, 0))
        _write(tmp_path / split / "blue" / "a.bmp", (33, 33), (0, 0, 255))
        _write(tmp_path / split / "blue" / "b.gif", (9, 20), (0, 0, 255))
    (tmp_path / "train" / "blue" / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        source = data.load_source(f"folder:{tmp_path}", image_size=16)
    assert "Skipped 1 unreadable" in caplog.text
    assert source.skipped == (str(tmp_path / "train" / "blue" / "broken.png"),)
    assert source.info.class_names == ("blue", "red")
    assert (source.info.num_train, source.info.num_test) == (4, 4)
    images, labels = source.numpy("train")
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    colours = np.round(images.mean(axis=(1, 2))).astype(int)
    expected = np.array([[0, 0, 255], [255, 0, 0]])[labels]
    assert np.all(np.abs(colours - expected) <= 2), (colours, labels)


def test_folder_of_classes_is_split_per_class_by_seed(tmp_path):
    for cls, shade in (("dark", 30), ("light", 220)):
        for i in range(5):
            _write(tmp_path / cls / f"{i}.png", (8 + i, 12), shade + i, mode="L")
    name = f"folder:{tmp_path}"
    source = data.load_source(name, image_size=8, seed=3, test_fraction=0.2)
    images, labels = source.numpy("test")
    assert images.shape == (2, 8, 8, 3) and sorted(labels) == [0, 1]
    assert np.array_equal(images, data.load_source(name, image_size=8, seed=3).numpy("test")[0])
    tests = {
        data.load_source(name, image_size=8, seed=s).numpy("test")[0].tobytes() for s in range(6)
    }
    assert len(tests) > 1
    np.testing.assert_array_equal(images[..., 0], images[..., 1])


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(UserInputError, match="is not a directory"):
        data.load_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(UserInputError, match="has no class sub-folders"):
        data.load_source(f"folder:{tmp_path}")
    _write(tmp_path / "cat" / "a.png", (8, 8), (1, 2, 3))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "a.png").write_bytes(b"garbage")
    with pytest.raises(UserInputError, match=r"'[^']*dog'\] contain no readable image"):
        data.load_source(f"folder:{tmp_path}")


def test_search_split_is_disjoint_and_covers_train():
    weights, arch = data.search_split_indices(101, 0.5, seed=0)
    assert (len(weights), len(arch)) == (50, 51) and not set(weights) & set(arch)
    np.testing.assert_array_equal(np.sort(np.concatenate([weights, arch])), np.arange(101))
    assert not np.array_equal(weights, data.search_split_indices(101, 0.5, seed=1)[0])


def test_search_pipeline_draws_each_part_from_its_indices():
    source = _id_source(num_train=40)
    ds, steps = data.search_pipeline(source, 4, train_portion=0.5, seed=0)
    weights, arch = data.search_split_indices(40, 0.5, seed=0)
    epochs = [list(ds), list(ds)]
    assert steps == 5 and all(len(e) == 5 for e in epochs)
    (x, y), (xv, yv) = epochs[0][0]
    assert x.shape == xv.shape == (4, 8, 8, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    seen = [np.concatenate([_ids(b[k][0], source.info) for b in epochs[0]]) for k in (0, 1)]
    assert set(seen[0]) <= set(weights) and set(seen[1]) <= set(arch)
    assert len(set(seen[0])) == 20 and len(set(seen[1])) == 20
    labels = np.concatenate([b[0][1] for b in epochs[0]])
    np.testing.assert_array_equal(labels, source.numpy("train")[1][seen[0]])
    assert not np.array_equal(
        seen[0], _ids(np.concatenate([b[0][0] for b in epochs[1]]), source.info)
    )


def test_train_pipeline_is_seeded_reshuffled_and_augmented():
    source = _id_source(num_train=40, size=16)
    ds = data.train_pipeline(source, 8, cutout_length=4, seed=5)
    first, second = list(ds), list(ds)
    again = list(data.train_pipeline(source, 8, cutout_length=4, seed=5))
    assert len(first) == 5 and first[0][0].shape == (8, 16, 16, 3)
    assert first[0][0].dtype == tf.float32 and first[0][1].dtype == tf.int32
    np.testing.assert_array_equal(first[0][0], again[0][0])
    assert not np.array_equal(first[0][0], second[0][0])
    plain = list(data.train_pipeline(source, 8, augment=False, seed=5))
    assert not np.allclose(first[0][0], plain[0][0])
    np.testing.assert_array_equal(first[0][1], plain[0][1])


def test_train_epochs_resumed_anywhere_read_what_the_whole_run_reads():
    source = _id_source(num_train=40, size=16)

    def batches(first, skip, global_seed):
        tf.random.set_seed(global_seed)  # what keras.utils.set_random_seed does in the apps
        ds = data.train_epochs(source, 8, first, 3, skip=skip, cutout_length=4, seed=5)
        return [x.numpy() for x, _ in ds]

    whole = batches(0, 0, 0)
    assert len(whole) == 15  # 3 epochs of 5 batches
    resumed = batches(1, 2, 7)  # epoch 2 from its third batch, another global seed
    assert len(resumed) == 8
    for a, b in zip(whole[7:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each epoch is a new order (every id once) and new augmentation draws.
    plain = data.train_epochs(source, 8, 0, 3, augment=False, seed=5)
    ids = np.concatenate([_ids(x, source.info) for x, _ in plain]).reshape(3, 40)
    for e in range(3):
        np.testing.assert_array_equal(np.sort(ids[e]), np.arange(40))
    assert not np.array_equal(ids[0], ids[1])
    assert not np.array_equal(whole[0], whole[5])
    assert len(batches(3, 0, 0)) == 0  # a finished run reads nothing


def test_randaugment_from_keras_cv_changes_images_before_the_darts_transform():
    source = _id_source(num_train=16, size=16)
    darts = list(data.train_pipeline(source, 8, cutout_length=0, crop_padding=0, seed=3))
    strong = list(
        data.train_pipeline(source, 8, cutout_length=0, crop_padding=0, seed=3, randaugment=0.9)
    )
    assert strong[0][0].shape == darts[0][0].shape and strong[0][0].dtype == tf.float32
    np.testing.assert_array_equal(strong[0][1], darts[0][1])  # the same order and labels
    assert not np.allclose(strong[0][0], darts[0][0])  # the images changed
    # Still pixels of 0..255 before normalisation.
    low, high = (data.normalize(tf.fill((1, 1, 1, 3), v), source.info) for v in (0.0, 255.0))
    x = strong[0][0].numpy()
    assert np.all(x >= low.numpy() - 1e-5) and np.all(x <= high.numpy() + 1e-5)


def test_cutout_is_applied_after_normalisation():
    source = _id_source(num_train=16, size=16)
    (x, _), *_ = list(data.train_pipeline(source, 16, cutout_length=8, seed=0))
    zeros = np.sum(np.all(x.numpy() == 0.0, axis=-1), axis=(1, 2))
    assert np.all(zeros >= 16) and np.all(zeros <= 64), zeros


def test_random_crop_is_a_shift_with_zero_padding():
    images = tf.random.uniform((6, 8, 8, 3), 1, 256, tf.int32, seed=1)
    out = data.random_crop_flip(images, 2, tf.constant([1, 2]), flip=False).numpy()
    padded = np.pad(images.numpy(), [(0, 0), (2, 2), (2, 2), (0, 0)])
    for i in range(6):
        shifts = [(r, c) for r in range(5) for c in range(5)]
        assert any(np.array_equal(out[i], padded[i, r : r + 8, c : c + 8]) for r, c in shifts)


@pytest.mark.parametrize("flip", [False, True])
def test_flip_only_when_the_dataset_allows_it(flip):
    source = _id_source(num_train=32, size=8, horizontal_flip=flip)
    x, _ = next(iter(data.train_pipeline(source, 32, cutout_length=0, crop_padding=0)))
    ids = _ids(x, source.info)  # a mirrored image moves its id pixel, so decode both ways
    mirrored = ~np.isin(ids, np.arange(32))
    images = source.numpy("train")[0]
    expected = data.normalize(images, source.info).numpy()
    for i, out in enumerate(x.numpy()):
        match = [j for j in range(32) if np.allclose(out, expected[j], atol=1e-5)]
        mirror = [j for j in range(32) if np.allclose(out, expected[j][:, ::-1], atol=1e-5)]
        assert match or mirror, i
        assert bool(mirror and not match) == bool(mirrored[i])
    assert mirrored.any() == flip


def _darts_cutout(image, row, col, length):
    """DARTS' cnn/utils.py Cutout with a given centre, on an [H, W, C] array."""
    h, w = image.shape[:2]
    y1, y2 = np.clip(row - length // 2, 0, h), np.clip(row + length // 2, 0, h)
    x1, x2 = np.clip(col - length // 2, 0, w), np.clip(col + length // 2, 0, w)
    out = image.copy()
    out[y1:y2, x1:x2] = 0
    return out


def test_cutout_at_zeroes_exactly_the_darts_square():
    images = tf.ones((3, 32, 32, 3))
    out = data.cutout_at(images, tf.constant([[10, 12], [0, 0], [31, 5]]), 16).numpy()
    assert np.all(out[0, 2:18, 4:20] == 0) and np.sum(out[0] == 0) == 16 * 16 * 3
    assert np.sum(out[1] == 0) == 8 * 8 * 3 and np.all(out[1, :8, :8] == 0)
    for i, (r, c) in enumerate([(10, 12), (0, 0), (31, 5)]):
        np.testing.assert_array_equal(out[i], _darts_cutout(np.ones((32, 32, 3)), r, c, 16))


def test_random_cutout_zeroes_one_clipped_square():
    out = data.cutout(tf.ones((64, 16, 16, 1)), 6, tf.constant([3, 4])).numpy()[..., 0]
    for image in out:
        rows, cols = np.nonzero(image == 0)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 3 <= height <= 6 and 3 <= width <= 6 and len(rows) == height * width
    assert np.sum(out == 0) > 64 * 9  # not every square is clipped


def test_dataset_info_json_round_trip(digits):
    d = json.loads(json.dumps(digits.info.to_json_dict()))
    assert d["num_classes"] == 10
    assert data.DatasetInfo.from_json_dict(d) == digits.info


@pytest.mark.parametrize(
    "call, value",
    [
        (lambda s: data.search_pipeline(s, 4, train_portion=0.0), "0.0"),
        (lambda s: data.search_pipeline(s, 4, train_portion=1.0), "1.0"),
        (lambda s: data.search_pipeline(s, 4, train_portion=1.5), "1.5"),
        (lambda s: data.search_pipeline(s, 0), "got 0"),
        (lambda s: data.search_pipeline(s, 21), "21"),
        (lambda s: data.train_pipeline(s, -1), "-1"),
        (lambda s: data.train_pipeline(s, 41), "41"),
        (lambda s: data.train_pipeline(s, 4, cutout_length=-2), "-2"),
        (lambda s: data.train_pipeline(s, 4, crop_padding=5), "got 5"),
        (lambda s: data.train_pipeline(s, 4, randaugment=1.5), "1.5"),
        (lambda s: data.eval_pipeline(s, 4, split="val"), "'val'"),
        (lambda s: data.load_source("digits", image_size=4), "got 4"),
        (lambda s: data.load_source("digits", image_size=5000), "5000"),
        (lambda s: data.load_source("digits", test_fraction=1.0), "1.0"),
        (lambda s: data.load_source(""), "''"),
    ],
)
def test_bad_input_names_the_value(call, value):
    with pytest.raises(UserInputError, match=value):
        call(_id_source(num_train=40))
