"""Test set-up: four CPU devices for the pmap tests, and shared fixtures."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CPU layers' Winograd choice (bat_jax.cpu) by the fixed rule, not measured
# (timings vary from machine to machine and run to run); test_cpu_tuning.py measures.
os.environ.setdefault("BAT_JAX_CPU_TUNING", "off")

import pathlib  # noqa: E402

# XLA's default CPU flags, not util.add_default_xla_flags(): test_cpu_ops.py
# tests that flag set-up. No test compares floats bitwise across batch shapes,
# device counts or differently compiled programs: XLA may round those
# differently on another CPU, so such comparisons use tolerances, and
# per-example flags may differ by a rare tie.
import jax  # noqa: E402
import pytest  # noqa: E402

# Tests run tiny models for a few steps: XLA's compile time dominates, and
# these optimisations cost more to compile than they save.
jax.config.update("jax_disable_most_optimizations", True)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Digits per split in the TFDS-format MNIST the tests prepare.
TFDS_MNIST_SIZES = {"train": 300, "test": 200}


@pytest.fixture(scope="session")
def mnist_tfds(tmp_path_factory):
  """A TFDS data_dir holding ``mnist`` as `tfds build` prepares it (array_record),
  made of the first bundled real digits; yields ``(data_dir, {split: arrays})``."""
  import mnist_helpers  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("tfds")
  written = mnist_helpers.write_tfds_mnist(data_dir, TFDS_MNIST_SIZES["train"],
                                           TFDS_MNIST_SIZES["test"])
  return str(data_dir), written


@pytest.fixture
def standin_gcs(tmp_path, monkeypatch):
  """gs:// paths kept in ``tmp_path/gcs`` (tests/standin_gcs.py); yields that folder."""
  import standin_gcs as standin  # pylint: disable=g-import-not-at-top
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  root = tmp_path / "gcs"
  root.mkdir()
  standin.install(str(root), monkeypatch)
  yield root
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops JAX's compiled programs after each test file.

  Every compiled XLA:CPU program keeps memory mappings for its code, and one
  process running the whole suite compiles thousands of them: without this,
  the process runs into the kernel's limit on mappings
  (``vm.max_map_count``, 65530 by default) and XLA's compiler crashes.
  """
  yield
  jax.clear_caches()
