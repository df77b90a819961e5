"""Small datasets in real on-disk layouts, for tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["write_flowers102", "article_job", "loopback_s3", "free_port", "digits_killer", "digits_failing",
           "random_images", "fails", "dies", "hostile_convs", "one_hostile_layer", "tiny_cnn"]


def write_flowers102(root: str | Path, classes=(1, 17, 40, 77, 101, 102), train=4, val=1, test=2,
                     size=(500, 375)) -> Path:
    """Write `root/flowers-102/` as torchvision's Flowers102 reads it: jpg/image_NNNNN.jpg,
    imagelabels.mat (1-based labels) and setid.mat (trnid/valid/tstid image ids).

    Its .mat files differ from the real ones, so torchvision's md5 check fails: load it with
    `verify = false` in the job file. Images are smooth colour fields, one hue per class.
    """
    import numpy as np
    from PIL import Image
    from scipy.io import savemat

    base = Path(root) / "flowers-102"
    (base / "jpg").mkdir(parents=True, exist_ok=True)
    labels, split_ids = [], {"trnid": [], "valid": [], "tstid": []}
    rng = np.random.default_rng(0)
    w, h = size
    gradient = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.4, 1, h)[:, None, None]
    for label in classes:
        for key, count in (("trnid", train), ("valid", val), ("tstid", test)):
            for _ in range(count):
                image_id = len(labels) + 1
                colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
                pixels = gradient * colour + rng.normal(0, 12, (h, w, 3))
                Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(base / "jpg" / f"image_{image_id:05d}.jpg")
                labels.append(label)
                split_ids[key].append(image_id)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in split_ids.items()})
    return Path(root)


def article_job(base: str | Path, *, samples: int = 20, latency_iters: int = 100, threads: int = 1,
                classes=(1, 17, 40, 77, 101, 102), run_extra: str = "", train: int | None = None, val: int = 1,
                test: int = 2) -> Path:
    """jobs/flowers102_resnet18.toml made runnable here: a written Flowers102 folder (see
    `write_flowers102`, with `verify = false`; `train`/`val`/`test` images per class), an untrained
    resnet18 checkpoint (seed 0), and the given sample count, latency runs and threads; `run_extra`
    is added to its [run] table. Data and checkpoint already written under `base` are kept.
    Returns the job file's path."""
    import torch
    import torchvision

    base = Path(base)
    if not (base / "data" / "flowers-102" / "setid.mat").exists():
        write_flowers102(base / "data", classes=classes, train=train or max(4, -(-samples // len(classes))),
                         val=val, test=test)
    (base / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not (base / "checkpoints" / "resnet18.pth").exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(num_classes=102).state_dict(), base / "checkpoints" / "resnet18.pth")
    text = (Path(__file__).resolve().parents[1] / "jobs" / "flowers102_resnet18.toml").read_text()
    for old, new in (('"../checkpoints/resnet18_flowers102.pth"', f'"{base / "checkpoints" / "resnet18.pth"}"'),
                     ('root = "../data"', f'root = "{base / "data"}"\nverify = false'),
                     ("samples = 100", f"samples = {samples}"), ("latency_iters = 100", f"latency_iters = {latency_iters}"),
                     ("latency_warmup = 10", f"latency_warmup = {min(10, latency_iters)}"),
                     ("threads = 1 ", f"threads = {threads} ")):
        if old not in text:
            raise ValueError(f"jobs/flowers102_resnet18.toml no longer contains {old!r}")
        text = text.replace(old, new)
    if not text.rstrip().splitlines()[-1].startswith("latency_iters"):
        raise ValueError("jobs/flowers102_resnet18.toml no longer ends with its [run] table")
    job = base / "flowers102_resnet18.toml"
    job.write_text(text.rstrip() + "\n" + run_extra)
    return job


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_s3(port: int | None = None):
    """moto's S3 server (`pip install 'moto[server]'`) in its own process on 127.0.0.1: a real HTTP
    endpoint of the S3 protocol. Yields its URL; point pyarrow at it with AWS_ENDPOINT_URL (or a URI's
    `endpoint_override`), with any AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    port = port or free_port()
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"moto's S3 server did not start: {log.read()[-2000:].decode(errors='replace')}")
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)


class _KillingDataset:
    """Wraps a dataset; loading sample `kill_at` SIGKILLs the process (once, if `marker` is given:
    the marker file is created first, so a retry on a new worker goes through)."""

    def __init__(self, inner, kill_at: int, marker: str | None):
        self.inner, self.kill_at, self.marker = inner, kill_at, marker

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.kill_at and (self.marker is None or not Path(self.marker).exists()):
            import os
            import signal

            if self.marker is not None:
                Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner[i]


class _FailingDataset:
    """Wraps a dataset; loading sample `fail_at` raises, as a broken file or a bug in user code would."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at = inner, fail_at

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise ValueError(f"cannot decode sample {i}")
        return self.inner[i]


class _SlowDataset:
    """Wraps a dataset; each sample takes `ms` milliseconds more to load, as a large image would."""

    def __init__(self, inner, ms: float):
        self.inner, self.ms = inner, ms

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        import time

        time.sleep(self.ms / 1000)
        return self.inner[i]


def digits_slow(split: str = "test", ms: float = 10.0):
    """The digits split, each sample `ms` slower to load: a job large enough to be worth a pool."""
    from .inputs.data import digits

    return _SlowDataset(digits(split), ms)


def digits_failing(split: str = "test", fail_at: int = 0):
    """The digits split, with sample `fail_at` failing to load: for error-reporting tests."""
    from .inputs.data import digits

    return _FailingDataset(digits(split), fail_at)


def digits_killer(split: str = "train", kill_at: int = 0, marker: str | None = None):
    """The digits split, with a process that dies loading sample `kill_at`: for fault-tolerance tests."""
    from .inputs.data import digits

    return _KillingDataset(digits(split), kill_at, marker)


class _RandomImages:
    """`n` reproducible random images (image i is drawn from a generator seeded with i)."""

    def __init__(self, n: int, shape):
        self.n, self.shape = n, tuple(shape)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(i)
        return torch.randn(self.shape, generator=g), i % 10


def random_images(n: int = 1000, shape=(3, 224, 224)):
    """A dataset factory for benchmarks: decoding costs nothing, so timings measure calibration."""
    return _RandomImages(n, shape)


def fails(x):
    """A task body that raises in user code (tests of failure reporting)."""
    raise ValueError(f"no good: {x}")


def dies(x, marker: str | None = None):
    """A task body whose process SIGKILLs itself (once, if `marker` is given), else returns 2x."""
    import os
    import signal

    if marker is None or not os.path.exists(marker):
        if marker is not None:
            open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 2


def marked_digits_cnn(marker: str):
    """The demo model, leaving a marker file behind: tests check a model was (not) built."""
    from .demo import digits_cnn

    Path(marker).touch()
    return digits_cnn()


def digits_relabelled(split: str = "test"):
    """The digits split with every label moved to the next digit: a night whose new test data is
    mislabelled, which any model scores near zero on (tests of the accuracy gate)."""
    from torch.utils.data import TensorDataset

    from .inputs.data import digits

    x, y = digits(split).tensors
    return TensorDataset(x, (y + 1) % 10)


def tiny_cnn(channels: int = 3, num_classes: int = 3):
    """A small CNN for tests where the model is not the point (conv+relu, pooling, linear)."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


def one_hostile_layer():
    """The demo CNN with a layer `mix` between its features and its classifier: an identity on the
    64 features plus a 65th output that a ReLU always zeroes (weight -1000 on a non-negative
    feature). FP32 computes exactly the demo's logits; with per-tensor INT8 weights that one
    weight sets mix's scale so that its identity weights round to zero. Keeping `mix` alone in FP32
    repairs it; no activation range method can (tests of `quantray tune`'s layer search)."""
    import torch
    from torch import nn

    from .demo import digits_cnn

    class OneHostileLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn, self.mix, self.relu, self.fc = digits_cnn(), nn.Linear(64, 65), nn.ReLU(), nn.Linear(65, 10)
            with torch.no_grad():
                self.mix.weight.zero_()
                self.mix.weight[:64] = torch.eye(64)
                self.mix.weight[64, 0] = -1000.0
                self.mix.bias.zero_()
                self.fc.weight.zero_()
                self.fc.weight[:, :64] = self.cnn.fc.weight
                self.fc.bias.copy_(self.cnn.fc.bias)

        def forward(self, x):
            c = self.cnn
            x = c.avg(c.relu(c.conv3(c.pool(c.relu(c.conv2(c.relu(c.conv1(x))))))))
            return self.fc(self.relu(self.mix(torch.flatten(x, 1))))

    return OneHostileLayer().eval()


def hostile_convs():
    """The demo CNN with one more output channel in each convolution, weights -1000 on non-negative
    inputs (digits, and every ReLU's output), which its ReLU always zeroes and the next layer reads
    with weight 0: FP32 computes the demo's logits (to float rounding); with per-tensor INT8 weights each
    convolution's scale rounds its real weights to zero. No range method, equalization (the next
    layer's range on that channel is 0) or bias correction repairs them, and no single conv in FP32
    does: only the three together, the group of one kind (tests of `quantray tune`'s groups)."""
    import torch
    from torch import nn

    from .demo import DigitsCNN, digits_cnn

    trained = digits_cnn()

    class HostileConvs(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 17, 3, padding=1), nn.Conv2d(17, 33, 3, padding=1)
            self.conv3, self.fc = nn.Conv2d(33, 65, 3, padding=1), nn.Linear(65, 10)
            with torch.no_grad():
                for new, old in ((self.conv1, trained.conv1), (self.conv2, trained.conv2), (self.conv3, trained.conv3)):
                    new.weight.zero_()
                    new.weight[:-1, :old.in_channels] = old.weight
                    new.weight[-1] = -1000.0
                    new.bias.zero_()
                    new.bias[:-1] = old.bias
                self.fc.weight.zero_()
                self.fc.weight[:, :64] = trained.fc.weight
                self.fc.bias.copy_(trained.fc.bias)

    return HostileConvs().eval()


def data_dependent():
    """A model with data-dependent control flow (its output depends on a branch on the input's
    values): neither FX's symbolic tracing nor torch.export can take it."""
    import torch
    from torch import nn

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:
                y = y.relu()
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    return DataDependent().eval()


class MeanAbsMetric:
    """A user's metric (`[test] metric`), as core.metrics documents the protocol: the mean absolute
    error of the output named `output` (of the model's own structure) against float targets."""

    headline, higher_is_better = "mean_abs", False

    def __init__(self, output: str | None = None):
        self.output = output

    def state(self, output, target):
        from fractions import Fraction

        value = output[self.output] if self.output else output
        rows = (value.double() - target.double()).abs().reshape(len(target), -1).sum(dim=1).tolist()
        return [sum(map(Fraction, rows), Fraction(0)), target.numel()]

    def merge(self, a, b):
        return [a[0] + b[0], a[1] + b[1]]

    def value(self, s):
        return {"mean_abs": float(s[0] / s[1]), "values": s[1]}


def mean_abs_metric(output: str | None = None) -> MeanAbsMetric:
    """The factory `[test] metric = "quantray.testing:mean_abs_metric"` names."""
    return MeanAbsMetric(output)


def returns_list(**kwargs) -> list:
    """A metric factory that returns the wrong type (tests of its error message)."""
    return []


def dim_photo_patches(split: str = "train", factor: float = 0.1):
    """The photo patches (quantray.examples) darkened by `factor`: a night whose calibration data
    went wrong (an exposure fault), so activation ranges come out too narrow and INT8 clips the
    real test patches (tests of the label-free gate)."""
    from .examples import photo_patches

    patches = photo_patches(split)
    patches.x = patches.x * factor
    return patches


def mixed_targets(n: int = 4):
    """Samples with a tensor target, but sample 2 with none (tests of pack's target check)."""
    import torch

    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.zeros(1, 8, 8) if i == 2 else (torch.zeros(1, 8, 8), torch.ones(2))

    return Mixed()
