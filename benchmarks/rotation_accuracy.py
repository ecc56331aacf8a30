"""Accuracy and speed of `deepdewedge.rotation.rotate_and_crop` against scipy's cubic spline.

Ground truth: a sum of plane waves ``f(x) = Σ cos(2π k·x + φ)`` with random directions, random
phases and ``|k|`` uniform in ``[0, K_MAX]`` cycles/voxel (much more fine detail than a tomogram
has), sampled on the lattice. Its rotation ``f(Rᵀ p)`` is evaluated exactly, so interpolation
errors are measured against the continuous function, not against another interpolator.

Run: ``python benchmarks/rotation_accuracy.py [--size 64] [--n-rotations 8]``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import scipy.ndimage as ndi
import torch

from deepdewedge.rotation import bspline_prefilter, rotate_and_crop, sample_rotations

K_MAX = 0.45  # cycles/voxel; every component stays below Nyquist, so sampling is alias-free
METHODS = ("ours linear", "ours cubic", "scipy cubic")


def centred_points(shape: tuple[int, int, int]) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def random_directions(n: int, generator: torch.Generator) -> torch.Tensor:
    v = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def plane_waves(points: torch.Tensor, freqs: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Σ_j cos(2π k_j·p + φ_j) at `points` `(..., 3)`; `freqs` `(m, 3)`, `phases` `(m,)`."""
    out = torch.zeros(points.shape[:-1], dtype=torch.float64)
    for k, phi in zip(freqs, phases, strict=True):
        out += torch.cos(2 * math.pi * (points @ k) + phi)
    return out


def rotate(method: str, vols: torch.Tensor, rots: torch.Tensor, size: int) -> torch.Tensor:
    """Rotate `(b, n, n, n)` float64 volumes by `(b, 3, 3)` rotations; returns float64."""
    if method == "scipy cubic":
        centre = (vols.shape[-1] - 1) / 2
        pts = centred_points((size,) * 3)
        outs = []
        for vol, rot in zip(vols, rots, strict=True):
            source = (pts @ rot + centre).permute(3, 0, 1, 2).numpy()  # Rᵀ p, row form
            outs.append(ndi.map_coordinates(vol.numpy(), source, order=3, mode="mirror"))
        return torch.from_numpy(np.stack(outs))
    interpolation = method.split()[1]
    out = rotate_and_crop(vols.float(), rots.float(), size, interpolation=interpolation)
    return out.double()


def rel_rmse(est: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    err = (est - ref)[:, mask].pow(2).mean()
    return math.sqrt(err / ref[:, mask].pow(2).mean())


def accuracy(size: int, n_rot: int, n_waves: int, seed: int) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (size,) * 3
    pts = centred_points(shape)
    inside = torch.linalg.vector_norm(pts, dim=-1) <= size / 2 - 4
    rots = sample_rotations(n_rot, generator=gen, dtype=torch.float64)
    results: dict[str, dict[str, float]] = {m: {} for m in METHODS}

    # (a) round trip and (b) analytic rotation of a broadband sum of plane waves.
    vols, truths = [], []
    for rot in rots:
        mags = K_MAX * torch.rand(n_waves, 1, generator=gen, dtype=torch.float64)
        freqs = mags * random_directions(n_waves, gen)
        phases = 2 * math.pi * torch.rand(n_waves, generator=gen, dtype=torch.float64)
        vols.append(plane_waves(pts, freqs, phases))
        truths.append(plane_waves(pts, freqs @ rot.T, phases))  # f(Rᵀp) has wave vectors R k
    vols_t, truths_t = torch.stack(vols), torch.stack(truths)
    for method in METHODS:
        rotated = rotate(method, vols_t, rots, size)
        back = rotate(method, rotated, rots.transpose(-1, -2), size)
        results[method]["round trip"] = rel_rmse(back, vols_t, inside)
        results[method]["vs analytic"] = rel_rmse(rotated, truths_t, inside)

    # (c) attenuation: single plane waves at one frequency, power after / before in the ball.
    for shell in (0.1, 0.25, 0.4):
        freqs = shell * random_directions(n_rot, gen)
        phases = 2 * math.pi * torch.rand(n_rot, generator=gen, dtype=torch.float64)
        waves = list(zip(freqs, phases, rots, strict=True))
        vols_s = torch.stack([plane_waves(pts, k[None], p[None]) for k, p, _ in waves])
        truth_s = torch.stack([plane_waves(pts, (r @ k)[None], p[None]) for k, p, r in waves])
        for method in METHODS:
            rotated = rotate(method, vols_s, rots, size)
            power = rotated[:, inside].pow(2).sum() / truth_s[:, inside].pow(2).sum()
            results[method][f"power {shell}"] = power.item()
            results[method][f"err {shell}"] = rel_rmse(rotated, truth_s, inside)
    return results


def timing(size: int, batch: int, channels: int, margin: float, repeats: int) -> dict[str, float]:
    in_size = math.ceil(margin * size)
    in_size += (in_size - size) % 2  # even margin: the identity is an exact crop
    gen = torch.Generator().manual_seed(0)
    vols = torch.randn(batch, channels, in_size, in_size, in_size, generator=gen)
    rots = sample_rotations(batch, generator=gen)
    pts = centred_points((size,) * 3)
    centre = (in_size - 1) / 2

    def scipy_batch() -> None:
        for vol, rot in zip(vols.numpy(), rots.double(), strict=True):
            source = (pts @ rot + centre).permute(3, 0, 1, 2).numpy()
            for channel in vol:
                ndi.map_coordinates(channel, source, order=3, mode="mirror")

    runs = {
        "ours linear": lambda: rotate_and_crop(vols, rots, size, interpolation="linear"),
        "ours cubic": lambda: rotate_and_crop(vols, rots, size, interpolation="cubic"),
        "ours cubic, prefilter only": lambda: bspline_prefilter(vols),
        "scipy cubic": scipy_batch,
    }
    times: dict[str, float] = {}
    for name, run in runs.items():
        run()  # warm-up
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        times[name] = best
    times["in_size"] = in_size
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="output cube size (voxels)")
    parser.add_argument("--n-rotations", type=int, default=8)
    parser.add_argument("--n-waves", type=int, default=64, help="plane waves per test volume")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--margin", type=float, default=1.8, help="input size / output size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    res = accuracy(args.size, args.n_rotations, args.n_waves, args.seed)
    print(
        f"## Accuracy: {args.size}³, {args.n_rotations} random rotations, relative RMSE in the "
        f"central ball of radius {args.size / 2 - 4:g} voxels\n"
    )
    print(
        f"Test volumes: {args.n_waves} plane waves, |k| uniform in [0, {K_MAX}] cycles/voxel. "
        "Power ratio = power of the rotated volume / power of the exact rotation, for single "
        "plane waves at |k| = 0.1, 0.25, 0.4 cycles/voxel (1 = no attenuation).\n"
    )
    cols = ["round trip", "vs analytic", "err 0.25", "err 0.4", "power 0.1", "power 0.25"]
    cols.append("power 0.4")
    header = ["method", *(c.replace("err", "error at") for c in cols)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method in METHODS:
        cells = [f"{res[method][c]:.4f}" for c in cols]
        print(f"| {method} | " + " | ".join(cells) + " |")

    t = timing(args.size, args.batch, args.channels, args.margin, args.repeats)
    print(
        f"\n## Time per batch on CPU ({torch.get_num_threads()} threads): b={args.batch}, "
        f"c={args.channels}, {t['in_size']}³ -> {args.size}³, best of {args.repeats}\n"
    )
    print("| method | seconds | vs ours cubic |")
    print("|---|---|---|")
    for method in (*METHODS[:2], "ours cubic, prefilter only", METHODS[2]):
        print(f"| {method} | {t[method]:.3f} | {t[method] / t['ours cubic']:.2f}x |")


if __name__ == "__main__":
    main()
