"""Issue 21 (docs/selectors/plugins.md): ``+selection.specs.<name>.<param>=V`` alone overrides one
default of the selector called <name> (a plugin's or a built-in one): the spec needs no ``selector``
key when the method's name is a selector's."""
from __future__ import annotations

import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.cli.run import compose
from spokes_lightning.pipeline.stages import check_config
from spokes_lightning.pipeline.select_stage import method_specs, resolve_method_specs
from spokes_lightning.selectors import SELECTORS

PLUGIN = '''
import numpy as np

from spokes_lightning.selectors import Param, SelectionResult, Selector, register


@register
class EveryOther(Selector):
    name = "every_other_spec_defaults"
    requires = ("quality",)
    params_spec = {"stride": Param(int, 2, lambda v: v >= 1, ">= 1")}

    def select(self, inputs, k, seed=0):
        order = np.argsort(np.asarray(inputs.quality), kind="stable")[::self.params["stride"]]
        return SelectionResult(indices=order[:k].astype(np.int64))
'''


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "every_other.py"
    path.write_text(PLUGIN)
    yield path
    SELECTORS.pop("every_other_spec_defaults", None)


def test_a_param_override_alone_keeps_the_selector_of_the_name(tmp_path, plugin_file):
    cfg = compose(["method=random", "selection.methods=[random,every_other_spec_defaults]",
                   f"selection.plugins=[{plugin_file}]", "+selection.specs.every_other_spec_defaults.stride=3",
                   f"run_dir={tmp_path / 'run'}"])
    check_config(cfg)
    assert method_specs(cfg)["every_other_spec_defaults"] == {"selector": "every_other_spec_defaults", "stride": 3}


def test_a_bad_override_is_still_checked_and_other_names_still_need_a_selector(tmp_path, plugin_file):
    cfg = compose(["method=random", "selection.methods=[every_other_spec_defaults]",
                   f"selection.plugins=[{plugin_file}]", "+selection.specs.every_other_spec_defaults.stride=0",
                   f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="parameter stride must be >= 1"):
        check_config(cfg)
    assert resolve_method_specs({"mine": {"alpha": 0.1}}, ["mine"]) == {"mine": {"alpha": 0.1}}
    cfg = compose(["method=random", "selection.methods=[mine]", "+selection.specs.mine.alpha=0.1",
                   f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="method 'mine' needs a 'selector' key"):
        check_config(cfg)
