"""The typed config sections (affectlens.settings) agree with the schema: the same keys, the same
defaults, every key described."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from affectlens.models.sites import SiteError
from affectlens.models.config import ModelConfig, SettingsError, readout_site
from affectlens.settings import SteerConfig

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


@pytest.mark.parametrize("cls, block", [
    (SteerConfig, SCHEMA["properties"]["steer"]["properties"]),
    (ModelConfig, SCHEMA["properties"]["models"]["additionalProperties"]["properties"]),
], ids=["steer", "model"])
def test_schema_and_dataclass_agree(cls, block):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(block) == set(fields)
    for name, f in fields.items():
        assert block[name].get("description"), name
        if f.default is dataclasses.MISSING:
            assert "default" not in block[name], name
        else:
            assert block[name].get("default") == _plain(f.default), name


def test_unknown_key_is_named():
    with pytest.raises(SettingsError, match="hear_sight"):
        SteerConfig.from_dict({"hear_sight": "last"})


def test_towers_from_patterns_without_instantiating_them():
    m = ModelConfig.from_dict({"family": "whisper", "source": "x",
                               "sites": ["decoder.blocks.*.resid_post", "encoder.embed", "decoder.embed"]})
    assert m.towers == ("decoder", "encoder")
    with pytest.raises(SiteError, match="unknown point"):
        ModelConfig.from_dict({"family": "whisper", "source": "x", "sites": ["encoder.blocks.*.resid"]}).towers


def test_one_readout_rule_skips_generated_towers():
    sites = ["thinker.embed", "thinker.blocks.0.resid_post", "thinker.blocks.1.resid_post",
             "talker.blocks.0.resid_post"]
    m = ModelConfig.from_dict({"family": "qwen2.5-omni", "source": "x", "sites": sites})
    assert readout_site(m, sites, generated_towers=("talker",)) == "thinker.blocks.1.resid_post"
    assert readout_site(m, ["decoder.blocks.0.resid_post", "encoder.embed", "encoder.blocks.0.resid_post"]) \
        == "encoder.blocks.0.resid_post"
    pinned = dataclasses.replace(m, readout_site="thinker.blocks.0.resid_post")
    assert readout_site(pinned, sites, ("talker",)) == "thinker.blocks.0.resid_post"
    with pytest.raises(SettingsError, match="not among the stored sites"):
        readout_site(dataclasses.replace(m, readout_site="thinker.blocks.9.resid_post"), sites)
