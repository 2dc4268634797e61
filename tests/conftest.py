"""Test session setup: four host CPU devices so data-parallel code paths are exercised.

Must run before jax is imported anywhere.
"""
import os
import tempfile

from helpers import xla_flags  # noqa: E402 (imports no jax)

os.environ.setdefault("XLA_FLAGS", xla_flags(devices=4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One folder for the whole run: pytest-xdist workers and subprocesses inherit it from the
# process that started first (the one that removes it at the end).
_OWNS_SHARED_TMP = "ABD_TEST_SHARED_TMP" not in os.environ
if _OWNS_SHARED_TMP:
    os.environ["ABD_TEST_SHARED_TMP"] = tempfile.mkdtemp(prefix="abd_jax_test_")
# Many tests build the same tiny runs, each with fresh jitted closures: JAX's persistent cache
# (keyed by the compiled program) compiles each program once per run, workers and
# subprocesses included (about 40% off tests/test_experiment.py). ABD_TEST_COMPILE_CACHE
# keeps it across runs. A size bound makes JAX lock the folder: no worker reads a
# half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get("ABD_TEST_COMPILE_CACHE") or
                      os.path.join(os.environ["ABD_TEST_SHARED_TMP"], "xla_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(
    os.environ.get("ABD_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


def pytest_unconfigure(config):
    """The run is over (in the process that made the shared folder): remove it."""
    if _OWNS_SHARED_TMP:
        shutil.rmtree(os.environ["ABD_TEST_SHARED_TMP"], ignore_errors=True)


@pytest.fixture(scope="session")
def session():
    """One `abd_jax.session.Session` per test process: runs and steps built by different
    tests share their compiled programs (as the runs of a table do)."""
    from abd_jax.session import Session
    with Session() as shared:
        yield shared


@pytest.fixture(scope="session")
def shared_data_dir():
    """Folder with the offline archives (../shared/data or $ABD_SHARED_DATA); skips if absent."""
    if not (SHARED_DATA / "cifar-10-binary.tar.gz").exists():
        pytest.skip(f"offline CIFAR-10 archive not found in {SHARED_DATA}; "
                    "set ABD_SHARED_DATA to the folder holding cifar-10-binary.tar.gz")
    return SHARED_DATA


def _built_once(name: str, build) -> pathlib.Path:
    """The shared folder's `name`, filled by `build(path)` in whichever process of the test run
    asks first (workers and subprocesses included; the others wait on a file lock)."""
    import filelock
    path = pathlib.Path(os.environ["ABD_TEST_SHARED_TMP"]) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        done = pathlib.Path(str(path) + ".done")
        if not done.exists():
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def prepared_cifar10(shared_data_dir):
    """(data dir, split sizes): CIFAR-10 prepared from the shared archive once per test run
    (~15 s)."""
    import json

    def prepare(folder):
        from abd_jax.prepare_data import prepare
        folder.mkdir()
        (folder / "counts.json").write_text(
            json.dumps(prepare("cifar10", folder / "tfds", shared_data_dir)))

    folder = _built_once("cifar10", prepare)
    return str(folder / "tfds"), json.loads((folder / "counts.json").read_text())


@pytest.fixture(scope="session")
def digits_data_dir():
    """A TFDS data dir holding the prepared sklearn_digits dataset, built offline once per
    test run (one path for all workers, so configs naming it are equal across workers)."""
    from abd_jax import data as data_lib
    return str(_built_once("digits_tfds", lambda folder: data_lib.load_split(
        data_lib.get_spec("digits"), "test", str(folder))))


@pytest.fixture(scope="session")
def reference_run(session):
    """`reference_run(config) -> (results, workdir)`: `experiment.run(config)` done once per
    test run for each distinct config, whichever worker asks first, so tests comparing
    against the same uninterrupted run share it. Read its workdir; never write there."""
    import hashlib
    import json

    from abd_jax import experiment

    def run(config):
        key = hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]
        workdir = _built_once(f"reference_runs/{key}",
                              lambda folder: experiment.run(config, folder, session=session))
        return json.loads((workdir / "results.json").read_text()), workdir

    return run
