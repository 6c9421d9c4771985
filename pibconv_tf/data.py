"""Datasets and tf.data pipelines: every app reads its images through this module.

A source is chosen by name: `digits` (scikit-learn's bundled 8x8 digit scans, no network),
`folder:PATH` (the user's images, one sub-folder per class) or a TFDS image-classification
dataset (`cifar10`, `cifar100`, `svhn_cropped`, ...). `load_source` returns a `Source` whose
`split("train" | "test")` yields `(uint8 [H, W, 3] image, int32 label)` in a fixed order and
whose `info` (a `DatasetInfo`) carries the class names and normalisation constants. The
pipelines turn a source into batches for DARTS search, evaluation training and evaluation;
they are deterministic given their seed and reshuffle (and re-augment) on every epoch.

Example:
```python
source = load_source("digits", image_size=32, seed=0)
search_ds, steps = search_pipeline(source, global_batch_size=64, train_portion=0.5)
for (x_train, y_train), (x_val, y_val) in search_ds:
    ...
```
"""

import dataclasses
import difflib
import numbers
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from pibconv_tf.errors import UserInputError

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = ("train", "test")
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)  # DARTS' cnn/utils.py
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
_IN_MEMORY_BYTES = 2 * 1024**3  # splits up to this decoded size are cached and fully shuffled
_STATS_IMAGES = 10_000  # TFDS train images that estimate the mean and std
_NO_FLIP_TFDS = frozenset({"mnist", "emnist", "kmnist", "svhn_cropped"})  # digits, letters


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the code needs to know about a dataset; saved next to every model.

    Args:
        name: the name given to `load_source`, e.g. `"digits"`, `"folder:/x"`, `"cifar10"`.
        class_names: one name per label; they label GradCAM pictures and TFLite outputs.
        image_size: height and width of the images the pipelines yield.
        channels: always 3.
        mean: per-channel mean of the train split in 0..1 pixel scale (DARTS' constants for
            CIFAR-10; estimated from the first 10,000 train images for other TFDS sets).
        std: per-channel standard deviation, 0..1 scale.
        horizontal_flip: whether a mirrored image keeps its label.
        num_train: number of train images.
        num_test: number of test images.
    """

    name: str
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    horizontal_flip: bool
    num_train: int
    num_test: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(class_names=list(self.class_names), mean=list(self.mean), std=list(self.std))
        return {**d, "num_classes": self.num_classes}

    @classmethod
    def from_json_dict(cls, d: dict) -> "DatasetInfo":
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**kw, **{k: tuple(kw[k]) for k in ("class_names", "mean", "std")}})


class Source:
    """A dataset with a train and a test split, each in a fixed order.

    Subclasses implement `split`; `numpy` and `subset` work on any split and are
    overridden where the images already sit in memory.

    Args:
        info: the `DatasetInfo`.
        skipped: files that could not be decoded and were left out (folder sources).
    """

    def __init__(self, info: DatasetInfo, skipped: Sequence[str] = ()):
        self.info = info
        self.skipped = tuple(skipped)

    def split(self, name: str) -> tf.data.Dataset:
        """Yields `(uint8 [H, W, 3] image, int32 label)`, unbatched, in a fixed order."""
        raise NotImplementedError

    def numpy(self, name: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first `limit` (default all) uint8 images and int32 labels of a split."""
        ds = self.split(name)
        ds = ds if limit is None else ds.take(_check_limit(limit))
        size = self.info.image_size
        images, labels = [np.zeros((0, size, size, 3), np.uint8)], [np.zeros(0, np.int32)]
        for x, y in ds.batch(1024).as_numpy_iterator():
            images.append(x)
            labels.append(y)
        return np.concatenate(images), np.concatenate(labels)

    def subset(self, name: str, indices: np.ndarray) -> tf.data.Dataset:
        """The elements of a split at the given sorted indices, in split order."""
        mask = np.zeros(self._size(name), bool)
        mask[indices] = True
        mask = tf.constant(mask)
        ds = self.split(name).enumerate().filter(lambda i, _: tf.gather(mask, i))
        ds = ds.map(lambda _, example: example)
        return ds.cache() if _fits_in_memory(len(indices), self.info.image_size) else ds

    def _size(self, name: str) -> int:
        return self.info.num_train if _check_split(name) == "train" else self.info.num_test


class _ArraySource(Source):
    def __init__(self, info, arrays, skipped=()):
        super().__init__(info, skipped)
        self._arrays = arrays  # {"train": (images, labels), "test": (images, labels)}

    def split(self, name):
        return tf.data.Dataset.from_tensor_slices(self._arrays[_check_split(name)])

    def numpy(self, name, limit=None):
        images, labels = self._arrays[_check_split(name)]
        stop = None if limit is None else _check_limit(limit)
        return images[:stop].copy(), labels[:stop].copy()

    def subset(self, name, indices):
        images, labels = self._arrays[_check_split(name)]
        return tf.data.Dataset.from_tensor_slices((images[indices], labels[indices]))


class _TfdsSource(Source):
    def __init__(self, info, builder, split_names):
        super().__init__(info)
        self._builder = builder
        self._split_names = split_names  # "train"/"test" -> TFDS split strings

    def split(self, name):
        ds = _tfds_split(self._builder, self._split_names[_check_split(name)])
        size = self.info.image_size
        ds = ds.map(lambda x, y: (_to_rgb(x, size), tf.cast(y, tf.int32)), AUTOTUNE, True)
        return ds.cache() if _fits_in_memory(self._size(name), size) else ds


def array_source(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str],
    horizontal_flip: bool = True,
    skipped: Sequence[str] = (),
) -> Source:
    """A `Source` over in-memory uint8 `[N, S, S, 3]` images and integer labels.

    Its mean and std are computed from `train`. Also handy for tests and synthetic data.
    """
    arrays = {
        split: (np.asarray(images, np.uint8), np.asarray(labels, np.int32))
        for split, (images, labels) in zip(SPLITS, (train, test), strict=True)
    }
    images = arrays["train"][0]
    mean, std = _channel_stats(images[i : i + 4096] for i in range(0, len(images), 4096))
    info = DatasetInfo(
        name=name,
        class_names=tuple(str(c) for c in class_names),
        image_size=int(images.shape[1]),
        channels=3,
        mean=mean,
        std=std,
        horizontal_flip=bool(horizontal_flip),
        num_train=len(images),
        num_test=len(arrays["test"][0]),
    )
    return _ArraySource(info, arrays, skipped)


def load_source(
    name: str,
    data_dir: str | None = None,
    image_size: int = 32,
    seed: int = 0,
    test_fraction: float = 0.2,
    download: bool = False,
    horizontal_flip: bool | None = None,
) -> Source:
    """Loads the dataset called `name`.

    Args:
        name: `"digits"`, `"folder:PATH"` or a TFDS name such as `"cifar10"`.
        data_dir: where TFDS finds prepared data (TFDS' default when None).
        image_size: height and width of the yielded images (resized bilinearly if needed).
        seed: fixes the train/test split of `digits` and of a folder without train/test.
        test_fraction: share held out for testing where the source has no test split.
        download: let TFDS download a dataset that is not prepared; off by default so an
            offline machine fails at once instead of retrying for minutes.
        horizontal_flip: whether mirroring keeps the label; None picks the dataset's
            default (False for digit and letter datasets, True otherwise).

    Raises:
        UserInputError: unknown name, unprepared data, bad folder, size or fraction.
    """
    if not isinstance(name, str) or not name:
        raise UserInputError(
            f"Dataset name {name!r} is not accepted; use 'digits', 'folder:PATH' or a TFDS name."
        )
    _check_image_size(image_size)
    if not 0.0 < test_fraction < 1.0:
        raise UserInputError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    if name == "digits":
        source = _load_digits(image_size, seed, test_fraction)
    elif name.startswith("folder:"):
        source = _load_folder(name, image_size, seed, test_fraction)
    else:
        source = _load_tfds(name, data_dir, image_size, test_fraction, download)
    if horizontal_flip is not None:
        source.info = dataclasses.replace(source.info, horizontal_flip=bool(horizontal_flip))
    logging.info("Loaded %s", source.info)
    return source


def _load_digits(image_size: int, seed: int, test_fraction: float) -> Source:
    """scikit-learn's 1,797 digit scans: 0..16 -> 0..255, 8x8 -> bilinear upsampling."""
    from sklearn.datasets import load_digits  # only this source needs scikit-learn
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    scans = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    images = _to_rgb(tf.constant(scans), image_size).numpy()
    labels = digits.target.astype(np.int32)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    train, test = np.sort(train), np.sort(test)
    return array_source(
        "digits",
        (images[train], labels[train]),
        (images[test], labels[test]),
        class_names=[str(d) for d in range(10)],
        horizontal_flip=False,
    )


def _load_folder(name: str, image_size: int, seed: int, test_fraction: float) -> Source:
    """PATH/{train,test}/<class>/* or PATH/<class>/* (split per class by `test_fraction`).

    Files that do not decode are skipped with one warning; a class folder left with no
    readable image is an error.
    """
    root = os.path.expanduser(name[len("folder:") :])
    if not os.path.isdir(root):
        raise UserInputError(f"Dataset folder {root!r} (from {name!r}) is not a directory.")
    if all(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
        tops = {s: os.path.join(root, s) for s in SPLITS}
    else:
        tops = {"train": root}
    class_names = _class_folders(tops["train"])
    arrays, skipped = {}, []
    for split, top in tops.items():
        files, labels = _list_images(top, class_names)
        images, readable = _decode_files(files, image_size)
        skipped += [f for f, ok in zip(files, readable, strict=True) if not ok]
        empty = sorted(set(labels) - set(labels[readable]))
        if empty:
            folders = [os.path.join(top, class_names[i]) for i in empty]
            raise UserInputError(f"Class folder(s) {folders} contain no readable image.")
        arrays[split] = (images, labels[readable])
    if skipped:
        logging.warning("Skipped %d unreadable file(s), e.g. %s.", len(skipped), skipped[:3])
    if len(tops) == 1:
        arrays = _stratified_split(*arrays["train"], test_fraction, seed)
    return array_source(name, arrays["train"], arrays["test"], class_names, skipped=skipped)


def _class_folders(top: str) -> list[str]:
    names = sorted(d for d in os.listdir(top) if os.path.isdir(os.path.join(top, d)))
    names = [d for d in names if not d.startswith(".")]
    if not names:
        raise UserInputError(f"Dataset folder {top!r} has no class sub-folders.")
    return names


def _list_images(top: str, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    """All non-hidden files under `top`/<class>/; a test folder may lack some classes."""
    unknown = sorted(set(_class_folders(top)) - set(class_names))
    if unknown:
        raise UserInputError(
            f"Class folder(s) {unknown} in {top!r} are not train classes {class_names}."
        )
    files, labels = [], []
    for label, cls in enumerate(class_names):
        folder = os.path.join(top, cls)
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        paths = [os.path.join(folder, f) for f in names if not f.startswith(".")]
        paths = [p for p in paths if os.path.isfile(p)]
        if os.path.isdir(folder) and not paths:
            raise UserInputError(f"Class folder {folder!r} contains no files.")
        files += paths
        labels += [label] * len(paths)
    return files, np.asarray(labels, np.int32)


def _decode_files(files: list[str], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decodes (png, jpeg, bmp, gif) and resizes in parallel; returns images, readable mask."""

    def read(path, index):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return _to_rgb(image, image_size), index

    ds = tf.data.Dataset.from_tensor_slices((files, np.arange(len(files))))
    ds = ds.map(read, AUTOTUNE, deterministic=True).ignore_errors().batch(512)
    images, readable = (
        [np.zeros((0, image_size, image_size, 3), np.uint8)],
        np.zeros(len(files), bool),
    )
    for x, index in ds.as_numpy_iterator():
        images.append(x)
        readable[index] = True
    return np.concatenate(images), readable


def _stratified_split(images, labels, test_fraction, seed) -> dict:
    """Per class a seeded `test_fraction` is held out (at least one image of two or more)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = min(max(round(test_fraction * len(idx)), 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def _load_tfds(name, data_dir, image_size, test_fraction, download) -> Source:
    """A prepared TFDS image-classification dataset; never touches the network by default."""
    base = name.split(":")[0].split("/")[0]
    known = tfds.list_builders(with_community_datasets=False)
    if base not in known:
        close = difflib.get_close_matches(base, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserInputError(
            f"Unknown dataset {name!r}{hint}; accepted are 'digits', 'folder:PATH' or a "
            "TFDS image-classification name such as 'cifar10'."
        )
    builder = tfds.builder(name, data_dir=data_dir)
    where = data_dir or "TFDS' default data_dir"
    if not builder.is_prepared():
        if not download:
            raise UserInputError(
                f"TFDS dataset {name!r} is not prepared in {where}; pass --data_dir pointing "
                "to a prepared copy, allow downloading (needs internet), or use 'digits'."
            )
        try:
            builder.download_and_prepare()
        except Exception as err:  # network and archive failures come in many types
            raise UserInputError(
                f"TFDS dataset {name!r} could not be downloaded into {where} ({err}); "
                "pass --data_dir pointing to a prepared copy or use 'digits'."
            ) from err
    _, label_key = _supervised_keys(name, builder)
    split_names = _tfds_split_names(name, builder, test_fraction)
    # The datasets' cardinality, not info.splits: it also holds for sliced (and mocked) splits.
    num_train, num_test = (int(_tfds_split(builder, s).cardinality()) for s in split_names.values())
    info = DatasetInfo(
        name=name,
        class_names=tuple(builder.info.features[label_key].names),
        image_size=image_size,
        channels=3,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        horizontal_flip=base not in _NO_FLIP_TFDS,
        num_train=num_train,
        num_test=num_test,
    )
    source = _TfdsSource(info, builder, split_names)
    if base != "cifar10":
        batches = source.split("train").take(_STATS_IMAGES).batch(1000).as_numpy_iterator()
        mean, std = _channel_stats(x for x, _ in batches)
        source.info = dataclasses.replace(info, mean=mean, std=std)
    return source


def _supervised_keys(name: str, builder) -> tuple[str, str]:
    keys, features = builder.info.supervised_keys, builder.info.features
    if not (
        isinstance(keys, tuple)
        and len(keys) == 2
        and isinstance(features[keys[0]], tfds.features.Image)
        and isinstance(features[keys[1]], tfds.features.ClassLabel)
    ):
        raise UserInputError(
            f"TFDS dataset {name!r} is not an (image, class label) dataset; accepted are "
            "image-classification datasets such as 'cifar10', or 'folder:PATH' or 'digits'."
        )
    return keys


def _tfds_split_names(name: str, builder, test_fraction: float) -> dict[str, str]:
    """'train' and 'test', else 'validation' as test, else the tail of 'train'."""
    available = set(builder.info.splits.keys())
    if not available:  # unknown before preparation, and under tfds.testing.mock_data
        return {"train": "train", "test": "test"}
    if "train" not in available:
        raise UserInputError(
            f"TFDS dataset {name!r} has no 'train' split (it has {sorted(available)})."
        )
    for test in ("test", "validation"):
        if test in available:
            return {"train": "train", "test": test}
    total = builder.info.splits["train"].num_examples
    n_train = total - max(1, round(test_fraction * total))
    logging.warning(
        "%s has no test split: testing on its last %d train images.", name, total - n_train
    )
    return {"train": f"train[:{n_train}]", "test": f"train[{n_train}:]"}


def _tfds_split(builder, split: str) -> tf.data.Dataset:
    return builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)


def _to_rgb(images: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 images with 1, 3 or 4 channels -> uint8 RGB `size` x `size` (bilinear)."""
    if images.shape[-1] == 1:
        images = tf.image.grayscale_to_rgb(images)
    elif images.shape[-1] == 4:
        images = images[..., :3]
    if images.shape[-3] == size and images.shape[-2] == size:
        return images
    resized = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _channel_stats(batches) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) over uint8 `[N, H, W, 3]` batches."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for x in batches:
        x = x.reshape(-1, 3).astype(np.float64) / 255.0
        total, total_sq, count = total + x.sum(0), total_sq + np.square(x).sum(0), count + len(x)
    if count == 0:
        raise UserInputError("The train split is empty; a dataset needs train images.")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    std = np.where(std > 1e-3, std, 1.0)  # a constant channel must not blow up
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _fits_in_memory(num_images: int, image_size: int) -> bool:
    return num_images * image_size * image_size * 3 <= _IN_MEMORY_BYTES


def normalize(images, info: DatasetInfo) -> tf.Tensor:
    """`(x / 255 - mean) / std` in float32; `images` are uint8 or float in 0..255."""
    scale = tf.constant([1.0 / (255.0 * s) for s in info.std], tf.float32)
    shift = tf.constant([m / s for m, s in zip(info.mean, info.std, strict=True)], tf.float32)
    return tf.cast(images, tf.float32) * scale - shift  # one multiply-add: the hot path


def denormalize(images, info: DatasetInfo) -> tf.Tensor:
    """Inverse of `normalize`, in 0..1 pixel scale (for display)."""
    std, mean = tf.constant(info.std, tf.float32), tf.constant(info.mean, tf.float32)
    return tf.cast(images, tf.float32) * std + mean


def random_crop_flip(images: tf.Tensor, padding: int, seed, flip: bool) -> tf.Tensor:
    """Random crop of each zero-padded image of a `[B, H, W, C]` batch, optionally mirrored.

    Each image gets its own offset in `[0, 2 * padding]` per axis and, if `flip`, a
    left-right mirror with probability 1/2; both are one batched gather per axis.
    """
    height, width = images.shape[1], images.shape[2]
    batch = tf.shape(images)[0]
    crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    offsets = tf.random.stateless_uniform([2, batch], crop_seed, 0, 2 * padding + 1, tf.int32)
    cols = tf.range(width)[None]
    if flip:
        mirror = tf.random.stateless_uniform([batch, 1], flip_seed) < 0.5
        cols = tf.where(mirror, width - 1 - cols, cols)
    rows = offsets[0][:, None] + tf.range(height)[None]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, offsets[1][:, None] + cols, axis=2, batch_dims=1)


def cutout_at(images: tf.Tensor, centers: tf.Tensor, length: int) -> tf.Tensor:
    """Zeroes a `length` x `length` square per image of `[B, H, W, C]`, clipped at borders.

    The square covers rows (and columns) `c - length // 2` to `c - length // 2 + length - 1`
    for the `[B, 2]` (row, column) `centers`: DARTS' `Cutout` square for even lengths
    (DARTS' odd-length square is one pixel smaller).
    """
    start = tf.cast(centers, tf.int32) - length // 2

    def inside(size, axis):
        index = tf.range(size)[None]
        return (index >= start[:, axis, None]) & (index < start[:, axis, None] + length)

    rows, cols = inside(images.shape[1], 0), inside(images.shape[2], 1)
    square = tf.cast(rows[:, :, None, None] & cols[:, None, :, None], images.dtype)
    return images * (1 - square)


def cutout(images: tf.Tensor, length: int, seed) -> tf.Tensor:
    """DARTS' Cutout on a batch: each square's centre is uniform over the image's pixels."""
    size = tf.constant([images.shape[1], images.shape[2]], tf.int32)
    u = tf.random.stateless_uniform([tf.shape(images)[0], 2], seed)
    centers = tf.minimum(tf.cast(u * tf.cast(size, tf.float32), tf.int32), size - 1)
    return cutout_at(images, centers, length)


def augment_batch(images, seed, info: DatasetInfo, cutout_length: int = 16, padding: int = 4):
    """Crop, flip (only if `info.horizontal_flip`), normalise, cut out: DARTS' train transform.

    Cutout follows normalisation as in DARTS (ToTensor, Normalize, Cutout), so the square
    is 0 in normalised space, i.e. the mean colour. `seed` is a stateless `[2]` seed.
    """
    crop_seed, cutout_seed = tf.unstack(tf.random.split(seed, 2))
    x = normalize(random_crop_flip(images, padding, crop_seed, info.horizontal_flip), info)
    return cutout(x, cutout_length, cutout_seed) if cutout_length > 0 else x


def search_split_indices(
    num_train: int, train_portion: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train-split indices for weight training and for architecture validation.

    The first `train_portion` of a seeded permutation trains the weights, the rest
    validates the architecture: disjoint, and together the whole train split.
    """
    if not isinstance(train_portion, numbers.Real) or not 0.0 < train_portion < 1.0:
        raise UserInputError(f"train_portion must be in (0, 1), got {train_portion!r}.")
    n_weights = int(np.floor(train_portion * num_train))
    if not 0 < n_weights < num_train:
        raise UserInputError(
            f"train_portion {train_portion!r} leaves a search part of the {num_train} train "
            "images empty; choose a value nearer 0.5."
        )
    perm = np.random.default_rng(seed).permutation(num_train)
    return np.sort(perm[:n_weights]), np.sort(perm[n_weights:])


def search_pipeline(
    source: Source, global_batch_size: int, train_portion: float = 0.5, seed: int = 0
) -> tuple[tf.data.Dataset, int]:
    """One epoch of DARTS search batches `((x_train, y_train), (x_val, y_val))`.

    The two parts of `search_split_indices` are each reshuffled every epoch, normalised
    (no augmentation, as in DARTS' search) and batched with `drop_remainder=True`.

    Returns:
        The dataset (repeat it for more epochs) and its number of steps per epoch.
    """
    parts = search_split_indices(source.info.num_train, train_portion, seed)
    smallest = min(len(p) for p in parts)
    _check_batch_size(global_batch_size, smallest, "the smaller search part")
    streams = []
    for k, indices in enumerate(parts):
        ds = source.subset("train", indices)
        ds = ds.shuffle(len(indices), seed=seed + k, reshuffle_each_iteration=True)
        ds = ds.batch(global_batch_size, drop_remainder=True)
        streams.append(ds.map(lambda x, y: (normalize(x, source.info), y), AUTOTUNE, True))
    ds = tf.data.Dataset.zip(tuple(streams)).prefetch(AUTOTUNE)
    return ds.with_options(_options()), smallest // global_batch_size


def _epoch_seed(seed: int, epoch, stream: int):
    """A seed for stream `stream` of epoch `epoch` (an int or an int64 tensor) of a run
    seeded `seed`."""
    return tf.cast(epoch, tf.int64) * 101 + (int(seed) * 1_000_003 + stream)


def randaugment_layer(magnitude: float, seed: int = 0):
    """keras-cv's RandAugment on 0..255 pixels: two of its operations per image, at
    `magnitude` in (0, 1] (Cubuk et al., arXiv 1909.13719)."""
    import keras_cv  # noqa: PLC0415 (its import takes seconds; only when asked for)

    return keras_cv.layers.RandAugment(
        value_range=(0, 255), augmentations_per_image=2, magnitude=magnitude, seed=seed
    )


def train_pipeline(
    source: Source,
    global_batch_size: int,
    cutout_length: int = 16,
    augment: bool = True,
    seed: int = 0,
    drop_remainder: bool = True,
    crop_padding: int = 4,
    randaugment: float = 0.0,
) -> tf.data.Dataset:
    """One epoch of evaluation-training batches `(x, y)`, reshuffled every epoch.

    With `augment`, each batch gets `augment_batch` (random crop with `crop_padding` zero
    pixels, flip only if `source.info.horizontal_flip`, normalisation, cutout of
    `cutout_length`, 0 disabling it, clipped at the borders so a length beyond the image
    size may erase it whole) from a per-batch seed that changes every epoch. `randaugment`
    > 0 first applies keras-cv's RandAugment at that magnitude (not in DARTS' recipe; its
    draws come from keras-cv's own generators, so they are not replayed on a resume).
    `train_epochs` gives the same batches as a fixed function of (seed, epoch).
    """
    options = _train_options(
        source, global_batch_size, cutout_length, crop_padding, randaugment, drop_remainder
    )
    ds = source.split("train").shuffle(options["buffer"], seed=seed)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return _train_batches(ds, seeds, augment, seed, **options)


def _train_options(source, global_batch_size, cutout_length, crop_padding, randaugment, drop):
    """Validates `train_pipeline`'s options; returns those `_train_batches` takes."""
    info = source.info
    if isinstance(cutout_length, bool) or not isinstance(cutout_length, numbers.Integral):
        raise UserInputError(f"cutout_length must be an integer >= 0, got {cutout_length!r}.")
    if cutout_length < 0:
        raise UserInputError(f"cutout_length must be an integer >= 0, got {cutout_length!r}.")
    if not 0 <= crop_padding <= info.image_size // 2:
        raise UserInputError(
            f"crop_padding must be from 0 to {info.image_size // 2} (half of image_size), "
            f"got {crop_padding!r}."
        )
    if not 0.0 <= randaugment <= 1.0:
        raise UserInputError(f"randaugment must be a magnitude in [0, 1], got {randaugment!r}.")
    _check_batch_size(global_batch_size, info.num_train if drop else None, "train")
    fits = _fits_in_memory(info.num_train, info.image_size)
    return dict(
        info=info,
        batch_size=global_batch_size,
        drop_remainder=drop,
        buffer=info.num_train if fits else 16384,
        cutout_length=cutout_length,
        crop_padding=crop_padding,
        randaugment=randaugment,
    )


def _train_batches(ds, seeds, augment, seed, info, batch_size, drop_remainder, buffer, **o):
    """Shuffled examples `ds` batched and augmented, batch i from the i-th of `seeds`."""
    del buffer  # the caller's shuffle used it
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if augment and o["randaugment"] > 0:
        layer = o.get("randaugment_layer") or randaugment_layer(o["randaugment"], seed)
        ds = ds.map(lambda x, y: (layer(tf.cast(x, tf.float32), training=True), y), AUTOTUNE)
    if augment:
        cutout, padding = o["cutout_length"], o["crop_padding"]
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda xy, s: (augment_batch(xy[0], s, info, cutout, padding), xy[1]),
            AUTOTUNE,
            True,
        )
    else:
        ds = ds.map(lambda x, y: (normalize(x, info), y), AUTOTUNE, True)
    return ds.prefetch(AUTOTUNE).with_options(_options())


def train_steps_per_epoch(source: Source, global_batch_size: int) -> int:
    """Batches in one epoch of `train_epochs` (the last partial batch dropped)."""
    return source.info.num_train // global_batch_size


def train_epochs(
    source: Source,
    global_batch_size: int,
    first_epoch: int,
    epochs: int,
    skip: int = 0,
    steps_per_epoch: int = 0,
    seed: int = 0,
    cutout_length: int = 16,
    augment: bool = True,
    crop_padding: int = 4,
    randaugment: float = 0.0,
) -> tf.data.Dataset:
    """The training batches of epochs `first_epoch`..`epochs - 1`, one after another, each
    epoch a function of (`seed`, epoch) alone.

    Epoch e is `train_pipeline`'s epoch with its shuffle seeded by (seed, e) and its
    augmentation draws by (seed, e, batch), so a run resumed at any epoch (and, with `skip`,
    at any step of it) reads the batches an uninterrupted run reads there (RandAugment's
    draws excepted). `steps_per_epoch` > 0 caps each epoch at that many batches.
    """
    options = _train_options(
        source, global_batch_size, cutout_length, crop_padding, randaugment, True
    )
    steps = train_steps_per_epoch(source, global_batch_size)
    steps = min(steps, steps_per_epoch) if steps_per_epoch else steps
    if augment and randaugment > 0:  # one layer (its generator state) for every epoch
        options["randaugment_layer"] = randaugment_layer(randaugment, seed)

    def epoch(index):
        # Seeds from (seed, epoch) alone: without this, the function's graph would mix in
        # tf.random.set_seed's global seed (and, at 0, fail comparing a tensor seed to 0).
        tf.compat.v1.get_default_graph().seed = None
        ds = source.split("train").shuffle(
            options["buffer"], seed=_epoch_seed(seed, index, 0), reshuffle_each_iteration=False
        )
        base = _epoch_seed(seed, index, 1)
        seeds = tf.data.Dataset.range(2**31).map(lambda i: tf.stack([base, i]))
        return _train_batches(ds, seeds, augment, seed, **options).take(steps)

    first = tf.data.Dataset.range(first_epoch, min(first_epoch + 1, epochs)).flat_map(epoch)
    later = tf.data.Dataset.range(first_epoch + 1, epochs).flat_map(epoch)
    return first.skip(skip).concatenate(later)


def eval_pipeline(source: Source, global_batch_size: int, split: str = "test") -> tf.data.Dataset:
    """Normalised batches of a split in its fixed order; the last batch may be partial."""
    _check_batch_size(global_batch_size, None, split)
    ds = source.split(_check_split(split)).batch(global_batch_size)
    ds = ds.map(lambda x, y: (normalize(x, source.info), y), AUTOTUNE, True)
    return ds.prefetch(AUTOTUNE).with_options(_options())


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _check_split(name: str) -> str:
    if name not in SPLITS:
        raise UserInputError(f"Split {name!r} is unknown; accepted are 'train' and 'test'.")
    return name


def _check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 0:
        raise UserInputError(f"limit must be None or an integer >= 0, got {limit!r}.")
    return int(limit)


def _check_image_size(image_size) -> None:
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, numbers.Integral)
        or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        raise UserInputError(
            f"image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
            f"(the crop pads 4 pixels per side), got {image_size!r}."
        )


def _check_batch_size(batch_size, available: int | None, split: str) -> None:
    """Positive, and no larger than the images a drop-remainder epoch batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise UserInputError(f"Batch size must be a positive integer, got {batch_size!r}.")
    if batch_size <= 0:
        raise UserInputError(f"Batch size must be a positive integer, got {batch_size!r}.")
    if available is not None and batch_size > available:
        raise UserInputError(
            f"Batch size {batch_size} is larger than {split} ({available} images), so an "
            f"epoch would have no batch; use at most {available}."
        )
