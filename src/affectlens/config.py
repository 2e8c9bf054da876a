"""Checks of the workflow config that a JSON schema cannot express (cross references)."""

from __future__ import annotations

from affectlens.models.sites import SiteError, parse_pattern


class ConfigError(ValueError):
    """A config value that is well-typed but wrong; the message names the key."""


def contrast_name(contrast: dict) -> str:
    return f"{contrast['source']}-to-{contrast['target']}"


def sae_steer_site(config: dict, model_cfg: dict) -> str | None:
    """The site whose SAE the steering method `sae` edits for this model (its steer_site) when
    steer.methods lists sae; None otherwise, and for MusicGen (steered during generation)."""
    if "sae" in config.get("steer", {}).get("methods", []) and model_cfg["family"] != "musicgen":
        return model_cfg.get("steer_site")
    return None


def check_config(config: dict) -> None:
    for name, study in config["studies"].items():
        for ds in study["datasets"]:
            if ds not in config["datasets"]:
                raise ConfigError(f"studies.{name}.datasets names {ds!r}, which is not a key of datasets "
                                  f"({sorted(config['datasets'])})")
        for m in study["models"]:
            if m not in config["models"]:
                raise ConfigError(f"studies.{name}.models names {m!r}, which is not a key of models "
                                  f"({sorted(config['models'])})")
        for i, c in enumerate(study.get("contrasts", [])):
            if c["source"] == c["target"]:
                raise ConfigError(f"studies.{name}.contrasts[{i}]: source and target are both {c['source']!r}")
            for ds in study["datasets"]:
                d = config["datasets"][ds]
                if d["source"] == "demo":
                    emotions = d.get("demo", {}).get("emotions", [])
                    for label in (c["source"], c["target"]):
                        if emotions and label not in emotions:
                            raise ConfigError(f"studies.{name}.contrasts[{i}] names label {label!r}, which dataset "
                                              f"{ds!r} does not have (datasets.{ds}.demo.emotions = {emotions})")
    steer = config.get("steer", {})
    for name in steer.get("judge_models", []):
        if name not in config["models"]:
            raise ConfigError(f"steer.judge_models names {name!r}, which is not a key of models "
                              f"({sorted(config['models'])})")
    if steer.get("hear_site", "last") not in ("last", "steer"):
        try:
            parse_pattern(steer["hear_site"])
        except SiteError as e:
            raise ConfigError(f"steer.hear_site: {e}") from None
    for name, m in config["models"].items():
        site = sae_steer_site(config, m)
        if site and site not in m.get("sae_sites", []):
            raise ConfigError(f"steer.methods lists sae, which edits features of an SAE at the steer site, but "
                              f"models.{name}.sae_sites does not list its steer_site {m['steer_site']!r}")
        keys = [("sites", s) for s in m["sites"]]
        keys += [("sae_sites", s) for s in m.get("sae_sites", [])]
        keys += [(k, m[k]) for k in ("readout_site", "steer_site") if m.get(k)]
        for key, site in keys:
            try:
                parse_pattern(site)
            except SiteError as e:
                raise ConfigError(f"models.{name}.{key}: {e}") from None
