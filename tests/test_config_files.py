"""`--config=configs/NAME.py` from any folder: a checkout's configs/ or the installed copy."""

import pathlib
import shutil

import pytest

from bat_jax import configlib, util
from conftest import REPO_ROOT


def test_a_checkout_config_is_found_from_another_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  found = pathlib.Path(configlib.config_file_path("configs/quickstart.py"))
  assert found.is_file() and found.read_text() == (
      REPO_ROOT / "configs" / "quickstart.py").read_text()
  assert util._with_config_files(  # pylint: disable=protected-access
      ["prog", "--config=configs/mnist.py:runlocal", "--config.eps=0.1"]) == [
          "prog", f"--config={configlib.configs_dir() / 'mnist.py'}:runlocal",
          "--config.eps=0.1"]


def test_the_installed_copy_comes_first(tmp_path, monkeypatch):
  installed = tmp_path / "site" / "bat_jax" / "configs"
  installed.mkdir(parents=True)
  shutil.copy(REPO_ROOT / "configs" / "quickstart.py", installed)
  monkeypatch.setattr(configlib, "_CONFIGS_DIRS",
                      (installed, REPO_ROOT / "configs"))
  monkeypatch.chdir(tmp_path)
  assert configlib.configs_dir() == installed
  assert configlib.config_file_path("configs/quickstart.py") == str(
      installed / "quickstart.py")
  # mnist.py is not in that copy: refused, with what the copy has.
  with pytest.raises(configlib.ConfigError, match=r"no such config file.*configs/quickstart.py"):
    configlib.config_file_path("configs/mnist.py")


def test_paths_that_exist_or_are_not_configs_stay(tmp_path, monkeypatch):
  own = tmp_path / "configs" / "quickstart.py"
  own.parent.mkdir()
  own.write_text("# my own\n")
  monkeypatch.chdir(tmp_path)
  assert configlib.config_file_path("configs/quickstart.py") == "configs/quickstart.py"
  (tmp_path / "my.py").write_text("# mine\n")
  assert configlib.config_file_path("my.py") == "my.py"


def test_a_missing_config_file_is_refused_with_the_shipped_ones(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for path in ("my.py", "other/quickstart.py", "configs/sub/quickstart.py",
               "configs/nope.py"):
    with pytest.raises(configlib.ConfigError, match=r"no such config file.*ships.*"
                       r"configs/quickstart.py"):
      configlib.config_file_path(path)
  with pytest.raises(configlib.ConfigError, match="did you mean 'configs/quickstart.py'"):
    configlib.config_file_path("configs/quickstrat.py")


def test_no_config_folder_is_a_user_error(tmp_path, monkeypatch):
  monkeypatch.setattr(configlib, "_CONFIGS_DIRS", (tmp_path / "a", tmp_path / "b"))
  with pytest.raises(configlib.ConfigError, match="reinstall bat_jax"):
    configlib.configs_dir()
