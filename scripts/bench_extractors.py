"""Extractor throughput (images/s) at 512x512, and the cost of each dissimilarity metric.

Weight-free backends (canny/opencv, sketch/xdog, normals from a given depth map) run on the CPU;
with a GPU, the model backends run there too, batched, with randomly initialised models of their
real size (DPT-hybrid, UperNet ConvNeXt-small, OneFormer, the controlnet-aux MiDaS, ZoeDepth,
NormalBae, PiDiNet, HED and lineart networks) saved to a temporary folder and loaded through the
extractors' own `from_pretrained` paths. Nothing is downloaded.

    python scripts/bench_extractors.py                       # CPU: weight-free backends + metrics
    python scripts/bench_extractors.py --device cuda --json bench.json   # + model backends on the GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difftune_control.extractors import class_ids_to_colors, get_extractor
from difftune_control.extractors import metrics as M
from difftune_control.extractors.normal import normals_from_depth

WEIGHT_FREE = [("canny", "opencv"), ("sketch", "xdog")]
MODEL_BACKENDS = [
    ("depth", "dpt"),
    ("depth", "midas"),
    ("depth", "zoe"),
    ("normal", "from_depth"),
    ("normal", "normalbae"),
    ("segmentation", "upernet"),
    ("segmentation", "oneformer"),
    ("sketch", "pidinet"),
    ("sketch", "hed"),
    ("sketch", "lineart"),
]


def test_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Photo-like float images [B,3,size,size] in [0,1]: smooth colour fields plus a few shapes."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 8, 8, generator=gen)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for b in range(batch):
        for _ in range(6):
            cy, cx, r = (torch.rand(3, generator=gen) * torch.tensor([size, size, size / 6])).tolist()
            colour = torch.rand(3, 1, generator=gen)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (r + 8) ** 2
            images[b][:, mask] = colour
    return images.clamp(0, 1)


def measure(fn: Callable[[], Any], images: int, device: torch.device, min_seconds: float) -> float:
    """Images per second of `fn` (one warm-up call, then calls until `min_seconds` have passed)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    sync()
    return images * calls / (time.perf_counter() - start)


def save_random_weights(condition: str, backend: str, folder: Path) -> dict[str, Any]:
    """Save a randomly initialised, real-size model for a backend; return the extractor's params."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if backend == "dpt" or backend == "from_depth":
        from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

        config = DPTConfig(  # the architecture of Intel/dpt-hybrid-midas
            is_hybrid=True,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            image_size=384,
            neck_hidden_sizes=[256, 512, 768, 768],
            backbone_out_indices=[2, 5, 8, 11],
            readout_type="project",
            backbone_featmap_shape=[1, 1024, 24, 24],
        )
        DPTForDepthEstimation(config).save_pretrained(folder)
        DPTImageProcessor(size={"height": 384, "width": 384}).save_pretrained(folder)
        if backend == "from_depth":
            return {"depth_backend": "dpt", "depth_params": {"model": str(folder)}}
        return {"model": str(folder)}
    if backend == "upernet":
        from transformers import (
            ConvNextConfig,
            SegformerImageProcessor,
            UperNetConfig,
            UperNetForSemanticSegmentation,
        )

        backbone = ConvNextConfig(  # openmmlab/upernet-convnext-small
            depths=[3, 3, 27, 3],
            hidden_sizes=[96, 192, 384, 768],
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
        config = UperNetConfig(
            backbone_config=backbone, hidden_size=512, auxiliary_in_channels=384, num_labels=150
        )
        UperNetForSemanticSegmentation(config).save_pretrained(folder)
        SegformerImageProcessor(size={"height": 512, "width": 512}).save_pretrained(folder)
        return {"model": str(folder)}
    if backend == "oneformer":
        return _save_oneformer(folder)
    return _save_controlnet_aux(backend, folder)


def _save_oneformer(folder: Path) -> dict[str, Any]:
    from transformers import (
        CLIPTokenizer,
        OneFormerConfig,
        OneFormerForUniversalSegmentation,
        OneFormerImageProcessor,
        OneFormerProcessor,
    )

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    labels = {i: f"class{i}" for i in range(150)}
    config = OneFormerConfig(id2label=labels, label2id={v: k for k, v in labels.items()})  # Swin-tiny default
    OneFormerForUniversalSegmentation(config).save_pretrained(folder)
    image_processor = OneFormerImageProcessor(
        size={"shortest_edge": 512, "longest_edge": 2048}, num_labels=150
    )
    OneFormerProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return {"model": str(folder)}


def _save_controlnet_aux(backend: str, folder: Path) -> dict[str, Any]:
    """Random weights in the files and formats of the real controlnet-aux checkpoints."""
    if backend == "midas":
        from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

        model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
        torch.save(model.state_dict(), folder / "dpt_hybrid-midas-501f0c75.pt")
    elif backend == "zoe":
        from controlnet_aux.zoe.zoedepth.models.zoedepth import ZoeDepth
        from controlnet_aux.zoe.zoedepth.utils.config import get_config

        model = ZoeDepth.build_from_config(get_config("zoedepth", "infer"))
        torch.save({"model": model.state_dict()}, folder / "ZoeD_M12_N.pt")
    elif backend == "normalbae":
        from controlnet_aux.normalbae.nets.NNET import NNET

        args = types.SimpleNamespace(
            mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
        )
        torch.save({"model": NNET(args).state_dict()}, folder / "scannet.pt")
    elif backend == "pidinet":
        from controlnet_aux.pidi.model import pidinet

        torch.save({"state_dict": pidinet().state_dict()}, folder / "table5_pidinet.pth")
    elif backend == "hed":
        from controlnet_aux.hed import ControlNetHED_Apache2

        torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    elif backend == "lineart":
        from controlnet_aux.lineart import Generator

        torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model.pth")
        torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model2.pth")
    else:
        raise ValueError(f"no random-weight recipe for backend {backend!r}")
    return {"model": str(folder)}


def bench_metrics(size: int, batch: int, device: torch.device, min_seconds: float) -> list[dict[str, Any]]:
    """Throughput of each dissimilarity (pairs of hints per second)."""
    gen = torch.Generator().manual_seed(0)
    hints = torch.rand(batch, 3, size, size, generator=gen).to(device)
    other = torch.rand(batch, 3, size, size, generator=gen).to(device)
    edges, edges2 = (hints > 0.9).float(), (other > 0.9).float()
    seg = class_ids_to_colors(
        torch.randint(0, 150, (batch, size // 16, size // 16), generator=gen).to(device)
    )
    seg = torch.nn.functional.interpolate(seg, size=(size, size), mode="nearest")
    cases = {
        "canny 1-F1 (2 px)": lambda: M.canny_dissimilarity(edges, edges2),
        "sketch 1-SSIM": lambda: M.sketch_dissimilarity(hints, other),
        "depth aligned RMSE": lambda: M.depth_dissimilarity(hints, other),
        "normal angular error": lambda: M.normal_dissimilarity(hints, other),
        "segmentation 1-mIoU": lambda: M.segmentation_dissimilarity(seg, seg.flip(-1)),
    }
    return [
        {
            "what": f"metric: {name}",
            "device": str(device),
            "batch": batch,
            "per_s": measure(fn, batch, device, min_seconds),
        }
        for name, fn in cases.items()
    ]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    results = []
    images = test_images(args.batch_size, args.resolution)
    for condition, backend in WEIGHT_FREE:
        for where in sorted({"cpu", device.type}):
            ext = get_extractor(condition, backend, device=where if backend == "xdog" else None)
            batch = images.to(where)
            rate = measure(lambda e=ext, b=batch: e(b), len(batch), torch.device(where), args.min_seconds)
            results.append(
                {"what": f"{condition}/{backend}", "device": where, "batch": len(batch), "per_s": rate}
            )
    depth = images[:, :1].clone()
    rate = measure(lambda: normals_from_depth(depth), len(depth), torch.device("cpu"), args.min_seconds)
    results.append(
        {"what": "normal/from_depth (Sobel step only)", "device": "cpu", "batch": len(depth), "per_s": rate}
    )
    results += bench_metrics(args.resolution, args.batch_size, torch.device("cpu"), args.min_seconds)
    if device.type == "cuda":
        results += bench_metrics(args.resolution, args.batch_size, device, args.min_seconds)
        batch = images.to(device)
        with tempfile.TemporaryDirectory() as tmp:
            for condition, backend in MODEL_BACKENDS:
                if args.only and backend not in args.only:
                    continue
                row: dict[str, Any] = {
                    "what": f"{condition}/{backend}",
                    "device": str(device),
                    "batch": len(batch),
                }
                try:
                    params = save_random_weights(condition, backend, Path(tmp) / backend)
                    if backend == "from_depth":  # the batch size belongs to the wrapped depth backend
                        params["depth_params"]["batch_size"] = args.batch_size
                    else:
                        params["batch_size"] = args.batch_size
                    ext = get_extractor(condition, backend, device=device, **params)
                    inner = getattr(ext, "depth", ext)
                    row["dtype"] = str(getattr(inner, "dtype", "")).replace("torch.", "")
                    row["per_s"] = measure(lambda e=ext: e(batch), len(batch), device, args.min_seconds)
                    model = getattr(ext, "model", None) or getattr(getattr(ext, "depth", None), "model", None)
                    row["params_m"] = _count_params(model) / 1e6
                except Exception as err:  # report and go on: one broken backend must not hide the rest
                    row["error"] = f"{type(err).__name__}: {err}"[:300]
                results.append(row)
                torch.cuda.empty_cache()
    return results


def _count_params(model: Any) -> int:
    modules = model if isinstance(model, tuple) else (model,)
    total = 0
    for module in modules:
        for attr in ("parameters",):
            if hasattr(module, attr):
                total += sum(p.numel() for p in module.parameters())
        for inner in ("netNetwork", "model", "model_coarse"):
            if hasattr(module, inner) and not hasattr(module, "parameters"):
                total += sum(p.numel() for p in getattr(module, inner).parameters())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--min_seconds", type=float, default=3.0, help="Timed seconds per row (after a warm-up)."
    )
    parser.add_argument("--only", nargs="*", default=None, help="Model backends to run (default: all).")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = parser.parse_args()
    results = run(args)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    header = (
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads, GPU: {gpu}, torch {torch.__version__}, "
        f"{args.resolution}x{args.resolution}, batch {args.batch_size}"
    )
    print(header)
    print("| extractor / metric | device | dtype | images/s | params (M) |\n|---|---|---|---|---|")
    for row in results:
        rate = f"{row['per_s']:.1f}" if "per_s" in row else f"failed: {row['error']}"
        params = f"{row['params_m']:.1f}" if row.get("params_m") else ""
        print(f"| {row['what']} | {row['device']} | {row.get('dtype', 'float32')} | {rate} | {params} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": header, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
