"""fastdl.data: readers checked against files written here in each format, batched transforms
against per-image loops, and TensorBatches."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch
from harness import fresh_seed

from fastdl import data
from fastdl.data import transforms as T

# ---------------------------------------------------------------------------------------------
# CIFAR


def write_pickle(path, content, protocol=2, numpy1_names=False):
    raw = pickle.dumps(content, protocol=protocol)
    if numpy1_names:  # as the official files (numpy 1.x, protocol 2) name the array constructor
        assert protocol == 2 and b"numpy._core.multiarray" in raw
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)


def cifar_batch(n, num_classes, label_key=b"labels", rng=None):
    rng = rng or np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).tolist()
    # CIFAR's layout: each row holds the red plane, then green, then blue
    content = {
        b"batch_label": b"batch",
        label_key: labels,
        b"data": images.reshape(n, 3072),
        b"filenames": [b"x.png"] * n,
    }
    return content, images, labels


def test_cifar10_reads_the_batches_exactly(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"class{i}".encode() for i in range(10)]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    rng = np.random.default_rng(1)
    expected_images, expected_labels = [], []
    for i in range(1, 6):
        content, images, labels = cifar_batch(3 + i, 10, rng=rng)
        write_pickle(folder / f"data_batch_{i}", content, protocol=2 if i % 2 else 4, numpy1_names=i == 1)
        expected_images.append(images)
        expected_labels += labels
    content, test_images, test_labels = cifar_batch(4, 10, rng=rng)
    write_pickle(folder / "test_batch", content)

    train = data.CIFAR10(tmp_path)  # the parent of cifar-10-batches-py works too
    assert train.images.dtype == torch.uint8 and train.images.shape == (sum(range(4, 9)), 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(np.concatenate(expected_images)))
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == expected_labels
    assert train.classes == [f"class{i}" for i in range(10)]
    test = data.CIFAR10(folder, train=False)
    assert torch.equal(test.images, torch.from_numpy(test_images)) and test.labels.tolist() == test_labels
    image, label = test[2]
    assert torch.equal(image, torch.from_numpy(test_images[2])) and label.item() == test_labels[2]


def test_cifar100_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
    )
    content, images, fine = cifar_batch(6, 100, b"fine_labels")
    content[b"coarse_labels"] = [f // 5 for f in fine]
    write_pickle(folder / "train", content)
    train = data.CIFAR100(tmp_path)
    assert torch.equal(train.images, torch.from_numpy(images)) and train.labels.tolist() == fine
    assert len(train.classes) == 100 and train.classes[7] == "f7"
    coarse = data.CIFAR100(folder, label="coarse")
    assert coarse.labels.tolist() == [f // 5 for f in fine] and len(coarse.classes) == 20
    with pytest.raises(FileNotFoundError, match="test"):
        data.CIFAR100(folder, train=False)


def test_cifar_bad_files_give_clear_errors(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_pickle(folder / "batches.meta", {b"label_names": [b"a", b"b"]})
    content, _, _ = cifar_batch(4, 2)
    write_pickle(folder / "test_batch", content)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"test_batch: not a CIFAR python pickle \((EOFError|UnpicklingError)"):
        data.CIFAR10(folder, train=False)
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"test_batch: 'data' must be uint8 \[n, 3072\].*\[2, 1024\]"):
        data.CIFAR10(folder, train=False)
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        data.CIFAR10(folder, train=False)
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 5]})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        data.CIFAR10(folder, train=False)
    write_pickle(folder / "test_batch", {b"pixels": 1})
    with pytest.raises(ValueError, match="no 'data' entry"):
        data.CIFAR10(folder, train=False)
    write_pickle(
        folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"payload": print}
    )  # a function reference: code, not data
    with pytest.raises(ValueError, match="refusing to load"):
        data.CIFAR10(folder, train=False)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.CIFAR10(folder)
    with pytest.raises(FileNotFoundError, match="batches.meta"):
        data.CIFAR10(tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------
# MNIST / IDX


def idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist(folder, prefix, images, labels, compress):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (
        (f"{prefix}-images-idx3-ubyte", idx_bytes(images, 0x08)),
        (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 0x08)),
    ):
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_mnist_and_fashion_mnist_read_idx_files(tmp_path, compress):
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5, dtype=np.uint8)
    write_mnist(tmp_path, "train", images, labels, compress)
    write_mnist(tmp_path / "FashionMNIST" / "raw", "t10k", images[:3], labels[:3], compress)  # torchvision's layout
    mnist = data.MNIST(tmp_path)
    assert mnist.images.shape == (5, 1, 28, 28) and mnist.images.dtype == torch.uint8
    assert torch.equal(mnist.images[:, 0], torch.from_numpy(images)) and mnist.labels.tolist() == labels.tolist()
    assert mnist.labels.dtype == torch.int64 and mnist.classes[3] == "3"
    fashion = data.FashionMNIST(tmp_path, train=False)
    assert torch.equal(fashion.images[:, 0], torch.from_numpy(images[:3])) and fashion.classes[9] == "Ankle boot"


@pytest.mark.parametrize(
    "type_code, dtype",
    [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)],
)
def test_read_idx_every_type_big_endian(tmp_path, type_code, dtype):
    array = (
        (np.arange(24).reshape(2, 3, 4) * 3 - 20).astype(dtype)
        if type_code != 0x08
        else np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    )
    (tmp_path / "a.idx").write_bytes(idx_bytes(array, type_code))
    out = data.read_idx(tmp_path / "a.idx")
    assert out.shape == (2, 3, 4) and np.array_equal(out.numpy(), array)


def test_idx_bad_files_give_clear_errors(tmp_path):
    good = idx_bytes(np.zeros((4, 28, 28), np.uint8), 0x08)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x07\x03" + good[4:])
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte: not an IDX file: the magic number .* got 00 00 07 03"
    ):
        data.read_idx(path)
    path.write_bytes(good[:-10])
    with pytest.raises(ValueError, match=r"IDX header says 4x28x28 uint8 = 3136 bytes of data, but the file has 3126"):
        data.read_idx(path)
    path.write_bytes(good[:9])
    with pytest.raises(ValueError, match="promises 3 dimensions but the file ends after 9 bytes"):
        data.read_idx(path)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: truncated or corrupt gzip file"):
        data.read_idx(gz)
    folder = tmp_path / "mnist"
    write_mnist(folder, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8), compress=False)
    with pytest.raises(ValueError, match="has 3 images but .* has 2 labels"):
        data.MNIST(folder)
    write_mnist(folder, "train", np.zeros((2, 28, 28), np.uint8), np.array([1, 12], np.uint8), compress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        data.MNIST(folder)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz"):
        data.MNIST(folder, train=False)


# ---------------------------------------------------------------------------------------------
# Image files


def write_image(path, pixels: np.ndarray):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_reads_png_exactly(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(3)
    pixels = {
        name: rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for name in ("cat/a.png", "cat/sub/b.png", "dog/c.png")
    }
    for name, p in pixels.items():
        write_image(tmp_path / name, p)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    folder = data.ImageFolder(tmp_path)
    assert folder.classes == ["cat", "dog"] and folder.targets == [0, 0, 1] and len(folder) == 3
    image, label = folder[2]
    assert label == 1 and image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    assert torch.equal(image, torch.from_numpy(pixels["dog/c.png"]).permute(2, 0, 1))
    loaded = folder.load()
    assert loaded.images.shape == (3, 3, 5, 7) and loaded.labels.tolist() == [0, 0, 1]
    assert torch.equal(loaded.images[1], torch.from_numpy(pixels["cat/sub/b.png"]).permute(2, 0, 1))
    gray = data.ImageFolder(tmp_path, mode="L")[0][0]
    assert gray.shape == (1, 5, 7)


def test_image_folder_errors(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        data.ImageFolder(tmp_path / "empty")
    write_image(tmp_path / "mixed" / "a" / "small.png", np.zeros((4, 4, 3), np.uint8))
    write_image(tmp_path / "mixed" / "b" / "large.png", np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(ValueError, match=r"large.png: size \[3, 6, 6\] differs from the first image's \[3, 4, 4\]"):
        data.ImageFolder(tmp_path / "mixed").load()
    broken = tmp_path / "mixed" / "b" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match="broken.jpg: cannot decode the image"):
        data.read_image(broken)


def make_tiny_imagenet(root, rng):
    wnids = ["n02", "n01", "n03"]  # wnids.txt is not sorted; labels follow the sorted order
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\nn03\tbullfrog\nn99\tother\n")
    train = {}
    for wnid in wnids:
        for i in range(2):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            write_image(root / "train" / wnid / "images" / f"{wnid}_{i}.png", pixels)
            train[f"{wnid}_{i}"] = pixels
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    val, lines = {}, []
    for i, wnid in enumerate(["n03", "n01", "n02", "n03"]):
        pixels = (
            rng.integers(0, 256, (8, 8), dtype=np.uint8) if i == 0 else rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        )
        write_image(root / "val" / "images" / f"val_{i}.png", pixels)  # val_0 is grayscale, as some are
        val[i] = pixels
        lines.append(f"val_{i}.png\t{wnid}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_image(root / "val" / "images" / "val_0.jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return train, val


def test_tiny_imagenet_layout(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "tiny-imagenet-200"
    train_pixels, val_pixels = make_tiny_imagenet(root, np.random.default_rng(4))
    train = data.TinyImageNet(root)
    assert train.classes == ["n01", "n02", "n03"] and train.class_names[0] == "goldfish, Carassius auratus"
    assert train.targets == [0, 0, 1, 1, 2, 2]
    image, label = train[3]
    assert label == 1 and torch.equal(image, torch.from_numpy(train_pixels["n02_1"]).permute(2, 0, 1))
    val = data.TinyImageNet(root, split="val")
    assert val.targets == [2, 0, 1, 2]
    gray = val[0][0]
    assert gray.shape == (3, 8, 8) and all(torch.equal(gray[c], torch.from_numpy(val_pixels[0])) for c in range(3))
    assert val.load().images.shape == (4, 3, 8, 8)
    jpeg = data.read_image(root / "val" / "images" / "val_0.jpg")
    assert jpeg.shape == (3, 8, 8) and jpeg.dtype == torch.uint8
    with pytest.raises(ValueError, match="the test split has no labels"):
        data.TinyImageNet(root, split="test")
    (root / "val" / "val_annotations.txt").write_text("val_0.png\tn77\t0\t0\t7\t7\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt, line 1: expected"):
        data.TinyImageNet(root, split="val")
    with pytest.raises(FileNotFoundError, match="wnids.txt: not found"):
        data.TinyImageNet(tmp_path)


def test_read_image_without_pillow_names_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pillow(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pillow)
    with pytest.raises(ImportError, match="needs Pillow: pip install pillow"):
        data.read_image(tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# Transforms


def test_crop_equals_a_per_image_loop():
    fresh_seed()
    images = torch.randint(0, 256, (6, 3, 10, 9), dtype=torch.uint8)
    top, left = torch.randint(0, 4, (6,)), torch.randint(0, 3, (6,))
    out = T.crop(images, top, left, (7, 6))
    expected = torch.stack([images[n, :, top[n] : top[n] + 7, left[n] : left[n] + 6] for n in range(6)])
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="leaves the 10x9 images"):
        T.crop(images, top + 4, left, (7, 6))


def test_random_crop_with_padding_is_a_per_image_crop_of_the_padded_image():
    fresh_seed()
    images = torch.randint(1, 256, (64, 2, 6, 6), dtype=torch.uint8)  # no zeros: padding is visible
    out = T.random_crop(images, 6, padding=2, generator=torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    offsets = set()
    for n in range(64):
        matches = [
            (i, j) for i in range(5) for j in range(5) if torch.equal(out[n], padded[n, :, i : i + 6, j : j + 6])
        ]
        assert matches, f"image {n} is no crop of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets differ between images
    again = T.random_crop(images, 6, padding=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)  # reproducible from the seed
    with pytest.raises(ValueError, match="larger than the padded images"):
        T.random_crop(images, 11, padding=2)


def test_random_horizontal_flip_per_image():
    images = torch.rand(200, 3, 4, 5)
    out = T.random_horizontal_flip(images, generator=torch.Generator().manual_seed(6))
    flipped = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, images)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, images))
    assert 60 < sum(flipped) < 140
    assert torch.equal(T.random_horizontal_flip(images, p=0.0), images)
    assert torch.equal(T.random_horizontal_flip(images, p=1.0), images.flip(-1))


def test_normalize_resize_and_recipes():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = T.normalize(images, T.CIFAR10_MEAN, T.CIFAR10_STD)
    for c in range(3):
        expected = (images[:, c].float() / 255 - T.CIFAR10_MEAN[c]) / T.CIFAR10_STD[c]
        torch.testing.assert_close(out[:, c], expected)
    with pytest.raises(ValueError, match="3 channels but 1 means"):
        T.normalize(images, T.MNIST_MEAN, T.MNIST_STD)
    up = T.resize(images, 16)
    assert up.dtype == torch.uint8 and up.shape == (4, 3, 16, 16)
    expected = torch.nn.functional.interpolate(images.float(), size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(up, expected.round().to(torch.uint8))
    assert T.resize(images.float(), (4, 6), mode="nearest").shape == (4, 3, 4, 6)
    train = T.train_transform(T.CIFAR10_MEAN, T.CIFAR10_STD, generator=torch.Generator().manual_seed(0))
    assert train(images).dtype == torch.float32 and train(images).shape == images.shape
    torch.testing.assert_close(T.eval_transform(T.CIFAR10_MEAN, T.CIFAR10_STD)(images), out)


# ---------------------------------------------------------------------------------------------
# Batches and digits


def test_tensor_batches_cover_each_epoch_and_are_reproducible():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    dataset = data.ImageTensorDataset(images, torch.arange(10), [str(i) for i in range(10)])
    batches = data.TensorBatches(
        dataset, 4, shuffle=True, generator=torch.Generator().manual_seed(0), transform=lambda x: x.float()
    )
    assert len(batches) == 3
    first, second = [torch.cat([y for _, y in batches]) for _ in range(2)]
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != second.tolist()
    for x, y in batches:
        assert x.dtype == torch.float32 and torch.equal(x[:, 0, 0, 0].long(), y)
    again = data.TensorBatches(dataset, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([y for _, y in again]), first)
    in_order = data.TensorBatches(torch.utils.data.Subset(dataset, [7, 3, 5]), 2, drop_last=True)
    assert len(in_order) == 1 and [y.tolist() for _, y in in_order] == [[7, 3]]
    with pytest.raises(TypeError, match="held in tensors"):
        data.TensorBatches([1, 2, 3], 2)


def test_digits_from_scikit_learn():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    train, test, everything = data.digits("train"), data.digits("test"), data.digits("all")
    assert len(train) + len(test) == len(everything) == 1797 and len(test) == 359
    assert everything.images.shape == (1797, 1, 8, 8) and everything.images.dtype == torch.uint8
    assert int(everything.images.max()) == 255 and int(everything.images.min()) == 0
    reference = load_digits()
    assert torch.equal(everything.labels, torch.as_tensor(reference.target))
    assert torch.equal((everything.images[:, 0].long() * 16 + 127) // 255, torch.as_tensor(reference.images).long())
    train_rows = {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(train.images, train.labels)}
    assert sum(tuple(x.flatten().tolist()) + (int(y),) in train_rows for x, y in zip(test.images, test.labels)) < 5
    assert torch.equal(data.digits("test").images, test.images)  # the split is fixed by the seed
