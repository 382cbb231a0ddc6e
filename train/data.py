"""Real data with no network: scikit-learn's bundled 8x8 digits, and MNIST from IDX files.

MNIST is read by a small IDX reader of our own (the format torchvision downloads), so it
works without torchvision. When a data dir holds only the official test set (t10k files),
as ../shared/data/mnist does, it is split in a fixed way: the first 8,000 images train, the
last 2,000 evaluate.
"""
import gzip
import pathlib
import struct

import torch

from manualgrad._extras import require

# IDX type codes -> (torch dtype, bytes per element); data is big-endian.
_IDX_TYPES = {0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2), 0x0C: (torch.int32, 4),
              0x0D: (torch.float32, 4), 0x0E: (torch.float64, 8)}
_NUMPY_BE = {torch.int16: ">i2", torch.int32: ">i4", torch.float32: ">f4", torch.float64: ">f8"}

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_MNIST = PROJECT_ROOT.parent / "shared" / "data" / "mnist"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TEST_ONLY_SPLIT = 8000


def read_idx(path):
    """Read an IDX file (optionally gzipped) into a tensor of its stored dtype and shape."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    dtype, size = _IDX_TYPES[code]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = 1
    for s in shape:
        count *= s
    body = data[4 + 4 * ndim :]
    if len(body) != count * size:
        raise ValueError(f"{path}: expected {count * size} bytes of data for shape {shape}, found {len(body)}")
    if size == 1:
        return torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)
    import numpy as np

    return torch.from_numpy(np.frombuffer(body, dtype=_NUMPY_BE[dtype]).astype(_NUMPY_BE[dtype][1:])).reshape(shape)


def _find(data_dir, stem):
    for name in (stem, stem + ".gz"):
        p = pathlib.Path(data_dir) / name
        if p.exists():
            return p
    # torchvision's layout: <root>/MNIST/raw/
    for name in (stem, stem + ".gz"):
        p = pathlib.Path(data_dir) / "MNIST" / "raw" / name
        if p.exists():
            return p
    return None


def _read_pair(data_dir, split):
    images, labels = (_find(data_dir, stem) for stem in MNIST_FILES[split])
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{images} has {x.shape[0]} images but {labels} has {y.shape[0]} labels")
    return x, y


def _try_torchvision_download(data_dir):
    """Download through torchvision when it imports; any failure means no download."""
    try:
        import torchvision  # noqa: F401  (optional; its CUDA wheels may not import next to CPU torch)

        for train in (True, False):
            torchvision.datasets.MNIST(str(data_dir), train=train, download=True)
        return True
    except Exception:  # noqa: BLE001 - import errors, network errors: fall back to the message
        return False


def _as_float(x):
    # uint8 images (N, 28, 28) -> float32 in [0, 1], normalised with MNIST's usual mean/std
    return ((x.float() / 255.0) - 0.1307) / 0.3081


def load_mnist(data_dir=None, download=True, log=print):
    """MNIST as ((x_train, y_train), (x_eval, y_eval)), images (N, 28, 28) float32.

    Uses the train and t10k files when both are there; with only t10k, its first 8,000
    images train and the last 2,000 evaluate (and it says so through ``log``).
    """
    data_dir = pathlib.Path(data_dir) if data_dir is not None else SHARED_MNIST
    train, test = _read_pair(data_dir, "train"), _read_pair(data_dir, "test")
    if train is None and test is None and download and _try_torchvision_download(data_dir):
        train, test = _read_pair(data_dir, "train"), _read_pair(data_dir, "test")
    if test is None:
        raise FileNotFoundError(
            f"MNIST IDX files not found in {data_dir}: put t10k-images-idx3-ubyte.gz and "
            f"t10k-labels-idx1-ubyte.gz there (and optionally the train-* files), in torchvision's format"
        )
    if train is None:
        x, y = test
        log(f"only the MNIST test set is in {data_dir}: training on its first {TEST_ONLY_SPLIT} images, "
            f"evaluating on the last {x.shape[0] - TEST_ONLY_SPLIT}")
        train, test = (x[:TEST_ONLY_SPLIT], y[:TEST_ONLY_SPLIT]), (x[TEST_ONLY_SPLIT:], y[TEST_ONLY_SPLIT:])
    return (_as_float(train[0]), train[1].long()), (_as_float(test[0]), test[1].long())


def load_digits(eval_fraction=0.2, seed=0):
    """scikit-learn's bundled 8x8 digits (1,797 real scans) as ((x_train, y_train), (x_eval, y_eval)).

    Images (N, 8, 8) float32 scaled to [0, 1]; a fixed seeded split. Needs scikit-learn
    (``pip install 'manualgrad[digits]'``); without it, a ModuleNotFoundError saying so.
    """
    datasets = require("sklearn.datasets", "the digits data set")

    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_eval = int(round(len(y) * eval_fraction))
    ev, tr = perm[:n_eval], perm[n_eval:]
    return (x[tr], y[tr]), (x[ev], y[ev])


def shift_images(x, shifts):
    """Translate each image by whole pixels, filling with the background (the image's minimum).

    x (N, H, W); shifts (N, 2) integers (dy, dx), each in [-s, s]: image n moves down by dy and
    right by dx. Pixels moved in from outside take the background value, which for normalised
    MNIST is the (negative) value of a black pixel, so a shifted digit looks like any other.
    """
    n, h, w = x.shape
    s = int(shifts.abs().max()) if shifts.numel() else 0
    if s == 0:
        return x
    background = x.amin(dim=(1, 2), keepdim=True)
    padded = background.expand(n, h + 2 * s, w + 2 * s).clone()
    padded[:, s : s + h, s : s + w] = x
    # output pixel (i, j) of image n is padded pixel (s + i - dy, s + j - dx)
    rows = torch.arange(h, device=x.device) + s - shifts[:, :1]          # (N, H)
    cols = torch.arange(w, device=x.device) + s - shifts[:, 1:]          # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def epoch_shifts(n, max_shift, seed, epoch):
    """One (dy, dx) per training image for an epoch, from a generator of its own seeded by
    (seed, epoch): the same shifts whatever the number of processes, the batch size or the
    point a run was resumed from, and the global RNG is left alone."""
    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g)


def mnist_available(data_dir=None):
    data_dir = pathlib.Path(data_dir) if data_dir is not None else SHARED_MNIST
    return _find(data_dir, MNIST_FILES["test"][0]) is not None
