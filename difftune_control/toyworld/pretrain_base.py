"""The base stage of the toy world's pretraining: CLIP text encoder + UNet on the VAE's latents.

Three ways to start, in this order of precedence:

- ``<out_dir>/checkpoints/base.pt`` exists: an exact resume (weights, AdamW state, EMA, data-order
  generator and step), as if the run had never stopped;
- ``resume_from`` names a ``base_ema.safetensors`` (the compact state every save writes beside the
  pipeline, small enough to carry between machines): the run continues at its step from its EMA
  weights, with a fresh optimizer whose learning rate warms up again over ``base_warmup`` steps;
- otherwise from ``init_from``'s weights (an earlier pipeline folder), or from scratch.

The VAE is ``<out_dir>/vae`` (the ``vae`` stage's result) or, when that does not exist,
``init_from``'s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .models import make_scheduler, make_text_encoder, make_unet
from .pretrain import PretrainConfig, _autocast, _cosine_lr, _Log, _render_pool, _setup

PORTABLE_STATE = "base_ema.safetensors"
"""File name of the compact state (EMA weights in fp16 and the step) in ``<out_dir>``."""


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_lerp_(ema, params, 1.0 - decay)


def save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet) -> Path:
    """Save a ``StableDiffusionPipeline`` folder (fp16 safetensors, no safety checker)."""
    import copy

    from diffusers import StableDiffusionPipeline

    from .tokenizer import tokenizer_files

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to("cpu", torch.float16),
        text_encoder=copy.deepcopy(text_encoder).to("cpu", torch.float16),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to("cpu", torch.float16),
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; keep CLIP's classic vocab.json + merges.txt beside it
    # so that every loader (slow or fast, old or new) finds the word-level vocabulary.
    # The weights are stored in fp16, but like diffusers' models (which load in float32 unless told
    # otherwise) the text encoder should load in float32 by default, so that
    # StableDiffusionPipeline.from_pretrained(path) without torch_dtype gets one dtype throughout.
    te_config = Path(folder) / "text_encoder" / "config.json"
    config = json.loads(te_config.read_text())
    config["dtype"] = "float32"
    te_config.write_text(json.dumps(config, indent=2) + "\n")
    for part in ("vae", "unet"):  # drop the training machine's paths recorded by from_pretrained
        cfg_file = Path(folder) / part / "config.json"
        config = json.loads(cfg_file.read_text())
        config.pop("_name_or_path", None)
        cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    vocab, merges = tokenizer_files()
    (Path(folder) / "tokenizer" / "vocab.json").write_text(
        json.dumps(vocab, indent=0, ensure_ascii=False) + "\n"
    )
    (Path(folder) / "tokenizer" / "merges.txt").write_text("\n".join(merges) + "\n")
    return folder


def _named(models: dict) -> list[tuple[str, torch.Tensor]]:
    """``(part.name, parameter)`` of the trained models, in the order of the optimizer's params."""
    return [(f"{part}.{n}", p) for part, m in models.items() for n, p in m.named_parameters()]


def save_portable_state(path: Path, names: list[str], ema: list[torch.Tensor], step: int, seed: int) -> Path:
    """Write the EMA weights (fp16) and the step: what another machine needs to continue the run."""
    from ..utils import atomic_save_safetensors

    tensors = {n: e.detach().to("cpu", torch.float16).contiguous() for n, e in zip(names, ema)}
    meta = {"format": "toyworld-base-ema", "step": str(step), "seed": str(seed)}
    atomic_save_safetensors(tensors, path, metadata=meta)
    return path


def load_portable_state(path: str | os.PathLike, names: list[str]) -> tuple[list[torch.Tensor], int]:
    """Read :func:`save_portable_state`'s file: the EMA tensors in ``names``' order and the step.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not a toy base state or its parameters differ from the model's.
    """
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"resume_from: no such file {path} (a {PORTABLE_STATE} from an earlier run)")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        keys = set(fh.keys())
        if meta.get("format") != "toyworld-base-ema":
            raise ValueError(f"resume_from: {path} is not a toy base state (format {meta.get('format')!r})")
        missing, extra = sorted(set(names) - keys), sorted(keys - set(names))
        if missing or extra:
            raise ValueError(
                f"resume_from: {path} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        return [fh.get_tensor(n).float() for n in names], int(meta["step"])


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_vae(cfg: PretrainConfig, out_dir: Path):
    from diffusers import AutoencoderKL

    if (out_dir / "vae").exists():
        return AutoencoderKL.from_pretrained(out_dir / "vae", torch_dtype=torch.float32)
    if cfg.init_from:
        return AutoencoderKL.from_pretrained(cfg.init_from, subfolder="vae", torch_dtype=torch.float32)
    raise FileNotFoundError(
        f"the base stage needs a VAE: {out_dir / 'vae'} does not exist; run --stage vae first or give "
        "--init_from a pipeline folder (its VAE is used)"
    )


def train_base(cfg: PretrainConfig) -> Path:
    """Train the CLIP text encoder and the UNet jointly on the VAE's latents (epsilon prediction)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from .tokenizer import build_tokenizer

    _setup(cfg)
    log = _Log(cfg, "base")
    out_dir = Path(cfg.out_dir)
    dev = cfg.device
    tokenizer = build_tokenizer()
    vae = _load_vae(cfg, out_dir).to(dev).eval()
    if cfg.init_from:
        init = StableDiffusionPipeline.from_pretrained(cfg.init_from, torch_dtype=torch.float32)
        text_encoder, unet = init.text_encoder, init.unet
        log(event="init_from", path=cfg.init_from)
    else:
        text_encoder = make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        unet = make_unet(cfg.resolution // 4, text_encoder.config.hidden_size)
    text_encoder.to(dev).train()
    unet.to(dev, memory_format=torch.channels_last).train()
    sched = DDPMScheduler.from_config(make_scheduler().config)

    named = _named({"text_encoder": text_encoder, "unet": unet})
    names, params = [n for n, _ in named], [p for _, p in named]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.base_lr, weight_decay=1e-2, fused=dev.startswith("cuda"))
    gen = torch.Generator(dev).manual_seed(cfg.seed + 1)
    ckpt = out_dir / "checkpoints" / "base.pt"
    start, rewarm_from = 0, None
    if ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        text_encoder.load_state_dict(state["text_encoder"])
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        for e, v in zip(ema, state["ema"]):
            e.copy_(v)
        gen.set_state(state["gen"].cpu())  # generator states are CPU byte tensors on every device
        start = state["step"]
        log(event="resume", step=start)
    elif cfg.resume_from:
        tensors, start = load_portable_state(cfg.resume_from, names)
        with torch.no_grad():
            for p, e, v in zip(params, ema, tensors):
                p.copy_(v)
                e.copy_(v)
        gen.manual_seed(cfg.seed + 1 + start)  # a fresh data order from here on
        rewarm_from = start
        log(event="resume_from", path=cfg.resume_from, step=start, optimizer="fresh")

    # Data: a pool of scenes -> posterior mean / std of the latents and token ids of the captions.
    pool = _render_pool(cfg.base_pool, cfg, cfg.resolution)
    ids = tokenizer(pool["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(dev)  # fmt: skip
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    empty_ids = empty.input_ids.to(dev)
    means, stds = [], []
    with torch.no_grad(), _autocast(dev):
        for batch in pool["rgb"].split(2048):
            dist = vae.encode(batch.float() / 127.5 - 1.0).latent_dist
            means.append(dist.mean.half())
            stds.append(dist.std.half())
    lat_mean, lat_std = torch.cat(means), torch.cat(stds)
    del pool["rgb"], means, stds
    sf = vae.config.scaling_factor
    log(event="pool", scenes=len(lat_mean), scaling_factor=sf)

    alphas = sched.alphas_cumprod.to(dev)
    snr = alphas / (1 - alphas)

    def save(step: int) -> None:
        _atomic_torch_save({"text_encoder": text_encoder.state_dict(), "unet": unet.state_dict(),
                            "opt": opt.state_dict(), "ema": ema, "gen": gen.get_state(), "step": step}, ckpt)  # fmt: skip
        save_portable_state(out_dir / PORTABLE_STATE, names, ema, step, cfg.seed)
        with torch.no_grad():
            live = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, ema)  # write the EMA weights into the models for saving
            save_pipeline(out_dir / "pipeline", vae, text_encoder, tokenizer, unet)
            torch._foreach_copy_(params, live)
        log(event="saved", step=step, path=str(out_dir / "pipeline"))

    def per_sample_loss(tokens, noisy, t, noise):
        with _autocast(dev):
            hidden = text_encoder(tokens)[0]
            pred = unet(noisy, t, hidden).sample.float()
        return (pred - noise).pow(2).mean(dim=(1, 2, 3))

    forward = per_sample_loss
    if cfg.base_compile:  # the run's backend; inductor's artefacts kept for the next chunk on this machine
        from ..compiler import compile_backend, compile_cache

        backend, mode = compile_backend(), cfg.base_compile_mode
        log(event="compile", backend=backend, mode=mode, cache=compile_cache()["dir"])
        forward = torch.compile(
            per_sample_loss, backend=backend, **({} if mode == "default" else {"mode": mode})
        )
    graphed = cfg.base_compile and cfg.base_compile_mode == "reduce-overhead"
    t0, done, saved = time.time(), start, False
    end = min(cfg.base_steps, cfg.base_stop_at or cfg.base_steps)
    for step in range(start, end):
        lr = _cosine_lr(step, cfg.base_steps, cfg.base_lr, cfg.base_warmup)
        if rewarm_from is not None:  # a fresh optimizer after resume_from: warm its steps up again
            lr *= min(1.0, (step - rewarm_from + 1) / cfg.base_warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        b = cfg.base_batch
        idx = torch.randint(len(lat_mean), (b,), device=dev, generator=gen)
        eps_lat = torch.randn(lat_mean[idx].shape, device=dev, generator=gen)
        latents = (lat_mean[idx].float() + lat_std[idx].float() * eps_lat) * sf
        drop = torch.rand(b, device=dev, generator=gen) < cfg.caption_dropout
        tokens = torch.where(drop[:, None], empty_ids, ids[idx])
        noise = torch.randn(latents.shape, device=dev, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=dev, generator=gen)
        noisy = sched.add_noise(latents, noise, t).contiguous(memory_format=torch.channels_last)
        if graphed:  # a new step: the last step's graph outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        per_sample = forward(tokens, noisy, t, noise)
        if cfg.min_snr_gamma:
            per_sample = per_sample * snr[t].clamp(max=cfg.min_snr_gamma) / snr[t]
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
        done = step + 1
        if step % cfg.log_every == 0:
            rate = (step + 1 - start) / max(time.time() - t0, 1e-6)
            log(step=step, loss=round(loss.item(), 5), lr=lr, steps_per_s=round(rate, 2))
        saved = done % cfg.save_every == 0
        if saved:
            save(done)
        if cfg.time_budget and time.time() - t0 > cfg.time_budget:
            log(event="time_budget", step=done)
            break
    if (not saved and done > start) or not (out_dir / "pipeline").exists():
        save(done)
    return out_dir / "pipeline"


def install_portable_state(
    state_file: str | os.PathLike, pipeline_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """Write the EMA weights of a ``base_ema.safetensors`` as a pipeline folder.

    The VAE, tokenizer and scheduler come from ``pipeline_dir`` (the pipeline the run started from);
    ``out_dir`` may be ``pipeline_dir`` itself (install in place).

    Returns:
        `pathlib.Path`: ``out_dir``.
    """
    from diffusers import StableDiffusionPipeline

    from .tokenizer import build_tokenizer

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, torch_dtype=torch.float32)
    named = _named({"text_encoder": pipe.text_encoder, "unet": pipe.unet})
    tensors, _ = load_portable_state(state_file, [n for n, _ in named])
    with torch.no_grad():
        for (_, p), v in zip(named, tensors):
            p.copy_(v)
    return save_pipeline(Path(out_dir), pipe.vae, pipe.text_encoder, build_tokenizer(), pipe.unet)
