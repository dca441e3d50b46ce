"""Property tests of every reader of user files: any input loads or raises AugsearchError with a message.

Policy files, configs (TOML and overrides), dataset.json, NIfTI files (nibabel-written with random shapes, dtypes
and header fields, and raw bytes) and checkpoints (random bytes, cut or damaged real ones). Example counts are
small so the whole module runs in well under a minute; hypothesis keeps failing examples in its database.
"""

from __future__ import annotations

import gzip
import json
import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_predict import _checkpoint

from augsearch.artifacts.checkpoint import load_checkpoint
from augsearch.config import apply_overrides, config_from_dict, load_config
from augsearch.data.check import check_dataset
from augsearch.data.dataset import read_dataset_info
from augsearch.data.nifti import read_image, read_label
from augsearch.errors import AugsearchError
from augsearch.policy.io import load_policy
from augsearch.policy.presets import POLICIES_DIR
from augsearch.tune.space import config_keys

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.toml"
PRESETS = sorted((POLICIES_DIR / "presets").glob("*.json"))
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=5)
                           | st.dictionaries(st.text(max_size=12), kids, max_size=5), max_leaves=25)


@contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="augsearch-fuzz-") as tmp:
        yield Path(tmp)


def loads_or_refuses(read, *args):
    """Call READ; only a result or an AugsearchError with a message may come out."""
    try:
        return read(*args)
    except AugsearchError as err:
        assert str(err).strip(), "an error without a message"
        return None


def file_loads_or_refuses(read, name: str, data: bytes):
    """Write DATA to a scratch file called NAME and read it with READ, as loads_or_refuses does."""
    with scratch() as tmp:
        (tmp / name).write_bytes(data)
        return loads_or_refuses(read, tmp / name)


def _paths(tree, prefix=()):
    """Every (path, value) inside a JSON tree, the root included."""
    yield prefix, tree
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _paths(value, (*prefix, i))


def _replace(tree, path, value):
    if not path:
        return value
    tree = json.loads(json.dumps(tree))
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return tree


@st.composite
def mutated(draw, document):
    """DOCUMENT with one value somewhere (or the whole) replaced by random JSON."""
    paths = [p for p, _ in _paths(document)]
    return _replace(document, draw(st.sampled_from(paths)), draw(json_values))


def _dump(value) -> str:
    return json.dumps(value, allow_nan=True)


# ----------------------------------------------------------------------------------------------- policy files


@FUZZ
@given(st.binary(max_size=300))
def test_policy_file_random_bytes(data):
    file_loads_or_refuses(load_policy, "p.json", data)


@FUZZ
@given(st.data())
def test_policy_file_one_value_replaced(data):
    preset = data.draw(st.sampled_from(PRESETS))
    doc = data.draw(mutated(json.loads(preset.read_text())))
    file_loads_or_refuses(load_policy, "p.json", _dump(doc).encode())


# ----------------------------------------------------------------------------------------------- configs


@FUZZ
@given(st.binary(max_size=300))
def test_config_random_bytes(data):
    file_loads_or_refuses(load_config, "c.toml", data)


@FUZZ
@given(st.sampled_from(config_keys()), st.text(max_size=40))
def test_config_override_of_any_key_with_any_text(key, text):
    loads_or_refuses(load_config, SMOKE, [f"{key}={text}"])


@FUZZ
@given(st.data())
def test_config_tree_one_value_replaced(data):
    base = load_config(SMOKE).to_dict()
    loads_or_refuses(config_from_dict, data.draw(mutated(base)))


@FUZZ
@given(st.lists(st.text(max_size=20), max_size=4))
def test_override_strings(overrides):
    loads_or_refuses(lambda: config_from_dict(apply_overrides(load_config(SMOKE).to_dict(), overrides)))


# ----------------------------------------------------------------------------------------------- dataset.json


def _one_case_dataset(root: Path, meta_text: str | bytes) -> Path:
    shape = (8, 8, 4)
    for sub, name, array in (("imagesTr", "c_0000.nii.gz", np.ones(shape, np.float32)),
                             ("labelsTr", "c.nii.gz", (np.arange(np.prod(shape)) % 2).reshape(shape).astype(np.uint8))):
        (root / sub).mkdir(parents=True, exist_ok=True)
        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(root / sub / name))
    path = root / "dataset.json"
    path.write_bytes(meta_text) if isinstance(meta_text, bytes) else path.write_text(meta_text)
    return root


VALID_META = {"labels": {"background": 0, "organ": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
              "numTraining": 1, "dims": 3}


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(VALID_META).map(_dump)))
def test_dataset_json(meta):
    with scratch() as tmp:
        root = _one_case_dataset(tmp / "d", meta)
        loads_or_refuses(read_dataset_info, root)
        problems = check_dataset(root)  # a list of problems, never an exception
        assert all(str(p) for p in problems)


# ----------------------------------------------------------------------------------------------- NIfTI

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float32, np.float64, np.complex64]
odd_floats = st.sampled_from([0.0, -1.0, 1e-30, 1e30, math.inf, -math.inf, math.nan, 1.0, 2.5])


@st.composite
def nifti_files(draw):
    """(bytes of a .nii.gz) nibabel wrote from random shape, dtype, spacing, scaling and header codes."""
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=5)))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    array = (rng.normal(size=shape) * draw(st.sampled_from([1.0, 3.0, 1e6, 1e300]))).astype(dtype)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([draw(odd_floats) for _ in range(3)])
    try:  # what nibabel itself refuses to write is no input our readers can meet
        image = nibabel.Nifti1Image(array, affine, dtype=array.dtype)
        image.header.set_zooms(tuple(draw(st.floats(-2, 5, allow_nan=False)) for _ in shape))
        image.header["scl_slope"], image.header["scl_inter"] = draw(odd_floats), draw(odd_floats)
        image.set_qform(affine, code=draw(st.integers(0, 4)))
        image.set_sform(affine, code=draw(st.integers(0, 4)))
        blob = image.to_bytes()
    except Exception:  # noqa: BLE001 - nibabel raises many types for headers it cannot write
        assume(False)
    return gzip.compress(blob, compresslevel=1)


@FUZZ
@given(st.one_of(nifti_files(), st.binary(max_size=400), nifti_files().map(lambda b: b[: len(b) // 2])),
       st.sampled_from([None, 2, 3]))
def test_nifti_image_and_label(data, dims):
    with scratch() as tmp:
        path = tmp / "x.nii.gz"
        path.write_bytes(data)
        image = loads_or_refuses(read_image, path, dims)
        if image is not None:
            assert image[0].dtype == np.float32 and np.isfinite(image[0]).all()
        loads_or_refuses(read_label, path, dims or 3, {"background": 0, "organ": 1})


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> Path:
    return Path(_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", 2))


@FUZZ
@given(st.data())
def test_checkpoint_bytes(checkpoint_file, data):
    real_checkpoint = checkpoint_file.read_bytes()
    kind = data.draw(st.sampled_from(["random", "cut", "flipped"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=400))
    elif kind == "cut":
        blob = real_checkpoint[: data.draw(st.integers(0, len(real_checkpoint) - 1))]
    else:
        blob = bytearray(real_checkpoint)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob)
    with scratch() as tmp:
        (tmp / "c.pt").write_bytes(blob)
        loaded = loads_or_refuses(load_checkpoint, tmp / "c.pt")
        if loaded is not None:
            loads_or_refuses(lambda checkpoint: checkpoint.build_model(), loaded)


def test_checkpoint_reader_accepts_the_real_one(checkpoint_file):
    model = load_checkpoint(checkpoint_file).build_model()
    assert isinstance(model, torch.nn.Module) and not model.training
