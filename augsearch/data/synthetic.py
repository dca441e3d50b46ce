"""The bundled class-imbalanced phantom benchmark (2D or 3D), written in the nnU-Net raw layout.

Each case is an abdomen-like phantom: a body outline, background blobs, tubes and a bright spine-like disk, a large
oriented bean-shaped organ (label 1, notch on its local -x side) and, in 3 of 4 cases, a small darker lesion (label 2,
at most 1% of voxels) at the organ's local +x border. In 60% of cases an unlabelled "decoy" spot with the lesion's size
and intensity sits on the organ's -x half, so the side of the organ is the cue that tells a lesion from a decoy.
A smooth multiplicative bias field, partial-volume blur, Gaussian noise and (wide distribution) a gamma follow.
Training cases come from a narrow distribution; validation and test cases from a wider one, unless a `shift` is
planted: then val/test come from the training distribution and differ by the named shift alone (see `SHIFTS`).
Everything is deterministic from the seed: case i draws from `numpy.random.default_rng([seed, i])`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from augsearch.errors import DatasetError

SHIFTS: tuple[str, ...] = ("flip_x", "rot90_xy", "gamma_up", "gamma_down", "fg_gamma_up")
FG_SHIFT_REACH_MM = 6.0  # fg_gamma_up: full effect up to this distance from the labelled foreground ...
FG_SHIFT_FADE_MM = 6.0  # ... fading linearly to none over this distance beyond it
LABELS = {"background": 0, "organ": 1, "lesion": 2}
DEFAULT_SIZE = {2: 96, 3: 48}
SPACING = {2: (1.0, 1.0), 3: (1.0, 1.0, 1.5)}
LESION_EVERY = 4  # case i has no lesion when i % 4 == 3
INTENSITY_SCALE = 1000.0  # stored values: phantom intensities in [0, ~1] times this

# Ranges of the case parameters: (training distribution, validation/test distribution without a planted shift).
_NARROW = {"angle_deg": 8.0, "scale": (0.95, 1.05), "jitter": 0.02, "gamma": (1.0, 1.0), "noise": (0.03, 0.03),
           "blur": (0.5, 0.5), "bias": 0.10}
_WIDE = {"angle_deg": 25.0, "scale": (0.8, 1.2), "jitter": 0.05, "gamma": (0.75, 1.33), "noise": (0.02, 0.07),
         "blur": (0.3, 1.2), "bias": 0.25}


def apply_shift(image: np.ndarray, label: np.ndarray, shift: str) -> tuple[np.ndarray, np.ndarray]:
    """Apply a named shift to a spatial `(*S)` image and label.

    flip_x: mirror along voxel axis 0 (x). rot90_xy: `np.rot90(k=1, axes=(0, 1))`. gamma_up / gamma_down: with
    lo, hi the image's min and max, `lo + (hi - lo) * ((x - lo) / (hi - lo)) ** g`, g = 0.5 (brighter) or 2 (darker).
    fg_gamma_up: gamma_up only around the labelled structures (organ and lesion; full effect up to
    FG_SHIFT_REACH_MM, fading out over FG_SHIFT_FADE_MM), the rest unchanged: patches centred on foreground see the
    shift, most background-centred patches do not, so the right training augmentation differs between the groups.
    """
    if shift == "flip_x":
        return np.ascontiguousarray(image[::-1]), np.ascontiguousarray(label[::-1])
    if shift == "rot90_xy":
        return np.ascontiguousarray(np.rot90(image, 1, (0, 1))), np.ascontiguousarray(np.rot90(label, 1, (0, 1)))
    if shift in ("gamma_up", "gamma_down"):
        return _gamma(image, 0.5 if shift == "gamma_up" else 2.0), label
    if shift == "fg_gamma_up":
        weight = _near_foreground(label, SPACING[image.ndim])
        return (weight * _gamma(image, 0.5) + (1.0 - weight) * image).astype(np.float32), label
    raise DatasetError("--shift", f"one of {list(SHIFTS)}", repr(shift), "pick a listed shift or leave it out")


def _near_foreground(label: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """(*S) float32 in [0, 1]: 1 within FG_SHIFT_REACH_MM of a labelled voxel, 0 beyond reach + fade, linear between."""
    from scipy import ndimage

    if not label.any():
        return np.zeros(label.shape, np.float32)
    distance = ndimage.distance_transform_edt(label == 0, sampling=spacing)
    return np.clip(1.0 - (distance - FG_SHIFT_REACH_MM) / FG_SHIFT_FADE_MM, 0.0, 1.0).astype(np.float32)


def _gamma(image: np.ndarray, g: float) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    unit = (image - lo) / max(hi - lo, 1e-8)
    return (lo + (hi - lo) * unit**g).astype(np.float32)


def _grid(size: int, dims: int) -> tuple[list[np.ndarray], float]:
    """Voxel-centre coordinates in mm, centred on the field of view; L = the x/y field of view in mm."""
    spacing = SPACING[dims]
    axes = [(np.arange(size) - (size - 1) / 2) * s for s in spacing]
    return np.meshgrid(*axes, indexing="ij"), size * spacing[0]


def _ellipsoid(coords, centre, radii) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)) <= 1.0


def phantom_case(rng: np.random.Generator, size: int, dims: int, wide: bool, lesion: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: `(image (*S) float32, label (*S) uint8)` with S = (size,) * dims, intensities in [0, ~1]."""
    from scipy import ndimage

    p = _WIDE if wide else _NARROW
    coords, fov = _grid(size, dims)
    fov_z = size * SPACING[dims][-1]
    image = np.zeros(coords[0].shape, np.float32)
    z_axis = (lambda frac: [frac * fov_z]) if dims == 3 else (lambda frac: [])
    centre_z = [0.0] if dims == 3 else []

    organ_mean = rng.uniform(0.58, 0.66)
    body = _ellipsoid(coords, [0.0, 0.0] + centre_z, [0.44 * fov, 0.36 * fov] + z_axis(0.48))
    image[body] = rng.uniform(0.27, 0.33)
    for k in range(4):  # soft-tissue blobs; the first has a lesion-like intensity, so intensity alone is no cue
        angle, radius = rng.uniform(0, 2 * math.pi), 0.75 * math.sqrt(rng.uniform())
        centre = [radius * 0.44 * fov * math.cos(angle), radius * 0.36 * fov * math.sin(angle)]
        centre += [rng.uniform(-0.3, 0.3) * fov_z] if dims == 3 else []
        r = rng.uniform(0.04, 0.10) * fov
        value = organ_mean - rng.uniform(0.12, 0.2) if k == 0 else rng.uniform(0.2, 0.75)
        blob = _ellipsoid(coords, centre, [r, r * rng.uniform(0.6, 1.4)] + z_axis(rng.uniform(0.05, 0.15)))
        image[blob & body] = value
    for _ in range(2):  # vessels: thick line segments
        a = rng.uniform(-0.3, 0.3, dims) * np.array([fov, fov, fov_z][:dims])
        b = rng.uniform(-0.3, 0.3, dims) * np.array([fov, fov, fov_z][:dims])
        image[(_segment_distance(coords, a, b) <= rng.uniform(0.01, 0.02) * fov) & body] = rng.uniform(0.6, 0.9)
    spine = _ellipsoid(coords, [0.0, -0.25 * fov] + centre_z, [0.07 * fov, 0.07 * fov] + z_axis(0.6))
    image[spine] = 0.9

    # Organ frame: rotation in the x-y plane about the organ centre; u, v local in-plane axes, w = z.
    theta = math.radians(rng.uniform(-p["angle_deg"], p["angle_deg"]))
    scale = rng.uniform(*p["scale"])
    centre = np.array([-0.14 * fov, 0.03 * fov]) + rng.uniform(-p["jitter"], p["jitter"], 2) * fov
    dx, dy = coords[0] - centre[0], coords[1] - centre[1]
    u = math.cos(theta) * dx + math.sin(theta) * dy
    v = -math.sin(theta) * dx + math.cos(theta) * dy
    local = [u, v] + ([coords[2]] if dims == 3 else [])
    a, b = 0.16 * fov * scale, 0.26 * fov * scale
    b_signed = np.where(v > 0, 1.1 * b, 0.9 * b)  # egg-shaped: the +v pole is larger
    radii = [a, b_signed] + z_axis(0.22 * scale)
    organ = _ellipsoid(local, [0.0, 0.0] + centre_z, radii)
    organ &= ~_ellipsoid(local, [-a, 0.0] + centre_z, [0.5 * a, 0.35 * b] + z_axis(0.11 * scale))
    texture = ndimage.gaussian_filter(rng.standard_normal(image.shape), 2.0)
    texture *= 0.04 / max(float(texture.std()), 1e-8)
    image[organ] = organ_mean + texture[organ]

    r_frac = (0.035, 0.05) if dims == 2 else (0.06, 0.09)
    label = organ.astype(np.uint8)
    if rng.uniform() < 0.6:  # decoy on the -u half: lesion-like but unlabelled
        r = rng.uniform(*r_frac) * fov * scale
        spot = _ellipsoid(local, [-0.45 * a, rng.choice([-1, 1]) * rng.uniform(0.45, 0.6) * b] + centre_z,
                          [r, r] + ([r] if dims == 3 else []))
        image[spot & organ] = organ_mean - rng.uniform(0.12, 0.2) + texture[spot & organ]
    if lesion:
        # Cap the radius so the lesion stays below 1% of the voxels even at the largest scale.
        fov_volume = fov ** 2 * (fov_z if dims == 3 else 1.0)
        if dims == 2:
            r_max = (0.009 * fov_volume / math.pi) ** 0.5
        else:
            r_max = (0.009 * fov_volume * 3 / (4 * math.pi)) ** (1 / 3)
        r = min(rng.uniform(*r_frac) * fov * scale, r_max)
        spot = _ellipsoid(local, [0.65 * a, rng.uniform(-0.45, 0.45) * b] + centre_z,
                          [r, r] + ([r] if dims == 3 else []))
        image[spot] = organ_mean - rng.uniform(0.12, 0.2) + texture[spot]
        label[spot] = LABELS["lesion"]

    norm = [c / (0.5 * e) for c, e in zip(coords, [fov, fov, fov_z][:dims])]
    log_bias = sum(rng.uniform(-p["bias"], p["bias"]) * n for n in norm)
    log_bias = log_bias + sum(rng.uniform(-p["bias"], p["bias"]) * n * n for n in norm)
    image = image * np.exp(log_bias)
    image = ndimage.gaussian_filter(image, rng.uniform(*p["blur"]))
    gamma = math.exp(rng.uniform(math.log(p["gamma"][0]), math.log(p["gamma"][1])))
    if gamma != 1.0:
        image = _gamma(image, gamma)
    image = image + rng.normal(0.0, rng.uniform(*p["noise"]), image.shape)
    return image.astype(np.float32), label


def _segment_distance(coords, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = sum((c - ai) * d for c, ai, d in zip(coords, a, ab)) / max(float(ab @ ab), 1e-8)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(sum((c - (ai + t * d)) ** 2 for c, ai, d in zip(coords, a, ab)))


def benchmark_split(cases: int, train_cases: int) -> dict[str, list[str]]:
    """Cases 0..train_cases-1 train; of the rest the first half (rounded up) validates, the others test."""
    ids = [f"case_{i:03d}" for i in range(cases)]
    n_val = (cases - train_cases + 1) // 2
    return {"train": ids[:train_cases], "val": ids[train_cases:train_cases + n_val],
            "test": ids[train_cases + n_val:]}


def generate_case(index: int, *, dims: int, size: int, seed: int, role: str, shift: str | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Case `index` of a benchmark: role 'train' (narrow), 'val'/'test' (wide, or narrow + `shift`)."""
    rng = np.random.default_rng([seed, index])
    wide = role != "train" and shift is None
    image, label = phantom_case(rng, size, dims, wide, lesion=index % LESION_EVERY != LESION_EVERY - 1)
    if role != "train" and shift is not None:
        image, label = apply_shift(image, label, shift)
    return image, label


def _affine(dims: int, size: int) -> np.ndarray:
    spacing = list(SPACING[dims]) + [1.0] * (3 - dims)
    affine = np.diag(spacing + [1.0])
    affine[:3, 3] = [-(size - 1) / 2 * s for s in spacing[:dims]] + [0.0] * (3 - dims)
    return affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path, dims: int) -> None:
    import nibabel as nib

    data = array[..., None] if dims == 2 else array  # 2D cases are stored as (X, Y, 1)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_benchmark(out: str | Path, *, dims: int, cases: int, train_cases: int, size: int | None = None, seed: int = 0,
                    shift: str | None = None) -> Path:
    """Write the benchmark to `out` (created; must not exist or be empty) and return it.

    Files: dataset.json, splits.json, imagesTr/case_NNN_0000.nii.gz and labelsTr/case_NNN.nii.gz for every case
    (train, val and test), imagesTs/case_NNN_0000.nii.gz copies of the test images. Written in a temporary folder
    beside `out` and renamed, so a reader never sees a half-written dataset.
    """
    out = Path(out)
    if dims not in (2, 3):
        raise DatasetError("--dims", "2 or 3", repr(dims), "pass --dims 2 or --dims 3")
    if shift is not None and shift not in SHIFTS:
        raise DatasetError("--shift", f"one of {list(SHIFTS)}", repr(shift), "pick a listed shift or leave it out")
    if not 1 <= train_cases <= cases - 2:
        raise DatasetError("--train-cases", f"1..{cases - 2} (leaving at least one val and one test case)",
                           f"{train_cases} of {cases} cases", "lower --train-cases or raise --cases")
    size = DEFAULT_SIZE[dims] if size is None else int(size)
    if size < 24:
        raise DatasetError("--size", "an edge of at least 24 voxels", str(size), "pass a larger --size")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(out, "a new or empty folder", "an existing non-empty path",
                           "choose another --out or remove the folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        split = benchmark_split(cases, train_cases)
        role = {cid: name for name, ids in split.items() for cid in ids}
        affine = _affine(dims, size)
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        for i in range(cases):
            cid = f"case_{i:03d}"
            image, label = generate_case(i, dims=dims, size=size, seed=seed, role=role[cid], shift=shift)
            _save(image * np.float32(INTENSITY_SCALE), affine, tmp / "imagesTr" / f"{cid}_0000.nii.gz", dims)
            _save(label.astype(np.uint8), affine, tmp / "labelsTr" / f"{cid}.nii.gz", dims)
            if role[cid] == "test":
                shutil.copyfile(tmp / "imagesTr" / f"{cid}_0000.nii.gz", tmp / "imagesTs" / f"{cid}_0000.nii.gz")
        meta = {
            "name": f"augsearch-bench{dims}d" + (f"-{shift}" if shift else ""),
            "description": "augsearch phantom benchmark: large organ (1), rare lesion (2); see experiments/README.md",
            "channel_names": {"0": "MR"},
            "labels": dict(LABELS),
            "numTraining": cases,
            "file_ending": ".nii.gz",
            "dims": dims,
            "tensorImageSize": f"{dims}D",
            "synth": {"dims": dims, "cases": cases, "train_cases": train_cases, "size": size, "seed": seed,
                      "shift": shift},
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "splits.json").write_text(json.dumps(split, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.is_dir() and (out / "dataset.json").is_file():
            return out  # another process finished the same dataset first
        raise
    return out


def ensure_dataset(cfg) -> Path:
    """Return `cfg.root` (a `DataConfig`); when it has no dataset.json, write the benchmark of `cfg.synth` there if
    `cfg.generate` asks for it, else refuse naming the path."""
    root = Path(cfg.root)
    if (root / "dataset.json").is_file():
        return root
    if not cfg.generate:
        found = "no dataset.json in that folder" if root.is_dir() else "no such folder"
        raise DatasetError(root / "dataset.json", "a dataset (data.root)", found,
                           "check data.root for a typo; to write the bundled benchmark there instead, set "
                           "data.generate = true with a [data.synth] section")
    print(f"data.root {root} has no dataset.json: writing the benchmark of [data.synth] there (data.generate = true)",
          file=sys.stderr, flush=True)
    s = cfg.synth
    return write_benchmark(root, dims=s.dims, cases=s.cases, train_cases=s.train_cases, size=s.size, seed=s.seed,
                           shift=s.shift)
