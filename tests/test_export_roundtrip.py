"""Export -> reload -> identical outputs, on tiny real ControlNets inside fake run folders."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from difftune_control.export import (
    VerificationError,
    diffusers_to_ldm,
    export_controlnet,
    load_controlnet,
    resolve_source,
)
from difftune_control.export.verify import (
    RELOAD_TOLERANCE,
    controlnet_outputs,
    fixed_inputs,
    max_relative_error,
    verify_reload,
)
from difftune_control.export.webui import verify_webui_file

# Four hint-embedding widths: the SD hint encoder's shape, which diffusers' from_single_file reads.
TINY = dict(
    block_out_channels=(8, 16),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
    conditioning_embedding_out_channels=(4, 8, 8, 16),
)
# Three widths, as the toy world's ControlNet: diffusers' converter cannot read it, our loader must.
TOY_LIKE = {**TINY, "conditioning_embedding_out_channels": (4, 8, 16)}


def trained_like(config: dict, seed: int = 0) -> ControlNetModel:
    """A tiny ControlNet with every weight perturbed, so zero convolutions are non-zero as after training."""
    torch.manual_seed(seed)
    model = ControlNetModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> ControlNetModel:
    return trained_like(TINY)


@pytest.fixture(scope="module")
def toy_like() -> ControlNetModel:
    return trained_like(TOY_LIKE, seed=1)


def assert_same_model(reference: ControlNetModel, reloaded: ControlNetModel, inputs: dict) -> None:
    """Weights bit-identical (guaranteed: float32 written and read back); outputs within RELOAD_TOLERANCE.

    Identical weights need not give bit-identical outputs: the reloaded tensors are other allocations
    (alignment, strides), on which the CPU kernels may take another vector path and sum in another
    order, depending on the machine's instruction set and the torch build (seen: outputs 6.6e-7 apart
    on one machine, identical on another). That noise is a few float32 ulps per layer; 1e-5 relative (the
    exporter's own reload check) leaves room for it and is still ~90x below what one fp16 rounding
    of the weights changes (see the half-precision test), so a wrong or missing tensor cannot pass.
    """
    ref, new = reference.state_dict(), reloaded.state_dict()
    assert set(ref) == set(new)
    assert all(torch.equal(ref[k], new[k].to(ref[k].dtype)) for k in ref)
    expected, got = controlnet_outputs(reference, inputs), controlnet_outputs(reloaded, inputs)
    assert all(float(t.abs().max()) > 0 for t in expected)  # the comparison is not vacuous
    assert max_relative_error(expected, got) < RELOAD_TOLERANCE


def make_run(root: Path, controlnet: ControlNetModel, name: str = "depth-run", final: bool = True) -> Path:
    """A run folder as the trainer writes it: config.json, metrics.jsonl, controlnet/, checkpoint-N/."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps(
            {
                "model": {"pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
                "method": {"method": "difftuning", "split": "fixed"},
                "condition": {"name": "depth"},
                "train": {"learning_rate": 1e-4},
            }
        )
    )
    records = [
        {"type": "train", "step": 100, "loss": 0.2},
        {"type": "checkpoint", "step": 100, "path": "checkpoint-100"},
        {"type": "convergence_event", "step": 150, "p": 0.31},
        {"type": "train", "step": 200, "loss": 0.1},
        {"type": "end", "step": 200, "reason": "max_steps"},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    controlnet.save_pretrained(run / "checkpoint-100" / "controlnet")
    if final:
        controlnet.save_pretrained(run / "controlnet")
    return run


def test_webui_file_reloads_with_diffusers_to_identical_outputs(tiny, tmp_path, caplog):
    run = make_run(tmp_path, tiny)
    with caplog.at_level(logging.INFO, logger="difftune_control.export"):
        path = export_controlnet(run, "webui", dtype="fp32")

    assert path == run / "export" / "control_depth-run_toy_depth_fp32.safetensors"
    assert caplog.text.count("from_single_file") == 1
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("control_model.") for k in keys)
    assert (
        "control_model.zero_convs.0.0.weight" in keys and "control_model.input_hint_block.14.weight" in keys
    )
    assert meta["condition"] == "depth" and meta["method"] == "difftuning"
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["optimizer_steps"] == "200" and meta["convergence_step"] == "150"
    assert json.loads(meta["training_config"])["train"]["learning_rate"] == 1e-4

    reloaded = ControlNetModel.from_single_file(
        str(path), config=str(run / "controlnet"), local_files_only=True
    )
    assert_same_model(tiny, reloaded, fixed_inputs(dict(tiny.config), seed=3))


def test_toy_architecture_falls_back_to_own_loader(toy_like, tmp_path, caplog):
    run = make_run(tmp_path, toy_like)
    with caplog.at_level(logging.INFO, logger="difftune_control.export"):
        path = export_controlnet(run, "webui", dtype="fp32", name="toy")

    assert caplog.text.count("load_controlnet (diffusers from_single_file cannot") == 1  # said once
    assert "toy-world ControlNet, for the demo" in caplog.text and "loads in no UI" in caplog.text
    with safe_open(str(path), framework="pt") as f:
        assert "control_model.input_hint_block.10.weight" in f.keys()
    reloaded = load_controlnet(path)  # config from the file's metadata
    assert_same_model(toy_like, reloaded, fixed_inputs(dict(toy_like.config)))


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_exports_hold_the_rounded_weights(tiny, tmp_path, dtype, torch_dtype):
    run = make_run(tmp_path, tiny)
    path = export_controlnet(run, "webui", dtype=dtype)

    assert path.name.endswith(f"_{dtype}.safetensors")
    tensors = load_file(str(path))
    expected = diffusers_to_ldm(tiny.state_dict(), tiny.config, prefix="control_model.")
    assert {t.dtype for t in tensors.values()} == {torch_dtype}
    assert all(torch.equal(tensors[k], v.to(torch_dtype)) for k, v in expected.items())
    # Outputs of the reloaded export: the rounded weights' outputs up to kernel-order noise (see
    # assert_same_model), and the rounding's cost against float32, far above that noise.
    result = verify_reload(tiny, load_controlnet(path), dtype, "test")
    assert result.max_rel_error_vs_rounded < RELOAD_TOLERANCE
    assert 10 * RELOAD_TOLERANCE < result.max_rel_error_vs_fp32 < {"fp16": 1e-2, "bf16": 5e-2}[dtype]


def test_diffusers_folder_with_model_card_and_report_figures(tiny, tmp_path):
    run = make_run(tmp_path, tiny)
    (run / "report").mkdir()
    (run / "report" / "convergence.png").write_bytes(b"\x89PNG fake")
    path = export_controlnet(run, "diffusers", out_dir=tmp_path / "out", dtype="bf16")

    assert path == tmp_path / "out" / "control_depth-run_toy_depth_bf16"
    card = (path / "README.md").read_text()
    for text in (
        "**depth**",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "Diff-Tuning",
        "| 200 |",
        "| 150 |",
    ):
        assert text in card
    assert "![convergence](convergence.png)" in card and (path / "convergence.png").is_file()
    assert "samples.png" not in card  # absent in the report, so not referenced
    stored = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert torch.equal(stored["conv_in.weight"], tiny.conv_in.weight.to(torch.bfloat16))


def test_model_card_says_how_to_make_missing_figures(tiny, tmp_path):
    run = make_run(tmp_path, tiny)
    card = (export_controlnet(run, "diffusers", verify=False) / "README.md").read_text()
    assert "difftune report" in card


def test_verification_catches_a_corrupted_file(tiny, tmp_path):
    run = make_run(tmp_path, tiny)
    path = export_controlnet(run, "webui", dtype="fp16", verify=False)
    tensors = load_file(str(path))
    # Swap two zero convolutions of equal shape: a plausible key-mapping mistake, invisible to shapes.
    a, b = "control_model.zero_convs.1.0.weight", "control_model.zero_convs.2.0.weight"
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, str(path))

    with pytest.raises(VerificationError, match="zero_convs"):
        verify_webui_file(path, tiny, "fp16")


def test_load_controlnet_reads_unprefixed_ldm_files_with_unet_or_config(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
        sample_size=8,
    )
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 16))
    file = tmp_path / "control_other.pth"  # no metadata, no prefix: as some released files
    torch.save(diffusers_to_ldm(controlnet.state_dict(), controlnet.config), file)

    with pytest.raises(ValueError, match="config="):
        load_controlnet(file)  # not SD1.5/2.x: the heads cannot be read from the tensors
    controlnet.save_pretrained(tmp_path / "cfg")
    for loaded in (load_controlnet(file, unet=unet), load_controlnet(file, config=tmp_path / "cfg")):
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in controlnet.state_dict().items())
        assert loaded.config.attention_head_dim == controlnet.config.attention_head_dim


def test_load_controlnet_accepts_folders_and_rejects_non_controlnets(tiny, tmp_path):
    run = make_run(tmp_path, tiny, final=False)
    loaded = load_controlnet(run)  # no controlnet/: the latest checkpoint
    assert torch.equal(loaded.conv_in.weight, tiny.conv_in.weight)
    assert torch.equal(
        load_controlnet(run / "checkpoint-100" / "controlnet").conv_in.weight, tiny.conv_in.weight
    )

    with pytest.raises(FileNotFoundError, match="not found"):
        load_controlnet(tmp_path / "missing.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(ValueError, match="does not hold a ControlNet"):
        load_controlnet(tmp_path / "vae.safetensors")
    save_file({"lora_controlnet": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="Control-LoRA"):
        load_controlnet(tmp_path / "lora.safetensors")


def test_resolve_source_kinds(tiny, tmp_path):
    run = make_run(tmp_path, tiny)
    final, checkpoint = resolve_source(run), resolve_source(run / "checkpoint-100")
    assert final.controlnet_dir == run / "controlnet" and final.step == 200 and final.convergence_step == 150
    assert checkpoint.run_dir == run and checkpoint.step == 100
    assert checkpoint.convergence_step is None  # the event came after step 100
    assert resolve_source(run / "controlnet").run_dir == run

    bare = tmp_path / "bare"
    copy.deepcopy(tiny).save_pretrained(bare)
    alone = resolve_source(bare)
    assert alone.run_dir is None and alone.condition is None and alone.step is None


def test_checkpoint_export_is_named_after_its_step(tiny, tmp_path):
    run = make_run(tmp_path, tiny)
    path = export_controlnet(run / "checkpoint-100", "webui", verify=False)
    assert path.name == "control_depth-run-step100_toy_depth_fp16.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["convergence_step"] == "not reached"


def test_clear_errors_for_bad_sources_formats_and_outputs(tiny, tmp_path):
    run = make_run(tmp_path, tiny)
    with pytest.raises(ValueError, match=r"--format 'ckpt' is not one of \('webui', 'diffusers'\)"):
        export_controlnet(run, "ckpt")
    with pytest.raises(ValueError, match="--dtype 'fp8'"):
        export_controlnet(run, "webui", dtype="fp8")
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match="is not a run folder"):
        export_controlnet(tmp_path / "notes", "webui")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_controlnet(tmp_path / "nope", "webui")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out"):
        export_controlnet(run, "webui", out_dir=tmp_path / "a-file")
    with pytest.raises(PermissionError, match="--out .* is not a writable folder"):
        export_controlnet(run, "webui", out_dir=tmp_path / "a-file" / "sub")
    bare = tmp_path / "bare"
    tiny.save_pretrained(bare)
    with pytest.raises(ValueError, match="--condition"):
        export_controlnet(bare, "webui")
    assert (
        export_controlnet(bare, "webui", condition="canny", verify=False).name
        == "control_bare_toy_canny_fp16.safetensors"
    )


@pytest.mark.slow
def test_sd15_sized_controlnet_round_trip(tmp_path):
    """A random-init SD1.5-sized ControlNet (361M parameters): WebUI fp16 export, diffusers reload,
    and import of the file without any config (SD1.5 is inferred from the tensor shapes)."""
    torch.manual_seed(0)
    controlnet = ControlNetModel(
        cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        attention_head_dim=8,
    )
    with torch.no_grad():  # zero convolutions as after training
        for block in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            block.weight.normal_(0, 0.02)
    run = make_run(tmp_path, controlnet.eval(), final=True)

    path = export_controlnet(run, "webui")  # verified with diffusers' from_single_file

    assert path.name == "control_depth-run_sd15_depth_fp16.safetensors"
    assert 700e6 < path.stat().st_size < 760e6  # 361M fp16 parameters
    plain = tmp_path / "control_v11p_sd15_depth.safetensors"  # as a released file: no metadata
    save_file(load_file(str(path)), str(plain))
    imported = load_controlnet(plain)
    result = verify_reload(controlnet, imported, "fp16", "load_controlnet")
    assert result.max_rel_error_vs_rounded < RELOAD_TOLERANCE and result.max_rel_error_vs_fp32 < 1e-2


def test_sdxl_style_controlnet_exports_with_label_emb_and_reloads(tmp_path):
    config = {
        **TINY,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 16,
    }
    controlnet = trained_like(config, seed=2)
    run = make_run(tmp_path, controlnet)
    path = export_controlnet(
        run, "webui", dtype="fp32", name="tiny"
    )  # verified: text_embeds + time_ids inputs

    assert path.name == "control_tiny_xl_depth_fp32.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert {"control_model.label_emb.0.0.weight", "control_model.label_emb.0.2.bias"} <= set(f.keys())
    reloaded = load_controlnet(path)
    assert torch.equal(reloaded.add_embedding.linear_1.weight, controlnet.add_embedding.linear_1.weight)


def test_export_that_fails_verification_is_moved_aside(tiny, tmp_path, monkeypatch):
    import difftune_control.export.webui as webui

    mapping = webui.diffusers_to_ldm

    def swapped(state_dict, config, prefix=""):  # fault injection: a key-mapping bug
        ldm = mapping(state_dict, config, prefix=prefix)
        a, b = f"{prefix}zero_convs.1.0.weight", f"{prefix}zero_convs.2.0.weight"
        ldm[a], ldm[b] = ldm[b], ldm[a]
        return ldm

    monkeypatch.setattr(webui, "diffusers_to_ldm", swapped)
    run = make_run(tmp_path, tiny)
    with pytest.raises(VerificationError, match=r"zero_convs\.1\.0\.weight in the file.*moved to"):
        export_controlnet(run, "webui")
    assert not (run / "export" / "control_depth-run_toy_depth_fp16.safetensors").exists()
    assert (run / "export" / "control_depth-run_toy_depth_fp16.safetensors.unverified").is_file()
