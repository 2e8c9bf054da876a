"""SAELens interop (affectlens.sae.saelens): the hook-name map, the files an export writes, and
round trips through SAELens itself. An SAE trained here (every architecture, on frames far from
zero mean and unit scale), exported and loaded by `sae_lens.SAE.load_from_disk`, encodes and
decodes the same raw frames to 1e-5; an SAE that SAELens builds with random weights and saves
(standard, topk, jumprelu, its BatchTopK trainer, hook_z, b_dec not applied to the input, TopK
with decoder-norm rescaling, a pre-6.0 config), loaded here, does too. The tests that need
sae_lens skip where it is not installed (pyproject's `test` extra pins it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from affectlens.cli import main
from affectlens.models.sites import POINTS, SiteError
from affectlens.sae import (FORMATS, SparseAutoencoder, architecture_of, build, export, load, load_sae, save,
                            save_sae)
from affectlens.sae.saelens import (HOOKS, SAELENS_VERSION, WEIGHTS_FILE, from_saelens, hook_name, load_saelens,
                                    saelens_site, site_of_hook, to_saelens)

pytestmark = pytest.mark.usefixtures("one_thread")

SITE = "encoder.blocks.3.resid_post"
D_IN, D_SAE, K = 32, 128, 6


@pytest.fixture(scope="module")
def sl():
    return pytest.importorskip("sae_lens", reason="sae_lens is not installed (pyproject's `test` extra pins it)")


def frames(n: int, seed: int, d: int = D_IN) -> torch.Tensor:
    """Raw frames as a model's residual stream gives them: sparse atoms far from the origin and far
    from unit scale, so that our input normalisation (mean and scale) matters."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4 * d, d, generator=torch.Generator().manual_seed(99))
    codes = torch.rand(n, 4 * d, generator=g) * (torch.rand(n, 4 * d, generator=g) < 0.04)
    offset = torch.linspace(-20, 30, d)
    return 9.0 * codes @ atoms + offset + 0.05 * torch.randn(n, d, generator=g)


def trained(architecture: str) -> torch.nn.Module:
    """An SAE trained here on `frames` (a short run: the round trip needs real weights, not a good SAE)."""
    extra = {"relu": {}, "topk": {"k": K}, "batchtopk": {"k": K}, "jumprelu": {"init_threshold": 0.3}}[architecture]
    est = SparseAutoencoder(architecture, d_sae=D_SAE, n_samples=30_000, batch_size=500, lr=3e-3, seed=1,
                            **extra)
    return est.fit(frames(3000, seed=0).numpy(), device="cpu").sae_.eval()


def same(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Equal to 1e-5 of the largest magnitude compared (float32 sums of terms of that size)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())),
                               msg=lambda m: f"{what}: {m}" if what else m)


def assert_active(latents: torch.Tensor) -> None:
    """The comparison is not vacuous: latents fire, and not all of them."""
    l0 = (latents > 0).sum(1).float()
    assert 0 < float(l0.mean()) < latents.shape[1], f"mean L0 {float(l0.mean())}"


# -- hook names -----------------------------------------------------------------------------------

def test_every_point_of_the_site_grammar_has_a_hook_name_that_reads_back():
    assert set(POINTS) <= set(HOOKS), f"points without an SAELens hook name: {set(POINTS) - set(HOOKS)}"
    for tower in ("encoder", "decoder", "thinker"):
        sites = [f"{tower}.embed"] + [f"{tower}.blocks.{b}.{p}" for b in (0, 5, 11) for p in POINTS]
        for site in sites:
            assert site_of_hook(hook_name(site)) == site
    assert site_of_hook(hook_name("latent")) == "latent"


def test_hook_names_on_known_cases():
    assert hook_name("encoder.blocks.3.resid_post") == "encoder.blocks.3.hook_resid_post"
    assert hook_name("decoder.blocks.0.attn_out") == "decoder.blocks.0.hook_attn_out"
    assert hook_name("thinker.blocks.7.mlp_out") == "thinker.blocks.7.hook_mlp_out"
    assert hook_name("encoder.embed") == "encoder.blocks.0.hook_resid_pre"
    # the input to block L is the output of block L - 1: one site spelling
    assert site_of_hook("encoder.blocks.4.hook_resid_pre") == "encoder.blocks.3.resid_post"
    assert site_of_hook("encoder.blocks.0.hook_resid_pre") == "encoder.embed"
    # SAELens's language-model SAEs name no tower
    assert site_of_hook("blocks.3.hook_mlp_out", tower="decoder") == "decoder.blocks.3.mlp_out"
    assert HOOKS["attn_heads"] == "attn.hook_z" and HOOKS["mlp_hidden"] == "mlp.hook_post"


def test_hook_name_errors_say_what_to_give():
    with pytest.raises(SiteError, match="names no tower.*tower='encoder'"):
        site_of_hook("blocks.3.hook_resid_post")
    with pytest.raises(SiteError, match="hook_q.*has no affectlens site"):
        site_of_hook("encoder.blocks.3.attn.hook_q")
    with pytest.raises(SiteError, match="names the tower 'encoder', not the 'decoder'"):
        site_of_hook("encoder.blocks.3.hook_resid_post", tower="decoder")
    with pytest.raises(SiteError, match="unknown tower"):
        site_of_hook("blocks.3.hook_resid_post", tower="bogus")
    with pytest.raises(SiteError, match="resid_pre is spelled"):
        hook_name("encoder.blocks.3.resid_pre")


# -- the files an export writes (no sae_lens needed) ----------------------------------------------

def test_export_folds_the_normalisation_and_writes_saelens_keys(tmp_path):
    sae = build("topk", d_in=D_IN, d_sae=D_SAE, k=K)
    sae.init_from_data(frames(500, seed=3))
    s, m = float(sae.input_scale), sae.input_mean.clone()
    assert abs(s - 1) > 0.5 and float(m.abs().max()) > 10  # the fold is exercised
    out = save(sae, tmp_path / "sl", "saelens", site=SITE, model_name="whisper-base")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", WEIGHTS_FILE]
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "encoder.blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "whisper-base"
    assert cfg["metadata"]["sae_lens_version"] == SAELENS_VERSION
    assert cfg["metadata"]["affectlens"]["config"]["k"] == K
    _, state = to_saelens(sae, SITE)
    torch.testing.assert_close(state["W_enc"], (sae.W_enc * s).T.detach())
    torch.testing.assert_close(state["W_dec"], sae.W_dec.detach() / s)
    torch.testing.assert_close(state["b_dec"], m + sae.b_dec.detach() / s)
    assert saelens_site(out) == SITE


def test_format_errors_name_the_file_and_the_fix(tmp_path):
    sae = build("relu", d_in=D_IN, d_sae=D_SAE)
    save_sae(sae, tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match=r"sae_weights\.safetensors is missing.*format='affectlens'"):
        load(tmp_path / "ours", format="saelens")
    with pytest.raises(FileExistsError, match="affectlens SAE"):
        save(sae, tmp_path / "ours", "saelens", site=SITE)
    with pytest.raises(ValueError, match="unknown SAE format 'sparsify'"):
        load(tmp_path / "ours", format="sparsify")
    with pytest.raises(ValueError, match="needs the site"):
        save(sae, tmp_path / "x", "saelens")
    out = save(sae, tmp_path / "sl", "saelens", site=SITE)
    with pytest.raises(FileNotFoundError, match="holds an SAELens SAE.*format='saelens'"):
        load(out)
    cfg = json.loads((out / "cfg.json").read_text())
    for key, value, match in (("normalize_activations", "layer_norm", "rescales each frame at run time"),
                              ("architecture", "gated", "architecture 'gated'")):
        (out / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=f"cfg.json: .*{match}"):
            load(out, format="saelens")
    (out / "cfg.json").write_text(json.dumps({**cfg, "d_sae": D_SAE + 1}))
    with pytest.raises(ValueError, match=r"cfg.json: W_\w+ has shape .*\(d_in 32, d_sae 129\)"):
        load(out, format="saelens")
    (out / WEIGHTS_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(out, format="saelens")


# -- round trips through SAELens ------------------------------------------------------------------

def test_the_pinned_sae_lens_is_the_one_installed(sl):
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(rf'"sae-lens=={re.escape(SAELENS_VERSION)}"', pyproject), "pin sae-lens==SAELENS_VERSION"
    assert sl.__version__ == SAELENS_VERSION


@pytest.mark.parametrize("architecture", ["relu", "topk", "jumprelu", "batchtopk"])
def test_an_sae_trained_here_is_read_by_saelens_and_back(sl, tmp_path, architecture):
    ours = trained(architecture)
    assert float(ours.input_mean.abs().max()) > 10 and abs(float(ours.input_scale) - 1) > 0.5
    out = save(ours, tmp_path / "sl", "saelens", site=SITE)
    theirs = sl.SAE.load_from_disk(str(out))
    want = {"relu": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE"}
    assert type(theirs).__name__ == want[architecture]
    x = frames(400, seed=7)  # unseen raw frames, not normalised
    with torch.no_grad():
        z = ours.encode(x)
        assert_active(z)
        same(theirs.encode(x), z)
        same(theirs.decode(z), ours.decode(z))
        same(theirs(x), ours.decode(z))
        back = load(out, format="saelens")
        assert architecture_of(back) == architecture
        same(back.encode(x), z)
        same(back.decode(z), ours.decode(z))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """SAELens initialises biases and thresholds at zero; give every parameter random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.3 if name == "threshold" else 1.0
            p.copy_(scale * torch.randn(p.shape, generator=g) + (0.2 if name == "b_enc" else 0))


def saelens_cases(sl, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """SAEs built by SAELens from its configs with random weights and saved by SAELens:
    name -> (folder, the architecture it reads as here)."""
    from sae_lens.saes import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,
                               StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, TopKTrainingSAE,
                               TopKTrainingSAEConfig)
    from sae_lens.saes.sae import SAEMetadata

    def meta(hook):
        return SAEMetadata(model_name="gpt2", hook_name=hook)

    saes = {
        "standard": (StandardSAE(StandardSAEConfig(D_IN, D_SAE, metadata=meta("encoder.blocks.3.hook_resid_post"))),
                     "relu"),
        "standard, b_dec not applied to the input": (
            StandardSAE(StandardSAEConfig(D_IN, D_SAE, apply_b_dec_to_input=False,
                                          metadata=meta("blocks.2.hook_mlp_out"))), "relu"),
        "topk": (TopKSAE(TopKSAEConfig(D_IN, D_SAE, k=K, metadata=meta("blocks.2.hook_resid_pre"))), "topk"),
        "topk rescaled by decoder norms": (
            TopKSAE(TopKSAEConfig(D_IN, D_SAE, k=K, rescale_acts_by_decoder_norm=True,
                                  metadata=meta("blocks.2.hook_attn_out"))), "topk"),
        "jumprelu": (JumpReLUSAE(JumpReLUSAEConfig(D_IN, D_SAE, metadata=meta("blocks.0.hook_resid_pre"))),
                     "jumprelu"),
        "topk trainer": (TopKTrainingSAE(TopKTrainingSAEConfig(D_IN, D_SAE, k=K, metadata=meta("blocks.1.hook_mlp_out"))),
                         "topk"),
        "batchtopk trainer": (BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
            D_IN, D_SAE, k=float(K), metadata=meta("blocks.1.hook_resid_post"))), "batchtopk"),
    }
    out = {}
    for i, (name, (sae, ours)) in enumerate(saes.items()):
        _randomise(sae, seed=i)
        if name == "batchtopk trainer":
            sae.topk_threshold = torch.tensor(0.8, dtype=torch.double)
        folder = tmp_path / re.sub(r"\W+", "_", name)
        (sae.save_inference_model if hasattr(sae, "save_inference_model") else sae.save_model)(folder)
        out[name] = (folder, ours)
    return out


def test_saelens_saes_are_read_here(sl, tmp_path):
    x = frames(400, seed=11) / 10  # raw frames at the scale of these random weights
    for name, (folder, architecture) in saelens_cases(sl, tmp_path).items():
        theirs = sl.SAE.load_from_disk(str(folder))
        ours = load(folder, format="saelens")
        assert architecture_of(ours) == architecture, name
        with torch.no_grad():
            z = theirs.encode(x)
            assert_active(z)
            same(ours.encode(x), z, name)
            same(ours.decode(z), theirs.decode(z), name)


def test_hook_z_saes_read_the_heads_flattened(sl, tmp_path):
    """An SAE on TransformerLens's hook_z reads [..., head, d_head]; ours the same frames flattened
    head-major (the attn_heads site's layout)."""
    from sae_lens.saes import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    n_heads, d_head = 4, D_IN // 4
    theirs = StandardSAE(StandardSAEConfig(D_IN, D_SAE, reshape_activations="hook_z",
                                           metadata=SAEMetadata(hook_name="blocks.2.attn.hook_z")))
    _randomise(theirs, seed=5)
    theirs.save_model(tmp_path / "z")
    ours = load(tmp_path / "z", format="saelens")
    x = (frames(300, seed=5) / 10).reshape(300, n_heads, d_head)
    with torch.no_grad():
        z = theirs.encode(x)
        assert_active(z)
        same(ours.encode(x.flatten(1)), z)
        same(ours.decode(z), theirs.decode(z).flatten(1))


def test_a_pre_6_config_is_read_as_saelens_reads_it(sl, tmp_path):
    """The layout of SAEs saved before SAELens 6 (hook_point, activation_fn_str, a boolean
    normalize_activations, no version), still common among published SAEs."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    state = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, D_IN, generator=g),
             "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    (tmp_path / "old").mkdir()
    save_file(state, str(tmp_path / "old" / WEIGHTS_FILE))
    (tmp_path / "old" / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": "gpt2-small",
        "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8, "hook_point_head_index": None,
        "activation_fn_str": "relu", "apply_b_dec_to_input": True, "normalize_activations": False,
        "context_size": 128, "prepend_bos": True}))
    theirs = sl.SAE.load_from_disk(str(tmp_path / "old"))
    ours = load_saelens(tmp_path / "old")
    x = frames(300, seed=4) / 10
    with torch.no_grad():
        z = theirs.encode(x)
        assert_active(z)
        same(ours.encode(x), z)
        same(ours.decode(z), theirs.decode(z))
    assert saelens_site(tmp_path / "old", tower="thinker") == "thinker.blocks.7.resid_post"


def test_jumprelu_thresholds_at_or_below_zero_act_as_relu():
    """SAELens's JumpReLU is ReLU(pre) * (pre > t); ours pre * (pre > exp(log t)): t <= 0 reads as log t = -inf."""
    g = torch.Generator().manual_seed(0)
    state = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, D_IN, generator=g),
             "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.zeros(D_IN),
             "threshold": torch.where(torch.arange(D_SAE) % 2 == 0, -0.5, 0.0)}
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "metadata": {"sae_lens_version": "6.0.0"}}
    ours = from_saelens(cfg, state)
    x = torch.randn(50, D_IN, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), torch.relu(x @ state["W_enc"] + state["b_enc"]))


# -- the command line ------------------------------------------------------------------------------

def test_cli_exports_a_workflow_sae_and_imports_it_back(tmp_path, capsys):
    sae = build("batchtopk", d_in=D_IN, d_sae=D_SAE, k=K)
    sae.init_from_data(frames(500, seed=2))
    sae.threshold.fill_(0.5)
    folder = tmp_path / "results" / "sae" / "demo" / "whisper-tiny-en" / "encoder.blocks.2.resid_post"
    save_sae(sae, folder)
    (folder / "metrics.json").write_text(json.dumps({"site": "encoder.blocks.2.mlp_out"}))  # metrics wins
    assert main(["sae", "export", str(folder), "--format", "saelens", "--out", str(tmp_path / "sl")]) == 0
    said = capsys.readouterr().out
    assert "jumprelu" in said and "hook_name encoder.blocks.2.hook_mlp_out" in said
    meta = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "whisper-tiny-en" and meta["training_architecture"] == "batchtopk"
    assert main(["sae", "import", str(tmp_path / "sl"), "--format", "saelens", "--out", str(tmp_path / "ours")]) == 0
    assert "batchtopk" in capsys.readouterr().out
    back = load_sae(tmp_path / "ours")
    x = frames(200, seed=9)
    with torch.no_grad():
        same(back.encode(x), sae.encode(x))
        same(back.decode(back.encode(x)), sae.decode(sae.encode(x)))
    # the Python function is the same path, with the site given
    export(folder, tmp_path / "sl2", site="encoder.blocks.2.resid_post")
    assert saelens_site(tmp_path / "sl2") == "encoder.blocks.2.resid_post"
    assert FORMATS == ("affectlens", "saelens")


def test_cli_errors_name_the_folder(tmp_path, capsys):
    assert main(["sae", "export", str(tmp_path / "none"), "--format", "saelens", "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    save_sae(build("relu", d_in=D_IN, d_sae=D_SAE), tmp_path / "mysae")
    assert main(["sae", "export", str(tmp_path / "mysae"), "--format", "saelens", "--out", str(tmp_path / "o")]) == 2
    assert "--site encoder.blocks.3.resid_post" in capsys.readouterr().err
    assert main(["sae", "import", str(tmp_path / "mysae"), "--format", "saelens", "--out", str(tmp_path / "o")]) == 2
    assert "format='affectlens'" in capsys.readouterr().err
