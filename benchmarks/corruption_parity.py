"""Statistical parity of engramlab's corruptions with the `imagecorruptions` package (ImageNet-C constants).

    /work/venv-corrupt/bin/python benchmarks/corruption_parity.py [--n 24 --size 64 --out runs/corruption_parity.json]

`imagecorruptions` (bethgelab, 1.1.2; needs numpy, Pillow, scikit-image, opencv-python, scipy and setuptools<81 for
pkg_resources) is not an engramlab dependency: install it in a separate environment that also sees engramlab, e.g.
`python -m venv --system-site-packages VENV; VENV/bin/pip install "setuptools<81" imagecorruptions`. Without it the
script prints how to get it and measures engramlab's side only.

For each of the 15 corruptions and severities 1-5, on the same clean images (two sets of `--n` images at `--size`
px: smooth random colour images, and MNIST digits upscaled to RGB), both sides are reduced to uint8 the same way
(imagecorruptions' `np.uint8`, which truncates) and scored by their mean PSNR to the clean image. Random corruptions
can only agree in distribution, so the table compares the mean PSNRs; for the deterministic ones (defocus, zoom,
brightness, contrast, pixelate, JPEG) it also gives the PSNR between the two outputs directly, and for motion blur,
glass blur, snow, fog and elastic it replays engramlab's random numbers into imagecorruptions and does the same.

imagecorruptions 1.1.2 breaks on current libraries: glass_blur calls skimage's `gaussian(multichannel=True)`
(removed in scikit-image 0.19+ deprecation cycle, gone in 0.26) and fog uses `np.float_` (removed in NumPy 2). The
script first records which corruptions fail as installed, then shims both (`channel_axis=-1`, `np.float_ =
np.float64`) so that all 15 are compared; the JSON lists the failures and the shims.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs
from engramlab.data import corruptions as C
from engramlab.data.corruptions import CORRUPTIONS, corrupt
from engramlab.data.mnist import load_mnist5k
from engramlab.results import write_json

DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression")


def clean_images(n: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two sets of n images [n, 3, size, size] in [0, 1], already on the uint8 grid."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    digits, _ = load_mnist5k()
    pick = torch.randperm(len(digits), generator=g)[:n].numpy()
    grey = torch.from_numpy(digits[pick].astype(np.float32) / 255)[:, None]  # [n, 1, 28, 28]
    grey = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    sets = {"smooth": smooth, "digits": grey.expand(-1, 3, -1, -1).contiguous()}
    return {k: torch.round(v * 255) / 255 for k, v in sets.items()}


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 arrays [n, ...] (capped at 100 dB for identical images)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-20)), 100.0)


def to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] in [0, 1] -> uint8 [n, H, W, 3], truncating like imagecorruptions' np.uint8."""
    return np.uint8(np.clip(x.permute(0, 2, 3, 1).numpy() * 255, 0, 255))


def load_theirs():
    """The imagecorruptions package (shimmed) and which corruptions fail as installed; None when it is missing."""
    try:
        import imagecorruptions
        import imagecorruptions.corruptions as ic
    except ImportError as err:
        print(
            f"imagecorruptions is not importable ({err}); measuring engramlab's side only. Install it in a "
            "separate venv: python -m venv --system-site-packages VENV && "
            "VENV/bin/pip install 'setuptools<81' imagecorruptions, then run this script with VENV/bin/python."
        )
        return None, {}
    probe = np.full((32, 32, 3), 128, np.uint8)
    failures = {}
    for name in CORRUPTIONS:
        try:
            imagecorruptions.corrupt(probe, severity=1, corruption_name=name)
        except Exception as err:
            failures[name] = f"{type(err).__name__}: {err}"
    from skimage.filters import gaussian

    def gaussian_shim(image, sigma=1, multichannel=None, **kwargs):
        return gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **kwargs)

    ic.gaussian = gaussian_shim  # scikit-image >= 0.26 dropped `multichannel`
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # NumPy 2 dropped the alias that plasma_fractal uses
    return imagecorruptions, failures


class _TorchFedNumpy:
    """Stand-ins for np.random.uniform / normal / randint that replay a torch generator's stream, in the order and
    shapes in which engramlab's corruptions draw (one image at a time), so that both sides see the same noise."""

    def __init__(self, seed: int, uniform_dtype: torch.dtype):
        self.generator = torch.Generator().manual_seed(seed)
        self.uniform_dtype = uniform_dtype

    def uniform(self, low=0.0, high=1.0, size=None):
        shape = tuple(np.atleast_1d(size)) if size is not None else (1,)
        u = torch.rand(shape, generator=self.generator, dtype=self.uniform_dtype).numpy()
        u = low + (high - low) * u
        return u if size is not None else float(u[0])

    def normal(self, loc=0.0, scale=1.0, size=None):
        return loc + scale * torch.randn(tuple(np.atleast_1d(size)), generator=self.generator).numpy()


def shared_noise_parity(theirs_module, x: torch.Tensor) -> dict[str, list[float]]:
    """PSNR between the two sides when imagecorruptions is fed engramlab's random numbers (one image per call).

    Covers the random corruptions whose draws can be replayed: motion_blur, fog, snow, elastic_transform
    (np.random.uniform / normal patched) and glass_blur (np.random.randint patched with engramlab's offsets).
    Not covered: the noises (different samplers for the same distributions) and frost (a stand-in texture).
    """
    from PIL import Image

    clean = to_uint8_hwc(x)
    out: dict[str, list[float]] = {}
    saved = np.random.uniform, np.random.normal, np.random.randint
    try:
        for name, dtype in (
            ("motion_blur", torch.float32),
            ("fog", torch.float64),
            ("snow", torch.float32),
            ("elastic_transform", torch.float32),
            ("glass_blur", None),
        ):
            out[name] = []
            for severity in range(1, 6):
                scores = []
                for k in range(len(x)):
                    ours = to_uint8_hwc(
                        corrupt(x[k : k + 1], name, severity, torch.Generator().manual_seed(k), constants="imagenet")
                    )
                    if name == "glass_blur":
                        _, delta, iterations = C._CONSTANTS["imagenet"]["glass_blur"][severity - 1]
                        h, w = x.shape[-2:]
                        steps = iterations * (h - 2 * delta) * (w - 2 * delta)
                        offsets = torch.randint(-delta, delta, (steps, 2), generator=torch.Generator().manual_seed(k))
                        replay = iter(offsets.numpy())
                        np.random.randint = lambda low, high, size=None, replay=replay: next(replay)
                    else:
                        feed = _TorchFedNumpy(k, dtype)
                        np.random.uniform, np.random.normal = feed.uniform, feed.normal
                    ref = np.uint8(getattr(theirs_module, name)(Image.fromarray(clean[k]), severity))
                    np.random.uniform, np.random.normal, np.random.randint = saved
                    scores.append(float(psnr(ours, ref[None])[0]))
                out[name].append(float(np.mean(scores)))
    finally:
        np.random.uniform, np.random.normal, np.random.randint = saved
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24, help="images per set")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (imagecorruptions needs >= 32)")
    parser.add_argument("--out", default="runs/corruption_parity.json", help="JSON result file (runs/ is git-ignored)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    package, failures = load_theirs()
    theirs = package.corrupt if package else None
    sets = clean_images(args.n, args.size)
    rows = []
    header = f"{'corruption':18s} sev " + "  ".join(f"{s + ' ours':>11s} {s + ' theirs':>13s}" for s in sets)
    header += "  direct" if theirs else ""
    print(header)
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            row = {"corruption": name, "severity": severity}
            line = f"{name:18s} {severity:3d} "
            direct = []
            for set_name, x in sets.items():
                clean = to_uint8_hwc(x)
                start = time.perf_counter()
                ours = to_uint8_hwc(
                    corrupt(x, name, severity, torch.Generator().manual_seed(severity), constants="imagenet")
                )
                row[f"{set_name}_ours_ms_per_image"] = 1000 * (time.perf_counter() - start) / len(x)
                row[f"{set_name}_ours_psnr"] = float(psnr(ours, clean).mean())
                line += f"{row[f'{set_name}_ours_psnr']:11.2f} "
                if theirs is None:
                    line += f"{'-':>13s}  "
                    continue
                np.random.seed(severity)
                start = time.perf_counter()
                ref = np.stack([theirs(img, severity=severity, corruption_name=name) for img in clean])
                row[f"{set_name}_theirs_ms_per_image"] = 1000 * (time.perf_counter() - start) / len(x)
                row[f"{set_name}_theirs_psnr"] = float(psnr(ref, clean).mean())
                line += f"{row[f'{set_name}_theirs_psnr']:13.2f}  "
                if name in DETERMINISTIC:
                    direct.append(float(psnr(ours, ref).mean()))
            if direct:
                row["direct_psnr"] = float(np.mean(direct))
                line += f"{row['direct_psnr']:6.1f}"
            rows.append(row)
            print(line)
    shared = {}
    if package is not None:
        shared = shared_noise_parity(package.corruptions, sets["smooth"][:4])
        print("PSNR ours vs theirs with the same random numbers (4 smooth images), severities 1-5:")
        for name, values in shared.items():
            print(f"{name:18s} " + " ".join(f"{v:6.1f}" for v in values))
    summary = {
        "machine": cpu_name(),
        "n_per_set": args.n,
        "size": args.size,
        "constants": "imagenet",
        "reference": "imagecorruptions 1.1.2" if theirs else None,
        "reference_failures_as_installed": failures,
        "reference_shims": ["skimage gaussian(multichannel=True) -> channel_axis=-1", "np.float_ = np.float64"]
        if theirs
        else [],
        "rows": rows,
        "shared_noise_direct_psnr": shared,
    }
    write_json(args.out, summary)
    print(f"wrote {args.out} ({cpu_name()})")


if __name__ == "__main__":
    main()
