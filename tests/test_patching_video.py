"""Video-QA causal tracing on tiny random-init Qwen2-VL and Qwen2.5-VL (the real transformers classes, built
offline) with known answers.

The counterfactual replaces frames 0-3 of an 8-frame video by their mean, so only the video
tokens of frames 0-3 differ between the runs, and the planted model's block 0 has no attention output
(o_proj = 0), so until block 1 nothing moves between positions. Hence, exactly:
  - at decoder.embed and decoder.blocks.0.resid_post, denoising the whole visual slice (or frames
    0-3) restores the clean metric (1), while text tokens and frames 4-7 (identical in both runs:
    patching them changes nothing) give 0; noising mirrors it;
  - at the last block's output only the answer position feeds the logits: the text slice (which
    holds it) gives 1 and the visual slice 0;
  - batched patching equals patching one slice at a time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from affectlens.models.positions import Positions
from affectlens.patching.video import (Question, answer_token_ids, counterfactual_video, question_prompt, slice_rows,
                                       trace_question)
from test_adapters_qwen_vl import tiny

torch.set_num_threads(1)
SITES = ["decoder.embed", "decoder.blocks.0.resid_post", "decoder.blocks.1.resid_post"]
SLICES = ["visual", "text", "visual_frames:0:4", "visual_frames:4:8", "visual_frames:0:2"]


def frames(n=8, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 56, 56, 3), dtype=np.uint8)


# --- counterfactual videos -------------------------------------------------------------------
def test_counterfactual_videos_move_exactly_the_frames_they_name():
    f = frames(6)
    swapped = counterfactual_video(f, "swap:0:2,4:6")
    np.testing.assert_array_equal(swapped, f[[4, 5, 2, 3, 0, 1]])
    np.testing.assert_array_equal(counterfactual_video(f, "reverse"), f[::-1])
    np.testing.assert_array_equal(counterfactual_video(f, "reverse:2:5"), f[[0, 1, 4, 3, 2, 5]])
    np.testing.assert_array_equal(counterfactual_video(f, "static:3"), f[[3] * 6])
    np.testing.assert_array_equal(counterfactual_video(f, "static"), f[[0] * 6])
    mean = counterfactual_video(f, "mean:0:2")
    np.testing.assert_array_equal(mean[0], mean[1])
    np.testing.assert_array_equal(mean[0], np.round((f[0].astype(float) + f[1]) / 2).astype(np.uint8))
    np.testing.assert_array_equal(mean[2:], f[2:])
    everywhere = counterfactual_video(f, "mean")
    assert (everywhere == everywhere[0]).all() and everywhere.dtype == np.uint8
    np.testing.assert_array_equal(f, frames(6))  # the input is never edited in place
    for bad, words in (("swap:0:2,3:6", "differ in length"), ("swap:0:3,2:5", "overlap"), ("reverse:4:9", "within"),
                       ("blur", "unknown counterfactual"), ("static:6", "within"), ("swap:0:2", "two frame spans")):
        with pytest.raises(ValueError, match=words):
            counterfactual_video(f, bad)


def test_token_slices_select_video_tokens_by_frame_and_text_tokens():
    kind = ["text"] * 2 + ["video"] * 8 + ["text"] * 3
    frame = [-1] * 2 + [0, 0, 1, 1, 2, 2, 3, 3] + [-1] * 3
    p = Positions(np.arange(13) + 1, kind, np.full(13, np.nan), frame, [""] * 13)
    assert slice_rows(p, "visual", 2).tolist() == list(range(3, 11))
    assert slice_rows(p, "text", 2).tolist() == [1, 2, 11, 12, 13]
    assert slice_rows(p, "visual_frames:2:6", 2).tolist() == [5, 6, 7, 8]  # tokens of frames 1 and 2
    assert slice_rows(p, "visual_frames:0:8", 2).tolist() == list(range(3, 11))
    for bad, words in (("visual_frames:1:4", "multiples of 2"), ("visual_frames:0:10", "has 8 frames"),
                       ("audio", "choose visual, text")):
        with pytest.raises(ValueError, match=words):
            slice_rows(p, bad, 2)


# --- tracing ---------------------------------------------------------------------------------
def plant(adapter):
    with torch.no_grad():
        adapter.lm_layers[0].self_attn.o_proj.weight.zero_()  # block 0 moves nothing between positions
        # A random model barely reads the video at the answer position: block 1's attention output,
        # scaled up, makes the answer depend on what the video tokens hold.
        adapter.lm_layers[1].self_attn.o_proj.weight.mul_(300.0)
        adapter.model.lm_head.weight.mul_(20.0)
    return adapter


def save_model(adapter, folder):
    """The adapter's model and processor parts in a folder, as the loader reads a local model."""
    adapter.model.save_pretrained(folder)
    adapter.processor.tokenizer.save_pretrained(folder)
    adapter.processor.image_processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def planted(request):
    mp = pytest.MonkeyPatch()
    adapter = tiny(request.param, mp)
    mp.undo()
    return plant(adapter)


def question():
    return Question("q1", "v1.mp4", frames(8), np.arange(8) * 0.5, "What happens first?",
                    ["a dog runs", "a cat sits", "nothing"], gold="a cat sits")


def test_the_answer_is_the_candidate_whose_letter_scores_highest(planted):
    q = question()
    ids = answer_token_ids(planted.processor.tokenizer, q)
    assert len(set(ids)) == 3 and "C. nothing" in question_prompt(q)
    batch = planted.prepare([{"video": {"frames": q.frames, "times": q.times}, "text": question_prompt(q)}])
    logits = planted.forward(batch)[0, batch.positions["decoder"][0].index[-1], ids]
    table = trace_question(planted, q, ["reverse"], ["decoder.embed"], ["visual"])
    assert set(table["answer"]) == {q.candidates[int(logits.argmax())]}
    assert (table["alternative"] != table["answer"]).all()
    with pytest.raises(ValueError, match="share a first token"):
        answer_token_ids(planted.processor.tokenizer, Question("q2", "v", q.frames, q.times, "?", ["a b", "a c"]),
                         answer_style="text")


def test_video_trace_known_answers_and_batched_equals_one_at_a_time(planted):
    q = question()
    table = trace_question(planted, q, ["mean:0:4", "reverse"], SITES, SLICES, max_batch=16)
    assert len(table) == 2 * 2 * len(SITES) * len(SLICES)
    assert np.isfinite(table["raw"]).all()
    cf = table[table["counterfactual"] == "mean:0:4"]
    assert (cf["clean"] - cf["corrupt"]).abs().min() > 5e-2  # the counterfactual changes the metric
    assert np.isfinite(cf["normalised"]).all()
    effect = cf.set_index(["direction", "site", "slice"])["normalised"]
    for site in SITES[:2]:
        for slc, restored in (("visual", 1.0), ("visual_frames:0:4", 1.0), ("text", 0.0), ("visual_frames:4:8", 0.0)):
            assert effect["denoising", site, slc] == pytest.approx(restored, abs=1e-4), (site, slc)
            assert effect["noising", site, slc] == pytest.approx(1.0 - restored, abs=1e-4), (site, slc)
    last = SITES[-1]
    assert effect["denoising", last, "text"] == pytest.approx(1.0, abs=1e-4)
    assert effect["denoising", last, "visual"] == pytest.approx(0.0, abs=1e-4)
    assert effect["noising", last, "text"] == pytest.approx(0.0, abs=1e-4)
    # Raw values are kept beside the normalised ones: denoising the whole video is the clean run.
    row = cf[(cf["direction"] == "denoising") & (cf["site"] == "decoder.embed") & (cf["slice"] == "visual")]
    assert float(row["raw"].iloc[0]) == pytest.approx(float(row["clean"].iloc[0]), abs=1e-4)
    assert set(cf["n_positions"][cf["slice"] == "visual_frames:0:2"]) == {16 // 4}  # one 56 x 56 frame: 4 tokens
    one_at_a_time = trace_question(planted, q, ["mean:0:4", "reverse"], SITES, SLICES, max_batch=1)
    np.testing.assert_allclose(one_at_a_time["raw"], table["raw"], atol=1e-5, rtol=0)
    assert one_at_a_time[["counterfactual", "site", "slice", "direction"]].equals(
        table[["counterfactual", "site", "slice", "direction"]])


def test_trace_refuses_vision_sites_and_misaligned_counterfactuals(planted):
    q = question()
    with pytest.raises(ValueError, match="LM sites"):
        trace_question(planted, q, ["reverse"], ["vision.blocks.0.resid_post"], ["visual"])
    with pytest.raises(ValueError, match="multiples of 2"):
        trace_question(planted, q, ["reverse"], ["decoder.embed"], ["visual_frames:1:3"])


# --- the workflow's trace stage ----------------------------------------------------------------
def test_trace_stage_reads_the_decoded_manifest_and_writes_tables_and_heatmaps(planted, tmp_path):
    """stages.patch.trace as the `trace` rule calls it: a decoded video_qa manifest (frames in npz), the
    planted model saved as a folder; the per-question table holds every question x counterfactual
    x direction x site x slice, the known answers hold per question, one heatmap per counterfactual."""
    import json

    import pandas as pd

    from affectlens import stages
    from affectlens.data.manifest import write_manifest
    from affectlens.probes.outcomes import patch_outcomes

    save_model(planted, tmp_path / "model")
    rows = []
    for i in range(3):
        npz = tmp_path / f"q{i}.npz"
        np.savez(npz, frames=frames(8, seed=i), times=np.arange(8) * 0.5)
        rows.append({"clip_id": f"q{i}", "dataset": "vqa", "path": f"v{i}.mp4", "split": "all", "label": "a cat sits",
                     "speaker": f"v{i}", "pair_key": np.nan, "text": "What happens first?", "start": np.nan,
                     "end": np.nan, "duration": np.nan, "video_name": f"v{i}.mp4", "frames_path": str(npz),
                     "candidates": json.dumps(["a dog runs", "a cat sits", "nothing"]) if i < 2 else np.nan})
    manifest = write_manifest(pd.DataFrame(rows), tmp_path / "manifest.tsv")
    params = {"counterfactuals": ["mean:0:4", "reverse"], "slices": ["visual", "text", "visual_frames:4:8"],
              "sites": ["decoder.embed", "decoder.blocks.*.resid_post"], "n_questions": None,
              "answer_style": "letter", "max_batch": 8, "seed": 0}
    model = {"family": planted.family, "source": str(tmp_path / "model"), "device": "cpu", "sites": params["sites"]}
    out = tmp_path / "trace"
    stages.patch.trace(manifest, {"source": "video_qa"}, model, params, out / "per_question.tsv", out / "pairs.tsv",
                 out / "summary.tsv", out / "heatmaps")
    table = pd.read_csv(out / "per_question.tsv", sep="\t")
    assert sorted(set(table["question_id"])) == ["q0", "q1"]  # q2 has no candidates
    assert len(table) == 2 * 2 * 2 * 3 * 3 and (table["gold"] == "a cat sits").all()
    mean = table[table["counterfactual"] == "mean:0:4"].set_index(["question_id", "direction", "site", "slice"])
    for q in ("q0", "q1"):
        assert mean.loc[(q, "denoising", "decoder.embed", "visual"), "normalised"] == pytest.approx(1.0, abs=1e-4)
        assert mean.loc[(q, "denoising", "decoder.embed", "text"), "normalised"] == pytest.approx(0.0, abs=1e-4)
        assert mean.loc[(q, "noising", "decoder.embed", "visual_frames:4:8"), "normalised"] == pytest.approx(1.0, abs=1e-4)
    summary = pd.read_csv(out / "summary.tsv", sep="\t")
    assert len(summary) == 2 * 2 * 3 * 3 and (summary["n_questions"] + summary["n_excluded"] == 2).all()
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["00_mean.png", "01_reverse.png"]
    # The tables feed the probes on patching outcomes as the patch stage's pairs and effects do:
    # per question and site, did some slice restore the answer the counterfactual took away?
    pairs = pd.read_csv(out / "pairs.tsv", sep="\t")
    assert len(pairs) == 4 and (pairs["clean_clip"] == pairs["question_id"]).all()
    outcomes = patch_outcomes(table, pairs)
    assert len(outcomes) == 2 * 3 and set(outcomes["clip_id"]) == {"q0", "q1"}
    changed = table[(table["corrupt"] < 0) & (table["site"] == "decoder.embed") & (table["slice"] == "visual")]
    assert len(changed)  # some counterfactual changed some answer
    for q in set(changed["question_id"]):  # denoising the whole video at the embedding restores the answer
        assert outcomes.set_index(["clip_id", "site"]).loc[(q, "decoder.embed"), "flipped"]
    with pytest.raises(ValueError, match="video_qa dataset"):
        stages.patch.trace(manifest, {"source": "folder"}, model, params, *(out / n for n in ("a.tsv", "b.tsv", "c.tsv", "d")))
    with pytest.raises(ValueError, match="families"):
        stages.patch.trace(manifest, {"source": "video_qa"}, {**model, "family": "whisper"}, params,
                     *(out / n for n in ("a.tsv", "b.tsv", "c.tsv", "d")))


@pytest.mark.slow
@pytest.mark.workflow
def test_trace_outcome_probe_runs_from_the_videos_through_the_workflow(tmp_path, monkeypatch):
    """The real DAG for `results/probe_trace_outcomes/{dataset}/{model}.tsv` alone: raw, manifest,
    decode (frames of 4 videos x 3 questions), extract and trace with the planted Qwen2-VL, then the
    probe. Every counterfactual x LM site has its probe (accuracy at every stored site) or a `skipped`
    row, and the flips and holds it counts are those of the per-question table (denoising: some
    slice turned the sign of the answer metric)."""
    import pandas as pd
    import yaml

    from dataset_fixtures import write_json, write_media
    from test_workflow import snakemake

    work = tmp_path
    model = save_model(plant(tiny("qwen2-vl", monkeypatch)), work / "model")
    ann = []
    for v in range(4):
        write_media(work / "videos" / f"v{v}.mp4", np.zeros(32000), fps=4, size=(56, 56), acodec=None,
                    images=frames(8, seed=v))
        ann += [{"video_name": f"v{v}.mp4", "question": question, "question_id": f"{v}{k:02d}",
                 "candidates": ["a dog runs", "a cat sits", "nothing"], "answer": "a cat sits"}
                for k, question in enumerate(("What happens first?", "What is shown?", "What moves?"))]
    write_json(work / "annotations.json", ann)
    cfg = {"datasets": {"vqa": {"source": "video_qa", "label_column": "label",
                                "video": {"frame_rate": 4.0, "max_frames": 8, "size": 56},
                                "video_qa": {"annotations": str(work / "annotations.json"), "videos": str(work / "videos")}}},
           "models": {"tinyvl": {"family": "qwen2-vl", "source": str(model), "device": "cpu",
                                 "sites": ["decoder.embed", "decoder.blocks.*.resid_post"], "sae_sites": [],
                                 "steer_site": None}},
           "studies": {"vqa": {"datasets": ["vqa"], "models": ["tinyvl"], "contrasts": []}},
           "probe": {"n_permutations": 9, "n_splits": 2},
           "trace": {"counterfactuals": ["mean:0:4", "reverse"], "slices": ["visual", "text", "visual_frames:4:8"],
                     "sites": ["decoder.embed", "decoder.blocks.*.resid_post"], "n_questions": None}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    # one torch thread per job: two spin-waiting threads on two busy cores run the trace ~10x slower
    done = snakemake(work, "results/probe_trace_outcomes/vqa/tinyvl.tsv", "--set-threads", "extract=1", "trace=1")
    assert done.returncode == 0, done.stderr[-4000:]

    per_question = pd.read_csv(work / "results/trace/vqa/tinyvl/per_question.tsv", sep="\t", dtype={"question_id": str})
    assert sorted(set(per_question.question_id)) == sorted(a["question_id"] for a in ann)
    d = per_question[per_question.direction == "denoising"]
    flips = (np.sign(d.raw) != np.sign(d.corrupt)).groupby([d.counterfactual, d.site, d.question_id]).any()
    table = pd.read_csv(work / "results/probe_trace_outcomes/vqa/tinyvl.tsv", sep="\t")
    sites = ["decoder.embed", "decoder.blocks.0.resid_post", "decoder.blocks.1.resid_post"]
    assert set(table.probe) == {f"flip[{cf}]@{s}" for cf in ("mean:0:4", "reverse") for s in sites}
    for (cf, site), flipped in flips.groupby(level=[0, 1]):
        rows = table[table.probe == f"flip[{cf}]@{site}"]
        n_flip = int(flipped.sum())
        if (rows.metric == "skipped").all():
            assert len(rows) == 1 and f"{n_flip} questions flip and {12 - n_flip} hold" in rows.reason.iloc[0]
        else:
            acc = rows[rows.metric == "accuracy"]
            assert set(acc.site) == set(sites) and (acc.n_clips == 12).all() and acc.value.between(0, 1).all()
            assert (acc.p_value >= 0.1).all() and min(n_flip, 12 - n_flip) >= 2
    # denoising the whole video at the embedding restores the clean run: every answer a counterfactual
    # changed flips back there (a partial slice may also change an answer the counterfactual kept)
    for cf in ("mean:0:4", "reverse"):
        changed = set(d.question_id[(d.counterfactual == cf) & (d.corrupt < 0)])
        assert changed <= set(flips[cf, "decoder.embed"][lambda x: x].index), cf
    assert (table.metric != "skipped").any(), "the planted model's answers should change for some questions"
