"""gin command lines: an error names the flag the user typed (`--gin.X=V` or `--gin_bindings='X = V'`)."""
import gin
import pytest

from dro_jax import gin_utils


@gin.configurable
def gin_utils_test_fn(tau=1.0, model_dir=None):
    return tau, model_dir


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.gin"
    path.write_text("TAU = 1.0\nMODEL_DIR = None\n"
                    "gin_utils_test_fn.tau = %TAU\ngin_utils_test_fn.model_dir = %MODEL_DIR\n")
    yield str(path)
    gin.clear_config()


def _error(recipe, argv):
    files, bindings, rest = gin_utils.split_gin_args([f"--gin_file={recipe}", *argv])
    assert rest == [] and files == [recipe]
    with pytest.raises(ValueError) as e:
        gin_utils.parse(files, bindings)
    return str(e.value)


@pytest.mark.parametrize("argv,expected", [
    (["--gin_bindings=TAUU = 0.5"], "--gin_bindings='TAUU = 0.5': no gin file uses the macro %TAUU (did you mean TAU?)"),
    (["--gin.TAUU=0.5"], "--gin.TAUU: no gin file uses the macro %TAUU (did you mean TAU?)"),
    (["--gin_bindings=MODEL_DIR = /tmp/x"],
     "--gin_bindings='MODEL_DIR = /tmp/x': cannot parse the value "
     "(a string needs inner quotes: --gin_bindings=\"MODEL_DIR = '/tmp/x'\")"),
    (["--gin.MODEL_DIR=/tmp/x"],
     "--gin.MODEL_DIR=/tmp/x: cannot parse the value (a string needs inner quotes: --gin.MODEL_DIR=\"'/tmp/x'\")"),
])
def test_errors_name_the_flag_that_was_typed(recipe, argv, expected):
    assert _error(recipe, argv) == expected


def test_bindings_from_either_flag_still_apply(recipe):
    files, bindings, _ = gin_utils.split_gin_args([f"--gin_file={recipe}", "--gin_bindings=TAU = 0.5",
                                                   "--gin.MODEL_DIR='/tmp/x'"])
    assert bindings == ["TAU = 0.5", "MODEL_DIR = '/tmp/x'"]
    gin_utils.parse(files, bindings)
    assert gin_utils_test_fn() == (0.5, "/tmp/x")
    gin.clear_config()
    gin_utils.parse([recipe], ["TAU = 0.25"])  # plain strings (the API): read as --gin.
    assert gin_utils_test_fn() == (0.25, None)
    with pytest.raises(ValueError, match=r"^--gin\.TAUU: no gin file uses the macro %TAUU"):
        gin_utils.parse([recipe], ["TAUU = 0.25"])


def test_an_import_binding_and_every_line_of_a_multiline_one_are_checked(recipe, tmp_path, monkeypatch):
    """`--gin_bindings='import m'` is gin, not a macro; a typo on a later line is still one."""
    (tmp_path / "gin_utils_test_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    files, bindings, _ = gin_utils.split_gin_args([f"--gin_file={recipe}", "--gin_bindings=import gin_utils_test_module",
                                                   "--gin_bindings", "TAU = 0.5\nMODEL_DIR = 'x'"])
    gin_utils.parse(files, bindings)
    assert gin_utils_test_fn() == (0.5, "x")
    gin.clear_config()
    assert _error(recipe, ["--gin_bindings=TAU = 0.5\nTAUU = 2"]).endswith(
        "no gin file uses the macro %TAUU (did you mean TAU?)")


def test_a_block_binding_sets_parameters_not_macros(recipe):
    """gin's `selector:` block in --gin_bindings: its indented names are parameters."""
    files, bindings, _ = gin_utils.split_gin_args(
        [f"--gin_file={recipe}", "--gin_bindings=gin_utils_test_fn:\n  tau = 0.75\n  model_dir = 'y'"])
    gin_utils.parse(files, bindings)
    assert gin_utils_test_fn() == (0.75, "y")
    gin.clear_config()


def test_an_unclosed_bracket_on_the_command_line_says_so(recipe):
    assert _error(recipe, ["--gin.TAU=(2"]) == "--gin.TAU=(2: the value ends inside an open bracket or string"


def test_a_string_left_open_in_a_file_names_its_line(recipe, tmp_path):
    broken = tmp_path / "broken.gin"
    broken.write_text("TAU = 1.0\nMODEL_DIR = \"\"\"x\n\n")
    with pytest.raises(ValueError, match=f"^{broken}:2: a string opened here is never closed$"):
        gin_utils.parse([recipe, str(broken)], [])
