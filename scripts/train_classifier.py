"""Train the committed feature classifier of a bundled dataset (mnist or digits) on its train split.

    python scripts/train_classifier.py --data mnist    # writes cmkit/weights/mnist_cnn.safetensors
    python scripts/train_classifier.py --data digits   # writes cmkit/weights/digits_cnn.safetensors

The split is cmkit's own (data.split=train/test, data.seed=0: the last 10% of a seeded permutation
is test), so the held-out accuracy printed at the end is measured on the very images that
``cmkit eval`` uses as its reference set, none of which the classifier saw. The accuracy and the
training settings are stored in the weights file's metadata.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cmkit.config import DataConfig
from cmkit.data import load_dataset
from cmkit.evaluation.classifier import CLASSIFIERS, WEIGHTS_DIR, DigitCNN, centre_crop, save_classifier


def load_split(name: str, split: str, cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset(DataConfig(name=name, split=split, labels=True, seed=0, cache_dir=cache_dir))
    return ds.to_data_space(ds.x), ds.labels


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (zero = black fill): a cheap augmentation."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(net: DigitCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    pred = torch.cat([net(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return (pred == y).double().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(CLASSIFIERS), required=True)
    p.add_argument("--epochs", type=int, default=None, help="default: 12 (mnist), 60 (digits)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default="~/.cache/cmkit")
    p.add_argument("--out", default=None, help="default: cmkit/weights/<data>_cnn.safetensors")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    filename, size = CLASSIFIERS[args.data]
    epochs = args.epochs or (12 if args.data == "mnist" else 60)
    max_shift = 2 if size >= 16 else 1

    x_train, y_train = load_split(args.data, "train", args.cache_dir)
    x_test, y_test = load_split(args.data, "test", args.cache_dir)
    x_train, x_test = centre_crop(x_train, size), centre_crop(x_test, size)
    net = DigitCNN(size, args.width, args.feature_dim)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=g)
        total = 0.0
        for i in range(0, len(x_train), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb = random_shift(x_train[idx], max_shift, g)
            loss = F.cross_entropy(net(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x_train):.4f}, "
              f"held-out accuracy {accuracy(net, x_test, y_test):.4f} ({time.perf_counter() - start:.0f} s)")
    acc_test, acc_train = accuracy(net, x_test, y_test), accuracy(net, x_train, y_train)
    info = {"data": args.data, "train_split": "train (data.seed=0)", "n_train": len(x_train),
            "heldout_split": "test (data.seed=0)", "n_heldout": len(x_test), "heldout_accuracy": round(acc_test, 4),
            "train_accuracy": round(acc_train, 4), "epochs": epochs, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "augmentation": f"random shift up to {max_shift} px"}
    out = args.out or WEIGHTS_DIR / filename
    save_classifier(net, out, info)
    print(f"held-out accuracy {acc_test:.4f} on {len(x_test)} test images (train {acc_train:.4f}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
