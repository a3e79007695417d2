"""cli.int_list: the one parser of the CLIs' integer-list flags (--labels, --num-tokens, --seeds)."""
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
