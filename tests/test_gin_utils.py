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
