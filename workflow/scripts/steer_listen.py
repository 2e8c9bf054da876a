import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../../src")  # the package, also inside `--sdm conda` envs
from affectlens import stages  # noqa: E402
from affectlens.viz.report import steer_listen_page  # noqa: E402

w = snakemake.wildcards
with stages.logged(snakemake.log[0]):
    n = steer_listen_page(snakemake.input.steer, snakemake.input.manifest, snakemake.output[0],
                          title=f"{w.dataset} × {w.model}: steering {w.contrast.replace('-to-', ' → ')}")
    print(f"{n} audio players", file=sys.stderr)
