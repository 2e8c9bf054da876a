import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402
from affectlens.viz.report import benchmark_summary  # noqa: E402

with stages.logged(snakemake.log[0]):
    table = benchmark_summary(list(snakemake.input), snakemake.output.table, snakemake.output.plot)
    print(table.to_string(), file=sys.stderr)
