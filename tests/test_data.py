import gzip
import struct

import pytest
import torch

from train.data import epoch_shifts, load_digits, load_mnist, read_idx, shift_images


def _write_idx(path, tensor, code, fmt):
    header = struct.pack(">BBBB", 0, 0, code, tensor.dim()) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    body = struct.pack(f">{tensor.numel()}{fmt}", *tensor.flatten().tolist())
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)


def test_read_idx_reads_hand_written_uint8_and_int32_files(tmp_path):
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "im.gz", images, 0x08, "B")
    assert torch.equal(read_idx(tmp_path / "im.gz"), images)
    ints = torch.tensor([[1, -2], [70000, 3]], dtype=torch.int32)
    _write_idx(tmp_path / "ints", ints, 0x0C, "i")
    assert torch.equal(read_idx(tmp_path / "ints"), ints)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    _write_idx(tmp_path / "im", torch.zeros(2, 2, dtype=torch.uint8), 0x08, "B")
    data = (tmp_path / "im").read_bytes()
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="expected 4 bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "png")


def test_load_mnist_splits_a_test_only_folder_8000_2000(tmp_path):
    n = 8003
    images = torch.randint(0, 256, (n, 2, 2), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), dtype=torch.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x08, "B")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 0x08, "B")
    said = []
    (xtr, ytr), (xev, yev) = load_mnist(tmp_path, download=False, log=said.append)
    assert len(ytr) == 8000 and len(yev) == 3
    assert torch.equal(yev, labels[8000:].long())
    assert "first 8000" in said[0]


def test_load_mnist_says_where_to_put_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, download=False)


def test_real_mnist_test_set_reads_as_10000_digits(mnist_dir):
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and int(labels.max()) == 9
    # The official test set's first label is a 7, and its class counts are well known.
    assert int(labels[0]) == 7
    assert torch.bincount(labels.long()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_digits_split_is_fixed_and_disjoint():
    (xtr, ytr), (xev, yev) = load_digits()
    (xtr2, _), _ = load_digits()
    assert len(ytr) + len(yev) == 1797 and xtr.shape[1:] == (8, 8)
    assert torch.equal(xtr, xtr2)
    assert float(xtr.max()) == 1.0 and float(xtr.min()) == 0.0


def test_shift_images_moves_each_image_by_its_own_shift_and_fills_the_background():
    x = torch.randn(4, 5, 7) - 3.0
    shifts = torch.tensor([[0, 0], [2, -1], [-2, 2], [1, 1]])
    out = shift_images(x, shifts)
    for n, (dy, dx) in enumerate(shifts.tolist()):
        background = x[n].min()
        for i in range(5):
            for j in range(7):  # output (i, j) shows input (i - dy, j - dx), or the background
                si, sj = i - dy, j - dx
                want = x[n, si, sj] if 0 <= si < 5 and 0 <= sj < 7 else background
                assert out[n, i, j] == want, (n, i, j)


def test_epoch_shifts_are_a_function_of_seed_epoch_and_image_only():
    a = epoch_shifts(1000, 2, seed=0, epoch=3)
    assert torch.equal(a, epoch_shifts(1000, 2, seed=0, epoch=3))
    assert not torch.equal(a, epoch_shifts(1000, 2, seed=0, epoch=4))
    assert not torch.equal(a, epoch_shifts(1000, 2, seed=1, epoch=3))
    assert a.min() == -2 and a.max() == 2  # every shift in [-2, 2] occurs
    state = torch.get_rng_state()
    epoch_shifts(10, 2, seed=0, epoch=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone


def test_load_digits_without_scikit_learn_names_the_extra_that_brings_it(uninstalled):
    uninstalled("sklearn")
    with pytest.raises(ModuleNotFoundError) as e:
        load_digits()
    assert str(e.value) == "the digits data set needs scikit-learn: pip install 'manualgrad[digits]'"
    assert e.value.name == "sklearn"
