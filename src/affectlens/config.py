"""Checks of the workflow config that a JSON schema cannot express (cross references), run when
the workflow is planned (dry runs included), before any job: everything that can be known without
computing is checked here, so that a run never fails hours in on something the config already said.

  * studies name datasets and models that exist; contrasts name two different labels, each a plain
    name (LABEL_PATTERN, the `{contrast}` wildcard's) that the dataset has, where its labels are
    known before anything runs (`known_labels`: the demo corpus's emotions from the config here; a
    folder's label folders or table, a published corpus's classes from `data.sources.known_labels`,
    which the workflow passes in, and which also checks a source's settings and local paths);
  * every site follows the grammar and exists in the model: a tower of its family, a block within
    its depth where the depth can be read without loading the model (`models.depth`);
  * the readout, steer and SAE sites are among the extracted sites; the steering hear site is a
    site the model has, at or after the steer site;
  * steer.judge_models name models; the `sae` steering method has its SAE;
  * a dataset's label_map renames labels it has (`check_label_maps`); which studies the transfer
    stage runs for is `transfer_studies`.

`canonical` puts the config's settings in one key order, so that reordering keys in a config file
never looks like a change to Snakemake (rule params are compared by their repr). The order of named
entries (the datasets, models, studies, ...) is kept: it is the order results are listed in, and
where a default is "the first study", it is the config's first.
"""

from __future__ import annotations

import re
from typing import Callable

from affectlens.models.depth import FAMILY_TOWERS, tower_depths
from affectlens.models.sites import Site, SiteError, SitePattern, parse_pattern

LABEL_PATTERN = r"[A-Za-z0-9_]+"
"""A label a contrast can name: the `{contrast}` wildcard is `{source}-to-{target}` of these."""


class ConfigError(ValueError):
    """A config value that is well-typed but wrong; the message names the key."""


def canonical(value, schema: dict):
    """`value` (the config, or a part of it) with the keys of every mapping of settings in sorted
    order, recursively: a mapping whose schema lists its `properties`. A mapping of names the user
    chooses (the datasets, models and studies, a device_map, ...: `additionalProperties` only) keeps
    its order, which can mean something (the order results are listed in; accelerate's first
    device); its values are made canonical in turn. Lists keep their order."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            return {k: canonical(value[k], props.get(k, {})) for k in sorted(value, key=str)}
        extra = schema.get("additionalProperties")
        return {k: canonical(v, extra if isinstance(extra, dict) else {}) for k, v in value.items()}
    if isinstance(value, list):
        items = schema.get("items")
        return [canonical(v, items if isinstance(items, dict) else {}) for v in value]
    return value


def contrast_name(contrast: dict) -> str:
    return f"{contrast['source']}-to-{contrast['target']}"


def sae_steer_site(config: dict, model_cfg: dict) -> str | None:
    """The site whose SAE the steering method `sae` edits for this model (its steer_site) when
    steer.methods lists sae; None otherwise, and for MusicGen (steered during generation)."""
    if "sae" in config.get("steer", {}).get("methods", []) and model_cfg["family"] != "musicgen":
        return model_cfg.get("steer_site")
    return None


def check_config(config: dict,
                 known_labels: Callable[[str, dict], tuple[str, ...] | None] | None = None) -> None:
    """Raise ConfigError (or the source's own error) naming the key at fault. `known_labels(name,
    dataset_cfg)` gives a dataset's labels where they are known, else None (the workflow passes
    `data.sources.known_labels`); without it only the demo corpus's labels are checked."""
    labels = dataset_labels(config, known_labels)
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
            for end in ("source", "target"):
                if not re.fullmatch(LABEL_PATTERN, c[end]):
                    raise ConfigError(
                        f"studies.{name}.contrasts[{i}].{end} = {c[end]!r}: a contrast's labels name its output "
                        f"folders ({{source}}-to-{{target}}) and may hold only letters, digits and _; rename the "
                        f"label in the data (the label folder, or the table's label column) and here")
            for ds in study["datasets"]:
                known, where = labels.get(ds, (None, ""))
                for label in (c["source"], c["target"]):
                    if known is not None and label not in known:
                        raise ConfigError(f"studies.{name}.contrasts[{i}] names label {label!r}, which dataset "
                                          f"{ds!r} does not have ({where} = {list(known)})")
    check_label_maps(config, labels)
    steer = config.get("steer", {})
    for name in steer.get("judge_models", []):
        if name not in config["models"]:
            raise ConfigError(f"steer.judge_models names {name!r}, which is not a key of models "
                              f"({sorted(config['models'])})")
    hear = steer.get("hear_site", "last")
    if hear not in ("last", "steer"):
        try:
            parse_pattern(hear)
        except SiteError as e:
            raise ConfigError(f"steer.hear_site: {e}") from None
    for name, m in config["models"].items():
        site = sae_steer_site(config, m)
        if site and site not in m.get("sae_sites", []):
            raise ConfigError(f"steer.methods lists sae, which edits features of an SAE at the steer site, but "
                              f"models.{name}.sae_sites does not list its steer_site {m['steer_site']!r}")
        check_model_sites(name, m, hear_site=hear if m.get("steer_site") else None)
    check_concepts(config)


def dataset_labels(config: dict, known_labels: Callable | None = None) -> dict[str, tuple[tuple | None, str]]:
    """{dataset: (its labels or None where they are not known before a run, where they come from)}."""
    labels = {}
    for ds, d in config["datasets"].items():
        if d["source"] == "demo":
            emotions = d.get("demo", {}).get("emotions")
            labels[ds] = (tuple(emotions) if emotions and d.get("label_column", "label") == "label" else None,
                          f"datasets.{ds}.demo.emotions")
        elif known_labels is not None:
            labels[ds] = (known_labels(ds, d), f"the labels of datasets.{ds}")
    return labels


def check_label_maps(config: dict, labels: dict[str, tuple[tuple[str, ...] | None, str]]) -> None:
    """`datasets.<name>.label_map` renames labels the dataset has (where they are known). `labels`:
    as `dataset_labels` gives them."""
    for ds, d in config["datasets"].items():
        known, where = labels.get(ds, (None, ""))
        for label in (d.get("label_map") or {}) if known is not None else ():
            if label not in known:
                raise ConfigError(f"datasets.{ds}.label_map renames {label!r}, which dataset {ds!r} does not have "
                                  f"({where} = {list(known)})")


def transfer_studies(config: dict, known_labels: Callable | None = None) -> dict[str, str]:
    """{study: why not} for every study of two or more datasets, "" where the transfer stage runs
    for it: the labels of all its datasets are known before a run, and every pair shares two or
    more after their label_map, among them both labels of every contrast (the axes are read in
    both). A study that does not qualify is left out of `all` with its reason (the workflow logs it)."""
    labels = dataset_labels(config, known_labels)
    out = {}
    for name, study in config["studies"].items():
        names = study["datasets"]
        if len(names) < 2:
            continue
        mapped, why = {}, ""
        for ds in names:
            known = labels.get(ds, (None, ""))[0]
            if known is None:
                why = f"the labels of dataset {ds!r} are not known before a run"
                break
            label_map = config["datasets"][ds].get("label_map") or {}
            mapped[ds] = {label_map.get(label, label) for label in known}
        for i, a in enumerate(names if not why else []):
            for b in names[i + 1:]:
                shared = mapped[a] & mapped[b]
                needed = {c[end] for c in study.get("contrasts", []) for end in ("source", "target")}
                if len(shared) < 2 or not needed <= shared:
                    why = why or (f"datasets {a!r} and {b!r} share {sorted(shared) or 'no'} label(s) after their "
                                  f"label_map{' (contrasts need ' + str(sorted(needed)) + ')' if needed else ''}; "
                                  f"set datasets.<name>.label_map so that they share two or more")
        out[name] = why
    return out


def _blocks(site: Site | SitePattern, depths: dict, family: str, key: str, text: str) -> None:
    """A site's tower is one of the family's and its block within the tower's known depth."""
    if site.tower not in depths:
        raise ConfigError(f"{key}: site {text!r} names tower {site.tower!r}, which family {family!r} does not have "
                          f"(its towers: {list(depths)})")
    n = depths[site.tower]
    if isinstance(site, Site) and site.point not in ("embed", "latent") and n is not None and site.block >= n:
        raise ConfigError(f"{key}: site {text!r} is past the model's depth ({site.tower} has blocks 0..{n - 1}); "
                          f"pick a block below {n}")


def check_model_sites(name: str, m: dict, hear_site: str | None = None) -> None:
    """The sites of `models.<name>`: each follows the grammar and exists in the model (tower of the
    family; block within the depth, where the config says it without loading the model); readout,
    steer and SAE sites are among the extracted ones; an explicit hear site is in the steer site's
    tower, at or after it."""
    keys = [(f"models.{name}.sites", s) for s in m["sites"]]
    keys += [(f"models.{name}.sae_sites", s) for s in m.get("sae_sites", [])]
    keys += [(f"models.{name}.{k}", m[k]) for k in ("readout_site", "steer_site") if m.get(k)]
    parsed = {}
    for key, site in keys:
        try:
            parsed[site] = parse_pattern(site)
        except SiteError as e:
            raise ConfigError(f"{key}: {e}") from None
    if m["family"] not in FAMILY_TOWERS:
        return
    depths = tower_depths(m["family"], m["source"], m.get("revision"))
    for key, site in keys:
        _blocks(parsed[site], depths, m["family"], key, site)
    extracted = [parsed[s] for s in m["sites"]]

    def is_extracted(site: Site) -> bool:
        return any(site == e or (isinstance(e, SitePattern) and site.tower == e.tower and site.point == e.point)
                   for e in extracted)

    for key, site in keys[len(m["sites"]):]:
        if not is_extracted(parsed[site]):
            raise ConfigError(f"{key} = {site!r} is not among the extracted sites (models.{name}.sites = "
                              f"{list(m['sites'])}); add it to sites, or pick one of them")
    if hear_site is not None and hear_site not in ("last", "steer"):
        hear, steer = parse_pattern(hear_site), parsed[m["steer_site"]]
        if isinstance(hear, Site):
            _blocks(hear, depths, m["family"], "steer.hear_site", hear_site)
            if hear.tower != steer.tower or hear.depth < steer.depth:
                raise ConfigError(f"steer.hear_site = {hear_site!r} must be in the tower of models.{name}.steer_site "
                                  f"({m['steer_site']!r}) at or after it")


def concept_sae(config: dict, name: str) -> tuple[str, str, str]:
    """(dataset, model, site) of the SAE that `concepts.<name>` is read with (results/sae/{dataset}/
    {model}/{site}): its model; its dataset, else the first dataset of the first study listing the
    model; its site, else the model's first sae_sites entry. ConfigError names the key to set."""
    c = config["concepts"][name]
    key = f"concepts.{name}"
    model = c["model"]
    if model not in config["models"]:
        raise ConfigError(f"{key}.model names {model!r}, which is not a key of models ({sorted(config['models'])})")
    sae_sites = list(config["models"][model].get("sae_sites", []))
    site = c.get("site") or (sae_sites[0] if sae_sites else None)
    if site is None:
        raise ConfigError(f"{key}: models.{model}.sae_sites is empty, so no SAE reads the concept; add the site "
                          f"to models.{model}.sae_sites (and set {key}.site when there are several)")
    if site not in sae_sites:
        raise ConfigError(f"{key}.site = {site!r} is not among models.{model}.sae_sites ({sae_sites}); add it there "
                          f"so that the workflow trains its SAE, or pick one of them")
    dataset = c.get("dataset")
    if dataset is None:
        listed = [ds for s in config["studies"].values() if model in s["models"] for ds in s["datasets"]]
        if not listed:
            raise ConfigError(f"{key}: no study lists model {model!r}, so no dataset trains its SAE; set "
                              f"{key}.dataset to a key of datasets")
        dataset = listed[0]
    elif dataset not in config["datasets"]:
        raise ConfigError(f"{key}.dataset names {dataset!r}, which is not a key of datasets "
                          f"({sorted(config['datasets'])})")
    return dataset, model, site


def check_concepts(config: dict) -> None:
    """Every `concepts.<name>` names an SAE the workflow trains (`concept_sae`) and two different folders."""
    for name, c in config.get("concepts", {}).items():
        concept_sae(config, name)
        if c["with_concept"] == c["without_concept"]:
            raise ConfigError(f"concepts.{name}: with_concept and without_concept are the same folder "
                              f"{c['with_concept']!r}; give the clips without the concept their own folder")
