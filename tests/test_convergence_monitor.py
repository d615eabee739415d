"""The convergence monitor with tiny real diffusers models and a tiny pure-torch extractor."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_unet, tiny_vae

from difftune_control.config import DetectorConfig
from difftune_control.convergence import ConvergenceMonitor

RES = 16  # pixels; the tiny VAE downsamples x2 -> 8x8 latents
STEPS = 2  # sampler steps


class BlurGrayExtractor:
    """Toy condition with the extractor contract the monitor relies on: blurred luminance hints,
    dissimilarity = per-image RMSE."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.nn.functional.avg_pool2d(x.float().mean(1, keepdim=True), 3, 1, 1, count_include_pad=False)
        return g.repeat(1, 3, 1, 1).clamp(0.0, 1.0)

    def dissimilarity(self, hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        hint = hint.float() / 255.0 if hint.dtype == torch.uint8 else hint.float()
        other = other.float() / 255.0 if other.dtype == torch.uint8 else other.float()
        return (hint - other).pow(2).mean(dim=(1, 2, 3)).sqrt()


@pytest.fixture(scope="module")
def models():
    from diffusers import ControlNetModel, DDPMScheduler

    torch.manual_seed(0)
    unet = tiny_unet(RES // 2)
    vae = tiny_vae(RES)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    scheduler_config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    return unet, vae, controlnet, scheduler_config


@pytest.fixture(scope="module")
def heldout():
    g = torch.Generator().manual_seed(1)
    k = 4
    images = torch.rand(k, 3, RES, RES, generator=g)
    hints = BlurGrayExtractor()(images)
    embeds = torch.randn(k, 5, 16, generator=g)
    return embeds, hints, images, [f"prompt {i}" for i in range(k)]


def _trained(controlnet):
    """A copy of ``controlnet`` whose zero convolutions are no longer zero (it controls)."""
    net = copy.deepcopy(controlnet)
    torch.manual_seed(4)
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    return net


def make_monitor(heldout, run_dir=None, seeds=(10, 11, 12, 13)) -> ConvergenceMonitor:
    embeds, hints, images, prompts = heldout
    config = DetectorConfig(
        convergence_every=5,
        convergence_samples=4,
        convergence_num_inference_steps=STEPS,
        convergence_threshold=0.3,
        convergence_patience=2,
    )
    return ConvergenceMonitor(
        config,
        BlurGrayExtractor(),
        embeds,
        hints,
        images,
        prompts=prompts,
        seeds=list(seeds),
        run_dir=run_dir,
    )


@pytest.fixture(scope="module")
def first(models, heldout, tmp_path_factory):
    """A monitor after its step-0 evaluation (references measured first) with a fresh ControlNet."""
    unet, vae, controlnet, sched = models
    run_dir = tmp_path_factory.mktemp("run")
    mon = make_monitor(heldout, run_dir=run_dir)
    assert mon.should_evaluate(0) and not mon.should_evaluate(3) and mon.should_evaluate(5)
    assert mon.should_evaluate(3, final=True)  # a run's last step, off the grid
    net = copy.deepcopy(controlnet).train()
    records = mon.evaluate(0, unet, vae, net, sched, elapsed=2.0)
    assert net.training, "the ControlNet must go back to train mode"
    assert all(p.grad is None for p in net.parameters())
    return mon, records, run_dir


def test_reference_d0_equals_zero_initialised_controlnet(models, heldout, first):
    from difftune_control.validation import sample_images

    unet, vae, controlnet, sched = models
    mon, records, _ = first
    ref = mon.reference_info
    embeds, hints, _, _ = heldout
    assert ref["d0"] > ref["d_floor"] > 0.0
    # the step-0 evaluation ran the fresh (zero-initialised) ControlNet at scale 1: exactly d0, p = 0
    assert records[0]["d_per_sample"] == pytest.approx(ref["d0_per_sample"], abs=1e-6)
    assert records[0]["p"] == pytest.approx(0.0, abs=1e-5)
    # sampling with the zero-initialised ControlNet at scale 1, and with a trained one switched off
    # by conditioning_scale=0, both give d0
    trained = copy.deepcopy(controlnet)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    ext = BlurGrayExtractor()
    for net, scale in ((controlnet, 1.0), (trained, 0.0)):
        images = sample_images(
            unet=unet,
            vae=vae,
            scheduler_config=sched,
            prompt_embeds=embeds,
            negative_prompt_embeds=None,
            seeds=[10, 11, 12, 13],
            resolution=RES,
            controlnet=net,
            hints=hints,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            conditioning_scale=scale,
        )
        assert ext.dissimilarity(hints, ext(images)).tolist() == pytest.approx(ref["d0_per_sample"], abs=1e-6)


def test_first_evaluation_with_a_trained_controlnet_samples_it(models, heldout):
    """Starting from an existing ControlNet: the reference is still 'no control', step 0 is not."""
    unet, vae, controlnet, sched = models
    net = _trained(controlnet)
    mon = make_monitor(heldout)
    rec = mon.evaluate(0, unet, vae, net, sched)[0]
    assert rec["d"] != pytest.approx(mon.reference_info["d0"], abs=1e-4)
    assert rec["p"] != pytest.approx(0.0, abs=1e-3)


def test_records_have_the_documented_fields_and_samples_are_written(models, first):
    from safetensors import safe_open

    unet, vae, controlnet, sched = models
    mon, records, run_dir = first
    rec = records[0]
    assert set(rec) == {
        "type",
        "step",
        "time",
        "d",
        "d_per_sample",
        "p",
        "aucc",
        "d0",
        "d_floor",
        "eval_seconds",
        "samples",
    }
    assert rec["type"] == "convergence_eval" and rec["step"] == 0 and rec["time"] == 2.0
    assert len(rec["d_per_sample"]) == 4
    assert rec["d"] == pytest.approx(sum(rec["d_per_sample"]) / 4)
    assert rec["eval_seconds"] > mon.reference_info["seconds"] > 0  # the reference cost is included
    assert rec["samples"] == "samples/eval-step0000000.safetensors"
    json.dumps(records)  # plain JSON, as metrics.jsonl needs
    assert not mon.should_evaluate(0), "a step is evaluated once"

    # move the ControlNet away from zero: the samples change, p moves, a new file is written
    mon = copy.deepcopy(mon)
    net = copy.deepcopy(controlnet)
    torch.manual_seed(3)
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    calls = []
    hook = vae.encoder.register_forward_hook(lambda *a: calls.append(1))  # only the reference encodes
    rec5 = mon.evaluate(5, unet, vae, net, sched, elapsed=7.0)[0]
    hook.remove()
    assert rec5["d"] != pytest.approx(rec["d"], abs=1e-4)
    assert rec5["p"] == pytest.approx((rec["d0"] - rec5["d"]) / (rec["d0"] - rec["d_floor"]), abs=1e-9)
    # AUCC so far over steps 0..5: the trapezoid from clip(p(0)) to clip(p(5)), over 5 steps
    clip = lambda x: min(1.0, max(0.0, x))  # noqa: E731
    assert rec["aucc"] == clip(rec["p"])
    assert rec5["aucc"] == pytest.approx(0.5 * (clip(rec["p"]) + clip(rec5["p"])), abs=1e-12)
    assert not calls, "no second reference (the VAE round trip of the real images runs once)"
    with safe_open(str(run_dir / rec5["samples"]), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(tensors) == {"hint", "sample", "reextracted"}
    for t in tensors.values():
        assert t.dtype == torch.uint8 and tuple(t.shape) == (4, 3, RES, RES)
    assert json.loads(meta["prompts"]) == [f"prompt {i}" for i in range(4)]
    # the stored re-extracted hints reproduce the logged per-sample dissimilarities (up to uint8 rounding)
    d = BlurGrayExtractor().dissimilarity(tensors["hint"], tensors["reextracted"])
    assert d.tolist() == pytest.approx(rec5["d_per_sample"], abs=0.01)
    assert not list(run_dir.glob("samples/.*.tmp"))


def test_resume_round_trip_keeps_references_and_history(heldout, first):
    mon, records, _ = first
    state = json.loads(json.dumps(mon.state_dict()))  # it goes through trainer_state.json
    resumed = make_monitor(heldout)
    resumed.load_state_dict(state)
    assert resumed.detector.state_dict() == mon.detector.state_dict()
    assert resumed.reference_info == mon.reference_info
    assert not resumed.should_evaluate(0) and resumed.should_evaluate(5)
    with pytest.raises(ValueError, match="keep --convergence_samples"):
        make_monitor(heldout, seeds=(1, 2, 3, 4)).load_state_dict(state)


def test_events_carry_time_of_the_declared_step(models, first):
    unet, vae, controlnet, sched = models
    mon = copy.deepcopy(first[0])
    # a ControlNet that follows the hint perfectly makes the real images: p jumps to ~1
    mon._sample = lambda *a, **k: mon.images.clone()
    r1 = mon.evaluate(5, unet, vae, controlnet, sched, elapsed=10.0)
    r2 = mon.evaluate(10, unet, vae, controlnet, sched, elapsed=20.0)
    assert [r["type"] for r in r1] == ["convergence_eval", "milestone", "milestone", "milestone"]
    assert [r["type"] for r in r2] == ["convergence_eval", "convergence_event"]
    event = r2[1]
    assert event["step"] == 5 and event["confirmed_step"] == 10 and event["time"] == 10.0
    assert event["p"] == pytest.approx(r1[0]["p"]) and r1[0]["p"] > 0.75
    # the raw real images skip the (random, tiny) VAE round trip, so they even beat the floor
    assert r1[0]["d"] == pytest.approx(0.0, abs=1e-6) and r1[0]["p"] > 1.0


def test_constructor_errors_teach(heldout):
    embeds, hints, images, _ = heldout
    cfg = DetectorConfig(convergence_every=0, convergence_samples=4, convergence_guidance_scale=3.0)
    with pytest.raises(ValueError) as err:
        ConvergenceMonitor(cfg, BlurGrayExtractor(), embeds, hints[:2], images)
    msg = str(err.value)
    assert "--convergence_every must be an int >= 1, got 0" in msg
    assert "got 4 prompt embeddings, 2 hints, 4 images" in msg
    assert "needs the empty prompt's embedding" in msg
    with pytest.warns(UserWarning, match="the detector uses 4"):
        mon = ConvergenceMonitor(
            DetectorConfig(convergence_every=5, convergence_samples=16),
            BlurGrayExtractor(),
            embeds,
            hints,
            images,
        )
    assert mon.num_samples == 4


def test_evaluations_sample_a_few_large_images_per_call_and_give_the_same_d(models, heldout, monkeypatch):
    """At 1024 px two images per sampling call (the peak memory of two, not of K); the split changes nothing:
    each sample's noise comes from its own seed."""
    import difftune_control.validation as v

    assert [v.sampling_batch(r) for r in (64, 512, 768, 1024, 2048)] == [512, 8, 3, 2, 1]
    unet, vae, controlnet, sched = models
    net = _trained(controlnet)
    whole = make_monitor(heldout).evaluate(0, unet, vae, net, sched)[0]["d"]
    calls, real = [], v.sample_images

    def spy(**kw):
        calls.append(kw["batch_size"])
        return real(**kw)

    monkeypatch.setattr(v, "sample_images", spy)
    monkeypatch.setattr(v, "SAMPLE_PIXELS", 2 * RES * RES)  # as 2 images at 1024 px
    split = make_monitor(heldout).evaluate(0, unet, vae, net, sched)[0]["d"]
    assert calls and set(calls) == {2}
    assert split == pytest.approx(whole, rel=1e-5)
