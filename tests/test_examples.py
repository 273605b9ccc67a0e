"""The example scripts parse their options with HfArgumentParser; MaskConfig options take MaskConfig's help."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from transformers import HfArgumentParser

from conftest import REPO_ROOT
from sparse_peft import MaskConfig


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the string annotations through it
    spec.loader.exec_module(module)  # defines main() and Args; runs nothing
    return module


@pytest.mark.parametrize("name", ["general_mask", "task_transfer"])
def test_example_options_parse_and_share_mask_config_help(name):
    module = example(name)
    parser = HfArgumentParser(module.Args)
    (defaults,) = parser.parse_args_into_dataclasses([], look_for_args_file=False)
    assert defaults == module.Args() and defaults.sparse_reg == 0.0 and defaults.device == "cpu"
    (args,) = parser.parse_args_into_dataclasses(
        ["--sparse-reg", "1e-5", "--batch_size", "2", "--output", "out"], look_for_args_file=False
    )
    assert (args.sparse_reg, args.batch_size, args.output) == (1e-5, 2, "out")
    sparse_reg = next(a for a in parser._actions if a.dest == "sparse_reg")
    assert sparse_reg.help == MaskConfig.__dataclass_fields__["sparse_reg"].metadata["help"]
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--steps", "many"], look_for_args_file=False)


def test_task_transfer_resolves_the_shipped_sst2_tables():
    from sparse_peft.data import assets_dir

    args = example("task_transfer").Args()
    assert args.sst2_train.startswith(str(assets_dir())) and args.sst2_train.endswith("train.tsv")
