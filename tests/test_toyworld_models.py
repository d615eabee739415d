"""Toy world: the shipped pipeline, tokenizer and annotators load offline and work."""

from __future__ import annotations

import json

import pytest
import torch

from difftune_control.toyworld import (
    ANNOTATOR_KINDS,
    annotate_hint,
    default_base_model_path,
    load_annotator,
    render_scenes,
    split_seed,
    vocabulary,
)
from difftune_control.toyworld.evaluate import (
    colour_ids,
    depth_rmse,
    ground_truth_specs,
    mean_iou,
    normal_angle_error,
    score_text_following,
    text_following_prompts,
)
from difftune_control.toyworld.scene import COLOURS


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def held_out() -> dict:
    return render_scenes(16, split_seed(0, "validation"))


def test_shipped_pipeline_loads_and_samples_offline():
    from diffusers import StableDiffusionPipeline

    path = default_base_model_path()
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end, sched.num_train_timesteps) == (
        "scaled_linear",
        0.00085,
        0.012,
        1000,
    )
    assert (sched.clip_sample, sched.set_alpha_to_one, sched.steps_offset) == (False, False, 1)
    assert sched.prediction_type == "epsilon"
    kw = {"num_inference_steps": 4, "guidance_scale": 5.0, "output_type": "pt"}
    a = pipe("a red sphere on a grey floor", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a red sphere on a grey floor", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    # A trained model, not noise: the image is mostly smooth floor and sky.
    tv = (a[..., 1:, :] - a[..., :-1, :]).abs().mean() + (a[..., :, 1:] - a[..., :, :-1]).abs().mean()
    assert tv < 0.1


def test_parts_load_through_the_standard_subfolder_paths():
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = default_base_model_path()
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    assert unet.config.cross_attention_dim == text.config.hidden_size
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 64
    assert 0.5 < vae.config.scaling_factor < 2.0
    assert (path / "tokenizer" / "vocab.json").is_file() and (path / "tokenizer" / "merges.txt").is_file()
    vocab = json.loads((path / "tokenizer" / "vocab.json").read_text())
    assert len(tok) == len(vocab) == text.config.vocab_size
    assert text.config.pad_token_id == text.config.eos_token_id == tok.eos_token_id
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok(["a yellow zeppelin ??"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert text(ids)[0].shape == (1, 77, text.config.hidden_size)


def test_shipped_weights_fit_the_size_budget():
    from difftune_control.toyworld import WEIGHTS_DIR

    total = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total < 32 * 1024 * 1024


@pytest.mark.parametrize("resolution", [64, 128])
def test_annotators_load_and_match_ground_truth(resolution):
    out = render_scenes(8, split_seed(0, "validation"), resolution=resolution)
    depth, normal, seg = (load_annotator(k) for k in ANNOTATOR_KINDS)
    assert not depth.training and not any(p.requires_grad for p in depth.parameters())
    with torch.no_grad():
        d, n, s = depth(out["rgb"]), normal(out["rgb"]), seg(out["rgb"])
    assert d.shape == (8, 1, resolution, resolution) and 0 <= d.min() and d.max() <= 1
    assert n.shape == (8, 3, resolution, resolution)
    assert torch.allclose(n.norm(dim=1), torch.ones(8, resolution, resolution), atol=1e-3)
    assert s.shape == (8, 6, resolution, resolution)
    assert depth_rmse(d, out["inv_depth"]) < 0.03
    assert normal_angle_error(n, out["normal"]) < 8.0
    assert mean_iou(s.argmax(dim=1), out["classes"]) > 0.9


def test_annotate_hint_draws_controlnet_hints(held_out):
    for kind in ANNOTATOR_KINDS:
        hint = annotate_hint(load_annotator(kind), held_out["rgb"][:2])
        assert hint.shape == (2, 3, 64, 64) and 0 <= hint.min() and hint.max() <= 1
    grey = annotate_hint(load_annotator("depth"), held_out["rgb"][:2])
    assert torch.equal(grey[:, 0], grey[:, 1])


def test_load_annotator_errors_teach(tmp_path):
    with pytest.raises(ValueError, match="depth, normal, segmentation"):
        load_annotator("edges")
    with pytest.raises(FileNotFoundError, match="pretrain_toyworld"):
        load_annotator("depth", path=tmp_path / "missing.safetensors")
    from difftune_control.toyworld import annotator_path

    with pytest.raises(ValueError, match="holds a 'normal' annotator"):
        load_annotator("depth", path=annotator_path("normal"))
    with pytest.raises(ValueError, match="multiples of 8"):
        load_annotator("depth")(torch.rand(1, 3, 60, 60))


def test_scorer_is_exact_on_renders_with_true_classes():
    out = render_scenes(96, split_seed(0, "validation"))
    keep, specs = ground_truth_specs(out)
    assert len(keep) > 20 and {s["kind"] for s in specs} == {"single", "two"}
    scores = score_text_following(out["rgb"][keep], out["classes"][keep], specs)
    assert scores["single_correct"] == 1.0 and scores["two_left_right"] == 1.0
    # Swapping the expected order turns every left/right judgement wrong.
    swapped = [dict(s, objects=s["objects"][::-1]) if s["kind"] == "two" else s for s in specs]
    assert score_text_following(out["rgb"][keep], out["classes"][keep], swapped)["two_left_right"] == 0.0


def test_colour_ids_name_the_palette():
    pal = torch.tensor(list(COLOURS.values())).T[None, :, :, None]  # [1, 3, 8, 1]
    assert colour_ids(pal)[0, :, 0].tolist() == list(range(len(COLOURS)))
    assert colour_ids(pal * 0.5)[0, :, 0].tolist() == list(range(len(COLOURS)))  # shading keeps hue
    assert colour_ids(torch.full((1, 3, 2, 2), 0.5)).eq(-1).all()  # grey has no colour name


def test_text_following_prompts_are_balanced():
    specs = text_following_prompts(seed=0, n_single_repeats=1, n_two=10)
    singles = [s for s in specs if s["kind"] == "single"]
    assert len(singles) == 32 and len({s["objects"][0] for s in singles}) == 32
    for s in specs:
        if s["kind"] == "two":
            (c1, s1), (c2, s2) = s["objects"]
            assert c1 != c2 and s1 != s2
            left_first = s["prompt"].index(f"{c1} {s1}") < s["prompt"].index(f"{c2} {s2}")
            assert ("to the left of" in s["prompt"]) == left_first


def test_depth_edges_mark_both_sides_of_a_jump_and_weight_the_loss():
    from difftune_control.toyworld.pretrain import _annotator_loss, depth_edges

    inv = torch.zeros(1, 1, 6, 6)
    inv[..., :, 3:] = 0.5  # a vertical occlusion edge between columns 2 and 3
    inv[..., 0, 0] = 0.01  # a jump below the threshold: no edge
    edge = depth_edges(inv)
    assert edge[0, 0, :, 2:4].all() and edge.sum() == 12
    pred = inv.clone()
    pred[..., 2] += 0.1  # error on the edge column only
    plain = _annotator_loss("depth", pred, {"inv_depth": inv})
    weighted = _annotator_loss("depth", pred, {"inv_depth": inv}, edge_weight=4.0)
    per_pixel = 0.1 + 0.1**2
    assert plain == pytest.approx(per_pixel * 6 / 36)
    assert weighted == pytest.approx(per_pixel * 4 * 6 / (36 + 3 * 12))


def test_an_annotator_stage_continues_from_earlier_weights(tmp_path):
    """``annotator_init``: the stage starts from the shipped depth annotator (its loss at step 0 is that of a
    trained model, far below a fresh one's) and writes a file ``load_annotator`` reads."""
    import json

    from difftune_control.toyworld.pretrain import PretrainConfig, train_annotator
    from difftune_control.toyworld.weights import WEIGHTS_DIR

    losses = {}
    for name, init in (("fresh", None), ("continued", str(WEIGHTS_DIR))):
        cfg = PretrainConfig(out_dir=str(tmp_path / name), device="cpu", annotator_steps=1, annotator_pool=16,
                             annotator_pool_128=4, annotator_batch=8, log_every=1, annotator_init=init,
                             annotator_edge_weight=4.0)  # fmt: skip
        out = train_annotator(cfg, "depth")
        records = [
            json.loads(x)
            for x in (tmp_path / name / "logs" / "annotator_depth.jsonl").read_text().splitlines()
        ]
        losses[name] = next(r["loss"] for r in records if "loss" in r)
        assert load_annotator("depth", path=out)
    assert losses["continued"] < 0.2 * losses["fresh"], losses
    with pytest.raises(ValueError, match="annotator_edge_weight must be >= 1"):
        PretrainConfig(annotator_edge_weight=0.5)


@pytest.mark.slow
def test_pretrain_recipe_runs_end_to_end_on_cpu(tmp_path):
    from diffusers import StableDiffusionPipeline

    from difftune_control.toyworld.pretrain import PretrainConfig, train_annotator, train_vae
    from difftune_control.toyworld.pretrain_base import train_base

    cfg = PretrainConfig(out_dir=str(tmp_path), device="cpu", vae_steps=2, base_steps=2, annotator_steps=2,
                         vae_pool=16, base_pool=16, annotator_pool=16, annotator_pool_128=4, vae_batch=4,
                         base_batch=4, annotator_batch=4, save_every=1)  # fmt: skip
    train_vae(cfg)
    train_base(cfg)
    train_annotator(cfg, "segmentation")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.unet.config.sample_size == 16
    assert load_annotator("segmentation", path=tmp_path / "annotators" / "segmentation.safetensors")
    resumed = PretrainConfig(**{**cfg.__dict__, "base_steps": 3})
    train_base(resumed)
    log = (tmp_path / "logs" / "base.jsonl").read_text()
    assert '"event": "resume", "step": 2' in log


@pytest.mark.slow
def test_base_pretraining_resumes_exactly_and_portably(tmp_path):
    """Two chunks with an exact resume give the weights, EMA and optimizer state of one straight run;
    the compact state (EMA + step) continues a run elsewhere and fits the device tool's 16 MiB."""
    from difftune_control.toyworld.pretrain import PretrainConfig
    from difftune_control.toyworld.pretrain_base import PORTABLE_STATE, install_portable_state, train_base

    def cfg(out, **kw):
        base = dict(device="cpu", init_from=str(default_base_model_path()), base_steps=4, base_pool=6,
                    base_batch=2, base_warmup=2, save_every=100, log_every=1)  # fmt: skip
        return PretrainConfig(out_dir=str(tmp_path / out), **{**base, **kw})

    def state(out):
        return torch.load(tmp_path / out / "checkpoints" / "base.pt", weights_only=False)

    train_base(cfg("straight"))
    train_base(cfg("chunks", base_stop_at=2))
    half = state("chunks")
    assert half["step"] == 2
    portable = tmp_path / "chunks" / PORTABLE_STATE
    assert portable.stat().st_size < 16 * 2**20
    (tmp_path / "carried.safetensors").write_bytes(portable.read_bytes())
    train_base(cfg("chunks"))
    a, b = state("straight"), state("chunks")
    assert a["step"] == b["step"] == 4
    for key in ("unet", "text_encoder"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key  # same machine: bit-exact
    assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))
    assert all(
        torch.equal(a["opt"]["state"][i]["exp_avg_sq"], b["opt"]["state"][i]["exp_avg_sq"])
        for i in a["opt"]["state"]
    )
    assert not torch.equal(a["unet"]["conv_in.weight"], half["unet"]["conv_in.weight"])  # it trained

    train_base(cfg("elsewhere", resume_from=str(tmp_path / "carried.safetensors")))
    log = (tmp_path / "elsewhere" / "logs" / "base.jsonl").read_text()
    assert '"event": "resume_from"' in log and '"step": 2,' in log and '"step": 3,' in log
    assert state("elsewhere")["step"] == 4
    # the compact state installs as a pipeline: the same EMA weights as the run's own pipeline folder
    from diffusers import UNet2DConditionModel

    install_portable_state(
        tmp_path / "elsewhere" / PORTABLE_STATE, default_base_model_path(), tmp_path / "installed"
    )
    got, want = (
        UNet2DConditionModel.from_pretrained(tmp_path / d, subfolder="unet")
        for d in ("installed", "elsewhere/pipeline")
    )
    assert all(torch.equal(x, y) for x, y in zip(got.state_dict().values(), want.state_dict().values()))
    with pytest.raises(ValueError, match="not a toy base state"):
        train_base(
            cfg(
                "bad",
                resume_from=str(default_base_model_path() / "unet" / "diffusion_pytorch_model.safetensors"),
            )
        )


def test_the_compiled_base_step_trains_as_the_eager_one(tmp_path, monkeypatch):
    """``base_compile``: two steps through torch.compile (aot_eager: the CPU has no GPU kernels to fuse)
    give the eager run's losses and weights."""
    from difftune_control.toyworld.pretrain import PretrainConfig
    from difftune_control.toyworld.pretrain_base import train_base

    monkeypatch.setenv("DIFFTUNE_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path / "cache"))
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled-{compiled}"
        train_base(PretrainConfig(out_dir=str(out), device="cpu", init_from=str(default_base_model_path()),
                                  base_steps=2, base_pool=4, base_batch=2, base_warmup=1, save_every=100,
                                  log_every=1, base_compile=compiled))  # fmt: skip
        log = [json.loads(line) for line in (out / "logs" / "base.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in log if "loss" in r]
        runs[compiled] = (
            losses,
            torch.load(out / "checkpoints" / "base.pt", weights_only=False)["unet"],
            log,
        )
    assert any(r.get("event") == "compile" and r["mode"] == "default" for r in runs[True][2])
    assert not any(r.get("event") == "compile" for r in runs[False][2])
    assert len(runs[True][0]) == 2 and runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-4, atol=1e-6)


def test_the_base_compile_mode_is_checked_and_reaches_torch_compile(tmp_path, monkeypatch):
    """``base_compile_mode``: a wrong name is refused up front; ``reduce-overhead`` is what torch.compile gets,
    and each step starts a new CUDA-graph generation (counted here on the CPU, where nothing is graphed)."""
    from difftune_control.toyworld.pretrain import PretrainConfig
    from difftune_control.toyworld.pretrain_base import train_base

    with pytest.raises(ValueError, match="base_compile_mode must be default or reduce-overhead, got 'fast'"):
        PretrainConfig(base_compile_mode="fast")
    modes, marks = [], []
    real_compile = torch.compile

    def spy(fn, **kw):
        modes.append(kw.get("mode"))
        return real_compile(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path / "cache"))
    train_base(PretrainConfig(out_dir=str(tmp_path / "run"), device="cpu", init_from=str(default_base_model_path()),
                              base_steps=3, base_pool=4, base_batch=2, base_warmup=1, save_every=100, log_every=1,
                              base_compile=True, base_compile_mode="reduce-overhead"))  # fmt: skip
    assert modes == ["reduce-overhead"] and len(marks) == 3


def test_annotators_are_scored_on_a_shifted_domain_s_renders():
    """The annotators learnt default lighting: on dusk renders of the same scenes they err more (the detector's
    floor in that domain), and the score says which domain it was measured on by differing from the default's."""
    from difftune_control.toyworld.evaluate import evaluate_annotators

    models = {"depth": load_annotator("depth")}
    with torch.no_grad():
        default = evaluate_annotators(models, n=16)["depth_rmse@64"]
        dusk = evaluate_annotators(models, n=16, domain="dusk")["depth_rmse@64"]
    assert default < 0.02 and dusk > 1.5 * default


def test_an_annotator_pool_can_mix_domains():
    """``annotator_domains``: the pool holds equal shares of each domain, in order, from consecutive scenes; a
    default-only pool is the one rendered before the option; an unknown domain is refused by name."""
    from difftune_control.toyworld.pretrain import PretrainConfig, _render_pool

    cfg = PretrainConfig(device="cpu", annotator_domains="default, dusk")
    mixed = _render_pool(8, cfg, 64, keys=("inv_depth",), domains=cfg.annotator_domain_list())
    plain = _render_pool(8, cfg, 64, keys=("inv_depth",))
    assert cfg.annotator_domain_list() == ("default", "dusk") and mixed["rgb"].shape == (8, 3, 64, 64)
    assert torch.equal(mixed["rgb"][:4], plain["rgb"][:4])  # scenes 0-3, default lighting
    dusk = render_scenes(4, split_seed(0, "train"), 64, start=4, domain="dusk")
    assert torch.equal(mixed["rgb"][4:], (dusk["rgb"] * 255).round().to(torch.uint8))  # scenes 4-7 at dusk
    assert mixed["rgb"][4:].float().mean() < 0.7 * mixed["rgb"][:4].float().mean()
    assert torch.equal(mixed["inv_depth"][4:], dusk["inv_depth"].half())  # the geometry's targets, unchanged
    with pytest.raises(ValueError, match="annotator_domains.*moonlight"):
        PretrainConfig(annotator_domains="default,moonlight")
