"""Test-wide settings: Ray talks over loopback only; torch uses few threads on the 2-core CI machines."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from processes import assert_loopback_only, assert_no_ray_left, init_local_ray  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def full_precision_on_cuda(request):
    """CUDA tests compare against CPU results: cuDNN convolutions default to TF32 (about 1e-3 relative error), so
    they run in full float32 here."""
    if "gpu" not in request.keywords or not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Where the smoke config's synthetic dataset is made, once per test module."""
    return tmp_path_factory.mktemp("data") / "smoke2d"


@pytest.fixture(scope="module")
def local_ray():
    """A loopback-only local Ray (2 CPUs, small object store) for one test module; no Ray process is left after."""
    import ray

    os.environ["RAY_DEDUP_LOGS"] = "0"
    init_local_ray()
    try:
        assert_loopback_only()
        yield
    finally:
        ray.shutdown()
    assert_no_ray_left()
