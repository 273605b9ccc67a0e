"""``import sparse_peft`` loads neither torch nor PEFT, yet registers the mask method with PEFT by the time PEFT is
usable, whatever the import order; the command line parses (and answers ``--help``) before any model library loads.
Each case runs in a fresh interpreter: what is imported is the point."""

import subprocess
import sys

import pytest

import sparse_peft

HEAVY = ("torch", "peft", "transformers", "datasets")
#: Whether PEFT knows the mask tuner, read through PEFT alone (importing a sparse_peft module would register it).
REGISTERED = (
    "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
    "names = {getattr(t, '__name__', '') for t in PEFT_TYPE_TO_TUNER_MAPPING.values()}\n"
    "assert 'MaskModel' in names, 'not registered'\n"
)


def run_python(code: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_import_loads_no_model_library():
    run_python(f"import sys\nimport sparse_peft\nassert not set({HEAVY!r}) & set(sys.modules), sorted(sys.modules)\n")


@pytest.mark.parametrize(
    "argv, status",
    [(["--help"], 0), (["learn", "--help"], 0), (["demo", "--help"], 0), (["learn"], 2), (["nosuchcommand"], 2)],
)
def test_cli_parses_and_answers_help_before_loading_any_model_library(argv, status):
    run_python(
        "import sys\nfrom sparse_peft.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as exit:\n    assert exit.code == {status}, exit.code\n"
        f"else:\n    raise AssertionError('no exit')\nassert not set({HEAVY!r}) & set(sys.modules)\n"
    )


@pytest.mark.parametrize(
    "imports",
    [
        "import sparse_peft\nfrom peft import PeftModel\n",  # the documented order
        "import peft\nimport sparse_peft\n",  # PEFT first: registered at once
        "from sparse_peft.config import MaskConfig\n",  # a submodule that imports PEFT while it is half-imported
        "from sparse_peft import MaskConfig\n",
        # transformers probes for PEFT with find_spec (no import), later code imports it
        "import sparse_peft\nimport importlib.util\nassert importlib.util.find_spec('peft')\nimport peft\n",
    ],
)
def test_the_mask_method_is_registered_whatever_the_import_order(imports):
    run_python(imports + REGISTERED)


def test_unregistered_without_importing_sparse_peft():
    """The check above can fail: PEFT alone does not know the method."""
    result = subprocess.run([sys.executable, "-c", "import peft\n" + REGISTERED], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "not registered" in result.stderr


def test_public_names_and_submodules_are_attributes():
    assert set(sparse_peft.__all__) <= set(dir(sparse_peft))
    assert sparse_peft.MaskConfig is sparse_peft.config.MaskConfig
    assert sparse_peft.data.__name__ == "sparse_peft.data"
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        sparse_peft.no_such_name
