"""Test session setup: four host CPU devices so data-parallel code paths are exercised.

Must run before jax is imported anywhere.
"""
import os

import tempfile  # noqa: E402

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests build the same tiny runs, each with fresh jitted closures: JAX's persistent cache
# (keyed by the compiled program) compiles each program once per session, subprocesses and
# pytest-xdist workers included (about 40% off tests/test_experiment.py).
# ABD_TEST_COMPILE_CACHE keeps it across sessions.
_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every xdist worker
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get("ABD_TEST_COMPILE_CACHE") or (
    os.path.join(tempfile.gettempdir(), f"abd_jax_test_xla_cache_{_run_id}") if _run_id
    else tempfile.mkdtemp(prefix="abd_jax_test_xla_cache_")))
# A size bound makes JAX lock the folder: two workers never read a half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(
    os.environ.get("ABD_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data_dir():
    """Folder with the offline archives (../shared/data or $ABD_SHARED_DATA); skips if absent."""
    if not (SHARED_DATA / "cifar-10-binary.tar.gz").exists():
        pytest.skip(f"offline CIFAR-10 archive not found in {SHARED_DATA}; "
                    "set ABD_SHARED_DATA to the folder holding cifar-10-binary.tar.gz")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A TFDS data dir holding the prepared sklearn_digits dataset (built offline once)."""
    from abd_jax import data as data_lib
    data_dir = tmp_path_factory.mktemp("tfds")
    data_lib.load_split(data_lib.get_spec("digits"), "test", str(data_dir))
    return str(data_dir)
