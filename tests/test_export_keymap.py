"""Key mapping diffusers <-> original LDM ControlNet, checked against an independent spec of the original."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel

from difftune_control.export.infer import infer_sd_config, shape_config
from difftune_control.export.keymap import (
    LDM_PREFIX,
    diffusers_to_ldm,
    ldm_to_diffusers,
    module_pairs,
    num_zero_convs,
    sd_version_tag,
)

SD15 = dict(
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    attention_head_dim=8,
)
SD21 = {
    **SD15,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SDXL = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
TOY = dict(
    cross_attention_dim=128,
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    attention_head_dim=4,
    conditioning_embedding_out_channels=(16, 32, 64),
)


def meta_controlnet(**config) -> ControlNetModel:
    """A full-size ControlNet without memory: parameters on the meta device (shapes only)."""
    with torch.device("meta"):
        return ControlNetModel(**config)


def shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def original_controlnet_shapes(
    context: int, linear_proj: bool, model_channels: int = 320, mult=(1, 2, 4, 4), attn_levels=(0, 1, 2)
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of lllyasviel's cldm.ControlNet (SD1.x/2.x settings), written from its architecture."""
    out: dict[str, tuple[int, ...]] = {}
    emb = 4 * model_channels

    def param(name, weight, bias=True):
        out[name + ".weight"] = weight
        if bias:
            out[name + ".bias"] = (weight[0],)

    def norm(name, ch):
        out[name + ".weight"] = out[name + ".bias"] = (ch,)

    def resblock(prefix, cin, cout):
        norm(f"{prefix}.in_layers.0", cin)
        param(f"{prefix}.in_layers.2", (cout, cin, 3, 3))
        param(f"{prefix}.emb_layers.1", (cout, emb))
        norm(f"{prefix}.out_layers.0", cout)
        param(f"{prefix}.out_layers.3", (cout, cout, 3, 3))
        if cin != cout:
            param(f"{prefix}.skip_connection", (cout, cin, 1, 1))

    def transformer(prefix, ch):
        norm(f"{prefix}.norm", ch)
        proj = (ch, ch) if linear_proj else (ch, ch, 1, 1)
        param(f"{prefix}.proj_in", proj)
        param(f"{prefix}.proj_out", proj)
        block = f"{prefix}.transformer_blocks.0"
        for attn, kv in (("attn1", ch), ("attn2", context)):
            param(f"{block}.{attn}.to_q", (ch, ch), bias=False)
            param(f"{block}.{attn}.to_k", (ch, kv), bias=False)
            param(f"{block}.{attn}.to_v", (ch, kv), bias=False)
            param(f"{block}.{attn}.to_out.0", (ch, ch))
        param(f"{block}.ff.net.0.proj", (8 * ch, ch))  # GEGLU: 2 x 4ch
        param(f"{block}.ff.net.2", (ch, 4 * ch))
        for i in (1, 2, 3):
            norm(f"{block}.norm{i}", ch)

    param("time_embed.0", (emb, model_channels))
    param("time_embed.2", (emb, emb))
    hint = [(3, 16), (16, 16), (16, 32), (32, 32), (32, 96), (96, 96), (96, 256), (256, model_channels)]
    for i, (cin, cout) in enumerate(hint):
        param(f"input_hint_block.{2 * i}", (cout, cin, 3, 3))
    param("input_blocks.0.0", (model_channels, 4, 3, 3))
    chans, ch, index = [model_channels], model_channels, 1
    for level, m in enumerate(mult):
        for _ in range(2):
            resblock(f"input_blocks.{index}.0", ch, m * model_channels)
            ch = m * model_channels
            if level in attn_levels:
                transformer(f"input_blocks.{index}.1", ch)
            chans.append(ch)
            index += 1
        if level < len(mult) - 1:
            param(f"input_blocks.{index}.0.op", (ch, ch, 3, 3))
            chans.append(ch)
            index += 1
    for k, c in enumerate(chans):
        param(f"zero_convs.{k}.0", (c, c, 1, 1))
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    param("middle_block_out.0", (ch, ch, 1, 1))
    return out


@pytest.mark.parametrize(
    ("config", "context", "linear"), [(SD15, 768, False), (SD21, 1024, True)], ids=["sd15", "sd21"]
)
def test_mapping_is_a_bijection_onto_the_original_layout(config, context, linear):
    controlnet = meta_controlnet(**config)
    state_dict = controlnet.state_dict()
    ldm = diffusers_to_ldm(state_dict, controlnet.config)

    assert len(ldm) == len(state_dict) == 340  # no key lost or merged
    assert shapes(ldm) == original_controlnet_shapes(context, linear)
    assert len({k.split(".")[1] for k in ldm if k.startswith("zero_convs.")}) == 12
    back = ldm_to_diffusers(ldm, controlnet.config)
    assert list(back) == list(state_dict)  # every key comes back to itself, same order
    assert all(back[k] is state_dict[k] for k in state_dict)  # the same tensors, untouched


def test_prefix_is_optional_on_read_and_added_on_request():
    controlnet = meta_controlnet(**SD15)
    prefixed = diffusers_to_ldm(controlnet.state_dict(), controlnet.config, prefix=LDM_PREFIX)

    assert all(k.startswith("control_model.") for k in prefixed)
    assert "control_model.input_hint_block.14.weight" in prefixed
    assert set(ldm_to_diffusers(prefixed, controlnet.config)) == set(controlnet.state_dict())


def test_sdxl_maps_add_embedding_to_label_emb_with_nine_zero_convs():
    controlnet = meta_controlnet(**SDXL)
    ldm = diffusers_to_ldm(controlnet.state_dict(), controlnet.config)

    assert ldm["label_emb.0.0.weight"].shape == (1280, 2816)
    assert "label_emb.0.2.bias" in ldm
    assert num_zero_convs(controlnet.config) == 9
    assert {k.split(".")[1] for k in ldm if k.startswith("zero_convs.")} == {str(i) for i in range(9)}
    assert "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in ldm  # depth 10 at the last level
    assert set(ldm_to_diffusers(ldm, controlnet.config)) == set(controlnet.state_dict())
    assert sd_version_tag(controlnet.config) == "xl"


def test_toy_world_hint_encoder_has_conv_out_at_index_ten():
    controlnet = meta_controlnet(**TOY)
    ldm = diffusers_to_ldm(controlnet.state_dict(), controlnet.config)

    hint = sorted({int(k.split(".")[1]) for k in ldm if k.startswith("input_hint_block.")})
    assert hint == [0, 2, 4, 6, 8, 10]
    assert ldm["input_hint_block.10.weight"].shape == (64, 64, 3, 3)  # conv_out: last width -> 64 channels
    assert num_zero_convs(controlnet.config) == 6  # conv_in + 3 levels x 1 layer + 2 downsamplers
    assert set(ldm_to_diffusers(ldm, controlnet.config)) == set(controlnet.state_dict())


def test_unknown_keys_and_mixed_prefixes_are_reported():
    controlnet = meta_controlnet(**TOY)
    state_dict = dict(controlnet.state_dict())
    state_dict["down_blocks.9.resnets.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"down_blocks\.9\.resnets\.0\.conv1\.weight"):
        diffusers_to_ldm(state_dict, controlnet.config)

    ldm = diffusers_to_ldm(controlnet.state_dict(), controlnet.config)
    mixed = {("control_model." + k if i % 2 else k): v for i, (k, v) in enumerate(ldm.items())}
    with pytest.raises(ValueError, match="prefix"):
        ldm_to_diffusers(mixed, controlnet.config)


def test_unsupported_architecture_is_refused_with_the_reason():
    config = {**dict(meta_controlnet(**TOY).config), "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 3}
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        module_pairs(config)


@pytest.mark.parametrize(
    ("config", "tag"),
    [
        (SD15, "sd15"),
        (SD21, "sd21"),
        (SDXL, "xl"),
        (TOY, "toy"),
        ({**TOY, "cross_attention_dim": 768}, "toy"),
    ],
    ids=["sd15", "sd21", "xl", "toy", "toy-768"],
)
def test_sd_version_tag_comes_from_the_architecture(config, tag):
    assert sd_version_tag(dict(meta_controlnet(**config).config)) == tag


@pytest.mark.parametrize(("config", "tag"), [(SD15, "sd15"), (SD21, "sd21")], ids=["sd15", "sd21"])
def test_sd_config_is_inferred_from_ldm_shapes(config, tag):
    controlnet = meta_controlnet(**config)
    ldm = diffusers_to_ldm(controlnet.state_dict(), controlnet.config)
    inferred = infer_sd_config(ldm)
    rebuilt = meta_controlnet(**inferred)

    assert shapes(rebuilt.state_dict()) == shapes(controlnet.state_dict())
    assert sd_version_tag(inferred) == tag
    # Heads are not in the shapes: the SD conventions must give the same heads as the real configs.
    assert [b.attentions[0].transformer_blocks[0].attn1.heads for b in rebuilt.down_blocks[:3]] == [
        b.attentions[0].transformer_blocks[0].attn1.heads for b in controlnet.down_blocks[:3]
    ]


def test_non_sd_shapes_need_a_config():
    controlnet = meta_controlnet(**TOY)
    ldm = diffusers_to_ldm(controlnet.state_dict(), controlnet.config)
    found = shape_config(ldm)

    assert found["conditioning_embedding_out_channels"] == [16, 32, 64]
    assert found["block_out_channels"] == [64, 128, 128]
    assert found["layers_per_block"] == 1
    with pytest.raises(ValueError, match="config="):
        infer_sd_config(ldm)


def test_webui_layout_check_accepts_the_export_and_names_what_would_misload():
    from difftune_control.export.verify import webui_layout_problems

    controlnet = meta_controlnet(**SD15)
    keys = list(diffusers_to_ldm(controlnet.state_dict(), controlnet.config, prefix=LDM_PREFIX))
    assert webui_layout_problems(keys, controlnet.config) == []

    unprefixed = [k.removeprefix(LDM_PREFIX) for k in keys]
    assert any("prefix" in p for p in webui_layout_problems(unprefixed, controlnet.config))
    with_label = [*keys, "control_model.label_emb.0.0.weight"]
    assert any("SDXL" in p for p in webui_layout_problems(with_label, controlnet.config))
    fewer = [k for k in keys if not k.startswith("control_model.zero_convs.11.")]
    assert any("11 zero_convs" in p for p in webui_layout_problems(fewer, controlnet.config))


def test_mid_block_without_attention_maps_to_middle_block_zero():
    controlnet = meta_controlnet(**{**TOY, "mid_block_type": "UNetMidBlock2D"})
    ldm = diffusers_to_ldm(controlnet.state_dict(), controlnet.config)

    assert {k.split(".")[1] for k in ldm if k.startswith("middle_block.")} == {"0"}
    assert set(ldm_to_diffusers(ldm, controlnet.config)) == set(controlnet.state_dict())
