# affectlens: where a model represents a concept, how it can be read out, and whether it can be steered.
# Table of contents: config and its validation, one rules file per stage (each after the files whose
# rules it names in `rules.X.output`), the default target.

# The embedded default, unless a study is given with --configfile (which then replaces it whole
# rather than being merged into it); --config KEY=VALUE overrides either.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/patch.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/transfer.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/concepts.smk"
include: "workflow/rules/steer.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
