"""The typed config sections (affectlens.settings) agree with the schema: the same keys, the same
defaults, every key described."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from affectlens.models.sites import SiteError
from affectlens.models.config import ModelConfig, SettingsError, readout_site
from affectlens import settings
from affectlens.settings import (ConceptConfig, PatchConfig, ProbeConfig, ProbeDynamicConfig, SaeConfig, SteerConfig,
                                 TimeResolvedConfig, TraceConfig, TransferConfig)

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


SECTIONS = SCHEMA["properties"]


@pytest.mark.parametrize("cls, block", [
    (SteerConfig, SECTIONS["steer"]["properties"]),
    (ModelConfig, SECTIONS["models"]["additionalProperties"]["properties"]),
    (ProbeConfig, SECTIONS["probe"]["properties"]),
    (TimeResolvedConfig, SECTIONS["probe"]["properties"]["time_resolved"]["properties"]),
    (ProbeDynamicConfig, SECTIONS["probe_dynamic"]["properties"]),
    (SaeConfig, SECTIONS["sae"]["properties"]),
    (PatchConfig, SECTIONS["patch"]["properties"]),
    (TraceConfig, SECTIONS["trace"]["properties"]),
    (ConceptConfig, SECTIONS["concepts"]["additionalProperties"]["properties"]),
    (TransferConfig, SECTIONS["transfer"]["properties"]),
], ids=["steer", "model", "probe", "probe.time_resolved", "probe_dynamic", "sae", "patch", "trace", "concept",
        "transfer"])
def test_schema_and_dataclass_agree(cls, block):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(block) == set(fields)
    for name, f in fields.items():
        assert block[name].get("description"), name
        if f.default_factory is not dataclasses.MISSING:  # a nested section: `{}`, filled by its own class
            assert block[name].get("default") == {}, name
            assert dataclasses.is_dataclass(f.default_factory()), name
        elif f.default is dataclasses.MISSING:
            assert "default" not in block[name], name
        else:
            assert block[name].get("default") == _plain(f.default), name


def test_every_section_with_settings_has_a_class():
    """Each top-level section of stage settings is typed (datasets: data.sources' Options; studies: plain;
    models and concepts: one typed entry per name)."""
    assert set(settings.SECTIONS) == set(SECTIONS) - {"datasets", "models", "studies", "concepts"}
    for key, cls in settings.SECTIONS.items():
        assert cls.from_dict({}) == cls(), key
        assert cls.from_dict(cls()) == cls(), key


def test_nested_and_partial_probe_settings():
    p = ProbeConfig.from_dict({"time_resolved": {"bin_s": 1.0}, "pairs": [["sad", "happy"]], "ridge_alphas": [1.0]})
    assert p.time_resolved == TimeResolvedConfig(bin_s=1.0) and p.pairs == (("sad", "happy"),)
    assert p.ridge_alphas == (1.0,) and p.n_splits == 4
    with pytest.raises(SettingsError, match="n_split"):
        ProbeConfig.from_dict({"n_split": 3})
    with pytest.raises(SettingsError, match=r"probe\.time_resolved.*max_bin"):
        ProbeConfig.from_dict({"time_resolved": {"max_bin": 3}})


def test_each_sae_architecture_owns_its_keys():
    """The `sae:` section holds every architecture's keys; each architecture's config takes its own
    (registry.own_keys) with the section's default equal to the architecture's, and ignores the rest."""
    pytest.importorskip("torch")
    from affectlens.sae.registry import ARCHITECTURES, config_from_settings, own_keys

    section = {f.name for f in dataclasses.fields(SaeConfig)}
    exposed = {}
    for arch, (config_cls, _) in ARCHITECTURES.items():
        defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
        for key in set(own_keys(arch)) & section:
            assert getattr(SaeConfig(), key) == defaults[key], (arch, key)
            exposed.setdefault(key, []).append(arch)
    assert set(exposed) == {"k", "l1_coef", "l0_coef"}
    assert sorted(exposed["k"]) == ["batchtopk", "topk"]
    assert set(SECTIONS["sae"]["properties"]["architecture"]["enum"]) == set(ARCHITECTURES)
    s = dataclasses.replace(SaeConfig(), k=8, l1_coef=2.0, expansion=2)
    topk = config_from_settings("topk", dataclasses.asdict(s), d_in=4)
    relu = config_from_settings("relu", dataclasses.asdict(s), d_in=4)
    assert (topk.k, topk.expansion, topk.d_in) == (8, 2, 4) and not hasattr(topk, "l1_coef")
    assert relu.l1_coef == 2.0 and not hasattr(relu, "k")


def test_unknown_key_is_named():
    with pytest.raises(SettingsError, match="hear_sight"):
        SteerConfig.from_dict({"hear_sight": "last"})


def test_missing_required_key_is_named():
    with pytest.raises(SettingsError, match=r"missing required key\(s\) \['sites'\]"):
        ModelConfig.from_dict({"family": "whisper", "source": "x"})


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
    assert readout_site(None, sites) == "thinker.blocks.1.resid_post"  # Talker sites are generated
    assert readout_site(None, ["decoder.blocks.0.resid_post", "encoder.embed", "encoder.blocks.0.resid_post"]) \
        == "encoder.blocks.0.resid_post"
    pinned = dataclasses.replace(m, readout_site="thinker.blocks.0.resid_post")
    assert readout_site(pinned.readout_site, sites) == "thinker.blocks.0.resid_post"
    with pytest.raises(SettingsError, match="not among the stored sites"):
        readout_site("thinker.blocks.9.resid_post", sites)


def test_the_site_grammar_is_the_schemas_and_the_wildcards():
    """One grammar: the schema's `pattern` of every site key and the workflow's {site} constraint
    are models.sites' expressions, and they accept what parse_site accepts."""
    import re

    from affectlens.models.sites import SITE_OR_PATTERN, SITE_PATTERN, parse_site

    model = SCHEMA["properties"]["models"]["additionalProperties"]["properties"]
    assert model["readout_site"]["pattern"] == model["steer_site"]["pattern"] == f"^({SITE_PATTERN})$"
    assert model["sae_sites"]["items"]["pattern"] == f"^({SITE_PATTERN})$"
    assert model["sites"]["items"]["pattern"] == f"^({SITE_OR_PATTERN})$"
    smk = (Path(__file__).resolve().parents[1] / "workflow/rules/common.smk").read_text()
    assert "site=SITE_PATTERN" in smk
    for good in ("encoder.embed", "thinker.blocks.12.mlp_out", "latent"):
        assert re.fullmatch(SITE_PATTERN, good) and str(parse_site(good)) == good
    for bad in ("encoder.blocks.x.resid_post", "Encoder.embed", "encoder", "../x", "encoder.blocks.1.resid_post/x"):
        assert not re.fullmatch(SITE_PATTERN, bad)
    assert re.fullmatch(SITE_OR_PATTERN, "encoder.blocks.*.resid_post")
