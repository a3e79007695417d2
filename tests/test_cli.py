"""cli: the one parser of the CLIs' integer-list flags (--labels, --num-tokens, --seeds) and the one
command runner (user errors -> `error: ...` and exit status 2)."""
import pytest

from detailflow_jax.cli import int_list


def test_int_list_parses_and_bounds():
  assert int_list("207, 360,", "--labels", low=0, high=999) == [207, 360]
  assert int_list("3,1,3", "--num-tokens", low=1) == [3, 1, 3]
  assert int_list("0,5", "--seeds", low=0, distinct=True) == [0, 5]


@pytest.mark.parametrize("text, kwargs, message", [
    ("1,x", {}, "--f must be comma-separated integers, got '1,x'"),
    (" , ", {}, "--f is empty"),
    ("0,10,11", dict(low=0, high=10), r"--f values \[11\] are outside \[0, 10\]"),
    ("-2,4", dict(low=0), r"--f values \[-2\] are outside \[0, inf\]"),
    ("1,2,1", dict(distinct=True), "--f values must be distinct, got '1,2,1'"),
])
def test_int_list_errors_name_the_flag(text, kwargs, message):
  with pytest.raises(ValueError, match=message):
    int_list(text, "--f", **kwargs)


def test_command_runner_turns_user_errors_into_exit_2(capsys):
  from detailflow_jax.cli import command

  @command
  def main(argv=None):
    if argv == ["missing"]:
      raise FileNotFoundError("no file X")
    if argv == ["bad"]:
      raise ValueError("key y is bad")
    if argv == ["bug"]:
      raise KeyError("z")  # not a user error: a traceback, not a one-liner
    return None

  assert main([]) == 0
  assert main(["missing"]) == 2 and capsys.readouterr().err == "error: no file X\n"
  assert main(["bad"]) == 2 and capsys.readouterr().err == "error: key y is bad\n"
  with pytest.raises(KeyError):
    main(["bug"])


def test_reference_batch_cli_names_a_damaged_model(tmp_path, capsys):
  """eval/reference's CLI let a damaged model directory end in a traceback (it caught neither
  ValueError nor the model directory's DamagedModelError); through cli.command it is one line."""
  from detailflow_jax.eval.reference import main
  damaged = tmp_path / "inception"
  (damaged / "params").mkdir(parents=True)
  (damaged / "config.json").write_text("{not json")
  code = main(["--images", str(tmp_path), "--out", str(tmp_path / "ref.npz"), "--inception", str(damaged)])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and str(damaged) in err, err
