"""Every entry point refuses bad flags before any work: a short message, exit status 2.

Most checks run in-process (the flag parsing and checks of each command, with
the work it would start replaced by a function that fails the test); a few
run the real command to check the exit status, the length of the message,
that there is no traceback and that nothing was written.
"""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

from absl import flags
import pytest

from bat_jax import configlib, errors, evaluate, experiment, reproduce, train, util
from bat_jax.data import export_npz
from bat_jax.evaluation import external
from bat_jax.evaluation import workdir as workdir_lib
from bat_jax.evaluation.metrics import AutoAttackOptions
from bat_jax.evaluation.stages import Protocol
from bat_jax.export import __main__ as export_cli
from bat_jax.plots import __main__ as plots_cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def _no_work(*args, **kwargs):
  raise AssertionError("work started before the flags were checked")


def _flags(define, args):
  fv = flags.FlagValues()
  define(fv)
  fv(["prog", *args])
  return fv


@pytest.fixture
def workdir(tmp_path):
  """A training workdir's config.json (no checkpoint: nothing may get that far)."""
  path = tmp_path / "run"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(
      {"dataset": "mnist_subset", "model": "tiny_cnn", "eps": 0.3, "norm": "linf"}))
  return path


# --------------------------------------------------------------------------
# The shared checks.
# --------------------------------------------------------------------------


def test_choose_lists_the_valid_names_and_the_closest():
  assert errors.choose("--which", "best", ("last", "best")) == "best"
  with pytest.raises(errors.UserError, match=r"--which=bset is unknown \(did you mean "
                     r"'best'\?\); choose from \['last', 'best'\]"):
    errors.choose("--which", "bset", ("last", "best"))
  with pytest.raises(errors.UserError, match="choose from") as info:
    errors.choose("--which", "middle", ("last", "best"))
  assert "did you mean" not in str(info.value)


def test_choose_each_refuses_unknown_repeated_and_empty_lists():
  assert errors.choose_each("--stages", ["train"], ("train", "plot")) == ["train"]
  with pytest.raises(errors.UserError, match=r"unknown \['plto'\] \(did you mean 'plot'"):
    errors.choose_each("--stages", ["train", "plto"], ("train", "plot"))
  with pytest.raises(errors.UserError, match=r"names \['train'\] more than once"):
    errors.choose_each("--stages", ["train", "train"], ("train", "plot"))
  with pytest.raises(errors.UserError, match="is empty"):
    errors.choose_each("--stages", [], ("train", "plot"))


def test_number_checks():
  assert errors.integers("--seeds", ["0", " 2"]) == [0, 2]
  for bad, message in ((["abc"], "not an integer"), (["-1"], ">= 0"), ([], "empty"),
                       (["1", "1"], "more than once")):
    with pytest.raises(errors.UserError, match=message):
      errors.integers("--seeds", bad)
  assert errors.count_or_all("--n", -1) == -1 and errors.count_or_all("--n", 5) == 5
  for bad in (0, -2, -5):
    with pytest.raises(errors.UserError, match="-1 \\(all\\) or a positive count"):
      errors.count_or_all("--n", bad)
  with pytest.raises(errors.UserError, match="--batch_size=-3 must be >= 0"):
    errors.at_least("--batch_size", -3, 0)


def test_output_paths(tmp_path):
  a_file = tmp_path / "f"
  a_file.write_text("x")
  assert errors.output_dir("--out", str(tmp_path / "new")) == str(tmp_path / "new")
  with pytest.raises(errors.UserError, match="is a file; give a folder"):
    errors.output_dir("--out", str(a_file))
  with pytest.raises(errors.UserError, match="is a folder; give a file name"):
    errors.output_file("--out", str(tmp_path))


# --------------------------------------------------------------------------
# bat_jax.evaluate
# --------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--autoattack_attacks=apgd-xx"], r"unknown \['apgd-xx'\] \(did you mean"),
    (["--autoattack_attacks=apgd-ce,APGD-CE"], r"names \['apgd-ce'\] more than once"),
    (["--autoattack_settings=apgd_targetz=3"], "key 'apgd_targetz' is unknown"),
    (["--autoattack_settings=apgd_iters=-3"], "apgd_iters=-3 .* integer >= 1"),
    (["--autoattack_settings=apgd_iters=2.5"], "integer >= 1"),
    (["--autoattack_settings=rho=2"], r"fraction in \(0, 1\]"),
    (["--autoattack_settings=square_rescale_schedule=1"], "true or false"),
    (["--autoattack_settings=apgd_iters"], "key=value items"),
    (["--autoattack_settings=apgd_iters=3,apgd_iters=4"], "'apgd_iters' twice"),
    (["--autoattack_chunk_size=-5"], "--autoattack_chunk_size=-5 must be >= 0"),
    (["--autoattack_version=strnd"], "unknown \\(did you mean .*'standard'"),
    (["--autoattack_version=fast", "--autoattack_attacks=apgd-ce"],
     "--autoattack_version=custom"),
    (["--which="], "--which is empty"),
    (["--which=bset"], "did you mean 'best'"),
    (["--which=last,last"], "more than once"),
    (["--attacks=clean,fsgm"], r"unknown \['fsgm'\] \(did you mean 'fgsm'"),
    (["--attacks="], "--attacks is empty"),
    (["--batch_size=-3"], "--batch_size=-3 must be >= 0"),
    (["--sanity_examples=-1"], "--sanity_examples=-1 must be >= 0"),
    (["--max_chunks_this_run=-1"], "must be >= 0"),
    (["--num_examples=-5"], "-1 \\(all\\) or a positive count"),
    (["--pgd_steps=0"], "--pgd_steps=0 must be >= 1"),
    (["--pgd_restarts=-1"], "--pgd_restarts=-1 must be >= 1"),
    (["--seed=-1"], "--seed=-1 must be >= 0"),
    (["--model=m.py:f"], "--workdir and --model exclude each other"),
    (["--out_dir=x"], "--out_dir works with --model, not with --workdir"),
    (["--workdirs=a,b"], "--workdirs works with --aggregate, not with --workdir"),
])
def test_evaluate_refuses_before_any_stage(workdir, monkeypatch, args, message):
  monkeypatch.setattr(evaluate.datasets, "load_split", _no_work)
  monkeypatch.setattr(workdir_lib, "run_evaluation", _no_work)
  fv = _flags(evaluate.define_flags, [f"--workdir={workdir}", *args])
  with pytest.raises(errors.UserError, match=message):
    evaluate.run_from_flags(fv)
  assert not (workdir / "eval").exists()


def test_evaluate_other_ways_of_running(tmp_path, monkeypatch):
  monkeypatch.setattr(evaluate, "aggregate", _no_work)
  monkeypatch.chdir(tmp_path)
  os.mkdir("a")
  cases = [([], "Pass one of --workdir"),
           (["--aggregate", "--workdirs=a,b"], r"--workdirs: \['b'\] not found"),
           (["--aggregate"], "--aggregate needs --workdirs"),
           (["--aggregate", "--workdirs=a", f"--out={tmp_path}"], "is a folder"),
           (["--aggregate", "--workdirs=a", "--which=bset"], "did you mean 'best'"),
           (["--aggregate", "--workdirs=a", "--compare=x,y"], "exclude each other"),
           (["--model=m.py:f", "--checkpoint=c", "--aggregate", "--workdirs=a"],
            "exclude each other"),
           (["--aggregate", "--workdirs=a", "--checkpoint=c"], "--checkpoint works with "
            "--model, not with --aggregate"),
           (["--aggregate", "--workdirs=a", "--autoattack_version=fast"],
            "--autoattack_version works with --workdir or --model"),
           (["--compare=a,b", "--which=last"], "--which works with --workdir or "
            "--aggregate, not with --compare"),
           (["--model=m.py:f", "--dataset=mnist_subset", "--split=tset"],
            "--split=tset is unknown \\(did you mean 'test'"),
           (["--model=m.py:f", "--dataset=cifar", "--split=test"],
            "did you mean 'cifar10'"),
           (["--model=m.py:f", "--data=d.npz", "--noresume"], "--resume works with "
            "--workdir")]
  a_file = tmp_path / "file"
  a_file.write_text("x")
  cases.append(([f"--model={a_file}.py:f", "--eps=0.3", f"--out_dir={a_file}"],
                "is a file; give a folder"))
  for args, message in cases:
    with pytest.raises(errors.UserError, match=message):
      evaluate.run_from_flags(_flags(evaluate.define_flags, args))


def test_autoattack_names_are_case_insensitive_and_imply_custom(workdir):
  fv = _flags(evaluate.define_flags, [f"--workdir={workdir}",
                                      "--autoattack_attacks=APGD-CE,Square",
                                      "--autoattack_settings=apgd_iters=5,rho=0.5,"
                                      "square_rescale_schedule=true"])
  protocol = evaluate._protocol_from_flags(fv)  # pylint: disable=protected-access
  assert protocol.autoattack.version == "custom"
  assert protocol.autoattack.attack_names() == ("apgd-ce", "square")
  assert dict(protocol.autoattack.settings) == {"apgd_iters": 5, "rho": 0.5,
                                                "square_rescale_schedule": True}


def test_autoattack_options_are_checked_on_construction():
  with pytest.raises(errors.UserError, match="did you mean 'fab-t'"):
    AutoAttackOptions(version="custom", attacks=("fab-tt",))
  with pytest.raises(errors.UserError, match="chunk_size=0 must be >= 1"):
    AutoAttackOptions(chunk_size=0)
  with pytest.raises(errors.UserError, match="n_target_classes"):
    AutoAttackOptions(settings={"n_target_classes": 0})
  with pytest.raises(errors.UserError, match="did you mean 'pgd'"):
    Protocol(attacks=("clean", "pdg"))


# --------------------------------------------------------------------------
# A user's own model file.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("source, message, line", [
    ("def make_model(:\n  pass\n", "SyntaxError: invalid syntax", "line 1"),
    ("def make_model():\n  return helper()\n\ndef helper():\n  raise RuntimeError("
     "'no weights here')\n", "RuntimeError: no weights here", "line 5, in helper"),
    ("import numpy\nx = 1 / 0\n", "ZeroDivisionError", "line 2, in <module>"),
    ("import no_such_module_here\n", "ModuleNotFoundError", "line 1, in <module>"),
    ("import json\ndef make_model():\n  return json.loads('{')\n", "JSONDecodeError",
     "line 3, in make_model"),  # the standard library's frames are left out
])
def test_model_file_errors_are_shown_as_the_users(tmp_path, source, message, line):
  path = tmp_path / "user_model.py"
  path.write_text(source)
  with pytest.raises(external.ModelCodeError) as info:
    external.load_model(f"{path}:make_model")
  text = str(info.value)
  assert message in text and line in text and str(path) in text
  assert "bat_jax" not in text.replace(f"--model={path}", "")  # none of bat_jax's stack
  assert len(text.splitlines()) <= 8


def test_model_file_without_the_function(tmp_path):
  path = tmp_path / "user_model.py"
  path.write_text("def make_modle():\n  return lambda x: x\n")
  with pytest.raises(errors.UserError, match="no function 'make_model' \\(did you mean "
                     "'make_modle'"):
    external.load_model(f"{path}:make_model")
  with pytest.raises(errors.UserError, match="no Python file"):
    external.load_model(f"{tmp_path / 'missing.py'}:make_model")


# --------------------------------------------------------------------------
# Config files and bat_jax.main's config.
# --------------------------------------------------------------------------


def _config_file(name):
  spec = importlib.util.spec_from_file_location(f"test_cfg_{name}",
                                                REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


def test_config_file_switches_are_booleans():
  mnist = _config_file("mnist")
  full, local = mnist(), mnist("runlocal")
  assert (full.num_epochs, local.num_epochs) == (50, 3)
  for off in ("runlocal=False", "runlocal=false", "runlocal=0", "runlocal=no",
              "runlocal=off"):
    assert mnist(off).num_epochs == 50, off
  for on in ("runlocal=True", "runlocal=1", "runlocal=yes"):
    assert mnist(on).num_epochs == 3, on
  assert _config_file("cifar10_rst")("runlocal=false").num_train_steps == -1
  with pytest.raises(configlib.ConfigError, match="not a switch value"):
    mnist("runlocal=maybe")
  with pytest.raises(configlib.ConfigError, match="'eps' needs a value"):
    mnist("eps")
  with pytest.raises(configlib.ConfigError, match="did you mean 'runlocal'"):
    mnist("runlcal")
  with pytest.raises(configlib.ConfigError, match="given twice"):
    mnist("eps=0.3,eps=0.45")


def test_a_required_config_field_is_refused_until_set(tmp_path):
  rst = _config_file("cifar10_rst")()
  with pytest.raises(configlib.ConfigError, match="config.extra_data_path is required"):
    configlib.validate(rst)
  with pytest.raises(configlib.ConfigError, match="extra_data_path is required"):
    train.train_and_evaluate(rst, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, message", [
    ("num_train_steps", 0, "-1 .* or a positive number of steps"),
    ("num_train_steps", -5, "-1 .* or a positive number of steps"),
    ("model", "lenett", "did you mean 'lenet'"),
    ("optimizer", "adma", "did you mean 'adam'"),
])
def test_config_fields(field, value, message):
  config = configlib.base_config()
  config[field] = value
  with pytest.raises(configlib.ConfigError, match=message):
    configlib.validate(config)


def test_missing_tfds_data_is_refused_before_the_workdir_is_written(tmp_path):
  config = configlib.base_config()
  config.data_dir = str(tmp_path / "empty")
  with pytest.raises(errors.UserError, match=r"not prepared .*\n  tfds build mnist "
                     r"--data_dir="):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------
# bat_jax.experiment and bat_jax.reproduce: every run checked before the first.
# --------------------------------------------------------------------------


def test_experiment_checks_every_run_first(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "train_and_evaluate", _no_work)
  base = _config_file("quickstart")()
  root = str(tmp_path / "root")
  cases = [(dict(methods=["bat", "foo"]), r"--methods: unknown \['foo'\]"),
           (dict(methods=["bat", "trdes"]), "did you mean 'trades'"),
           (dict(stages=["train", "plto"]), "did you mean 'plot'"),
           (dict(eps_values=[0.3, 2.0]), "run at_eps2_seed0: config.eps=2.0"),
           (dict(num_examples=0), "--num_examples=0")]
  for change, message in cases:
    kwargs = {**dict(methods=["at", "bat"], eps_values=[0.3], seeds=[0],
                     stages=list(experiment.STAGES)), **change}
    with pytest.raises(errors.UserError, match=message):
      experiment.run_experiment(base, root, **kwargs)
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.UserError, match="--root=.* is a file"):
    experiment.run_experiment(base, str(tmp_path / "file"), ["bat"], [], [0], ["train"])
  assert not os.path.exists(root)


def test_experiment_evaluates_the_weight_average_when_kept(tmp_path, monkeypatch):
  asked = []
  monkeypatch.setattr(experiment.sweep, "run", lambda runs, root, **kw: (
      asked.append(kw["checkpoints"]) or {name: os.path.join(root, name) for name in runs}))
  base = _config_file("quickstart")()
  for ema_decay, want in ((0.0, ("best", "last")), (0.99, ("best", "last", "ema"))):
    base.ema_decay = ema_decay
    experiment.run_experiment(base, str(tmp_path / "root"), ["bat"], [], [0], ["train"])
    assert asked[-1] == want


def test_reproduce_checks_rows_eps_stages_and_runs_first(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "train_and_evaluate", _no_work)
  root = str(tmp_path / "root")
  cases = [("1", dict(methods_filter=["bat", "foo"]), r"--rows \(table 1\): unknown "
            r"\['foo'\]; choose from \['at', 'bat', 'mart', 'trades'\]"),
           ("1", dict(eps_filter=[0.3, 0.2]), "--eps=0.2: table 1 has no row at it; "
            "its eps: 0.3, 0.45"),
           ("2", dict(eps_filter=[4 / 255]), "--eps=4/255: .* its eps: 8/255, 16/255"),
           ("1", dict(stages=["train", "evalute"]), "did you mean 'evaluate'"),
           ("4", {}, r"--table=4 is unknown; choose from \['1'"),
           ("b1", dict(methods_filter=["foo"]), r"--rows \(table B1\)"),
           ("3", dict(runlocal=True), r"extra_data_path is required .* \(bat_jax.reproduce: "
            "--extra_data_path=")]
  for table, kwargs, message in cases:
    with pytest.raises(errors.UserError, match=message):
      reproduce.reproduce(table, root, seeds=[0], **kwargs)
  assert not os.path.exists(root)


# --------------------------------------------------------------------------
# bat_jax.plots, bat_jax.export, bat_jax.data.export_npz
# --------------------------------------------------------------------------


def test_plots_checks_its_choices(workdir, tmp_path, monkeypatch):
  monkeypatch.setattr(plots_cli.plots, "make_all_figures", _no_work)
  out = tmp_path / "figs"
  (tmp_path / "file").write_text("x")
  cases = [(["--robust_key=nonsense"], r"--robust_key=nonsense is unknown; choose from "
            r"\['fgsm_acc', 'pgd_acc', 'autoattack_acc'\]"),
           (["--robust_key=autoattack"], "did you mean 'autoattack_acc'"),
           (["--which=middle"], r"--which=middle is unknown; choose from \['last', 'best'"),
           ([f"--workdirs={workdir},{tmp_path / 'nope'}"], "not found"),
           ([f"--out_dir={tmp_path / 'file'}"], "is a file")]
  for args, message in cases:
    fv = _flags(plots_cli.define_flags, [f"--workdirs={workdir}", f"--out_dir={out}",
                                         *args])
    with pytest.raises(errors.UserError, match=message):
      plots_cli.run_from_flags(fv)
  assert not out.exists()


def test_plots_with_nothing_to_draw_says_so(workdir, tmp_path, monkeypatch):
  fv = _flags(plots_cli.define_flags, [f"--workdirs={workdir}",
                                       f"--out_dir={tmp_path / 'figs'}", "--which=last"])
  monkeypatch.setattr(plots_cli, "FLAGS", fv)
  with pytest.raises(errors.UserError, match="nothing to draw: .*eval/last_results.json"):
    plots_cli.main(["prog"])
  assert not (tmp_path / "figs").exists()


def test_export_checks_its_flags(workdir, tmp_path):
  (tmp_path / "file").write_text("x")
  cases = [([f"--workdir={workdir}"], "Pass --workdir=DIR"),
           ([f"--workdir={tmp_path / 'nope'}", "--out=o"], "is not a folder"),
           ([f"--workdir={workdir}", "--out=o", "--which=bset"], "did you mean 'best'"),
           ([f"--workdir={workdir}", f"--out={tmp_path / 'file'}"], "is a file")]
  for args, message in cases:
    with pytest.raises(errors.UserError, match=message):
      export_cli.check_flags(_flags(export_cli.define_flags, args))


def test_export_npz_checks_its_flags(tmp_path):
  cases = [(["--num_train=-5"], "--num_train=-5 must be -1 \\(all\\) or a positive"),
           (["--num_test=0"], "--num_test=0"),
           (["--dataset=cifar"], "did you mean 'cifar10'"),
           (["--dataset=mnist_subset"], r"choose from \['mnist', 'cifar10', 'cifar100'\]"),
           ([f"--out={tmp_path}"], "is a folder"),
           ([f"--data_dir={tmp_path / 'empty'}"], "(?s)not prepared .*tfds build mnist")]
  for args, message in cases:
    fv = _flags(export_npz.define_flags, [f"--out={tmp_path / 'm.npz'}", *args])
    with pytest.raises(errors.UserError, match=message):
      export_npz.check_flags(fv)
  assert not (tmp_path / "m.npz").exists()


# --------------------------------------------------------------------------
# The real commands: exit status 2, a few lines, no traceback, nothing written.
# --------------------------------------------------------------------------


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


_LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl's log lines


def _assert_short_refusal(result, expected):
  errors_text = "\n".join(line for line in result.stderr.splitlines()
                          if not _LOG_LINE.match(line))
  assert result.returncode == errors.EXIT_USER_ERROR, result.stderr[-2000:]
  assert expected in errors_text, errors_text
  assert "Traceback" not in result.stderr and "USAGE" not in result.stderr
  assert len(errors_text.strip().splitlines()) <= 3, errors_text


def test_evaluate_refuses_with_exit_2_and_writes_nothing(workdir):
  _assert_short_refusal(_run("bat_jax.evaluate", f"--workdir={workdir}",
                             "--autoattack_attacks=apgd-xx"),
                        "unknown ['apgd-xx'] (did you mean")
  assert not (workdir / "eval").exists()


def test_evaluate_usage_errors_are_short_with_exit_2(workdir):
  _assert_short_refusal(_run("bat_jax.evaluate", f"--workdir={workdir}",
                             "--autoattack_settings=apgd_iters"), "key=value items")


def test_main_refuses_with_exit_2_and_writes_nothing(tmp_path):
  _assert_short_refusal(_run("bat_jax.main", "--config=configs/quickstart.py",
                             f"--workdir={tmp_path / 'train'}", "--max_steps_this_run=-1"),
                        "--max_steps_this_run=-1 must be >= 1")
  assert not (tmp_path / "train").exists()


def test_export_npz_refuses_with_exit_2_and_writes_nothing(tmp_path):
  _assert_short_refusal(_run("bat_jax.data.export_npz", "--num_train=-5",
                             f"--out={tmp_path / 'm.npz'}"), "--num_train=-5")
  assert not (tmp_path / "m.npz").exists()


def test_experiment_refuses_with_exit_2_and_writes_nothing(tmp_path):
  _assert_short_refusal(_run("bat_jax.experiment", "--config=configs/quickstart.py",
                             f"--root={tmp_path / 'root'}", "--seeds=abc"),
                        "--seeds: 'abc' is not an integer")
  assert not (tmp_path / "root").exists()


def test_usage_errors_are_short(capsys):
  from absl import app  # pylint: disable=g-import-not-at-top

  def main(argv):
    del argv
    raise app.UsageError("--a needs --b.")

  with pytest.raises(SystemExit) as info:
    util.guarded(main)(["prog"])
  assert info.value.code == errors.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert err == "error: --a needs --b.\nPass --helpshort to see the flags.\n"


def test_help_exits_0_and_a_missing_config_file_is_one_line(tmp_path):
  result = _run("bat_jax.reproduce", "--help")
  assert result.returncode == 0 and "--table" in result.stdout, result.stderr[-2000:]
  _assert_short_refusal(_run("bat_jax.main", "--config=configs/quickstrat.py",
                             f"--workdir={tmp_path / 'train'}"),
                        "no such config file (did you mean 'configs/quickstart.py'")
  assert not (tmp_path / "train").exists()
