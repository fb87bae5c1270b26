"""Image-tower inference alone, per runtime and precision, on one batch: the levers behind
``--backend`` and ``--precision`` (decoding and the index are left out; see bench_index.py).

    python scripts/bench_backends.py [--model ViT-B-32] [--batch 64] [--repeats 5] [--json]

Runtimes: torch fp32 (the reference), torch bf16 weights, torch int8 dynamic quantisation of
the Linear layers (``torch.ao.quantization.quantize_dynamic``), OpenVINO fp32 and bf16, and,
when the ``onnxruntime`` package is installed (it is not a dependency), ONNX Runtime fp32 and
int8 (``onnxruntime.quantization.quantize_dynamic``). Each runs the same random pixel batch;
the figure is the median images/s over ``--repeats`` timed runs after one warm-up, with the
runs of all runtimes interleaved so background load hits them alike. Agreement: the lowest
cosine between a runtime's embedding and the torch fp32 one, over the batch.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _onnx_runtimes(visual, x: torch.Tensor, tmp: Path) -> dict:
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        print("onnxruntime is not installed: its rows are skipped", file=sys.stderr)
        return {}
    path = tmp / "visual.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(visual, x[:2], str(path), input_names=["pixels"], output_names=["features"],
                          dynamic_axes={"pixels": {0: "n"}}, opset_version=17, dynamo=False)
    quantize_dynamic(str(path), str(tmp / "visual-int8.onnx"), weight_type=QuantType.QInt8)
    out = {}
    for name, p in (("onnxruntime fp32", path), ("onnxruntime int8 dynamic", tmp / "visual-int8.onnx")):
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        out[name] = lambda t, s=sess: torch.from_numpy(s.run(None, {"pixels": t.numpy()})[0])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import open_clip

    from indexer.backends import OpenVINOImageEncoder

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list)) else model.visual.image_size
    x = torch.randn(args.batch, 3, size, size)
    bf16 = copy.deepcopy(model.visual).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model.visual), {torch.nn.Linear}, dtype=torch.qint8)
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = {
            "torch fp32": model.visual,
            "torch bf16": lambda t: bf16(t.to(torch.bfloat16)),
            "torch int8 dynamic": int8,
            "openvino fp32": OpenVINOImageEncoder(model.visual, size, "fp32", f"bench-{args.model}"),
            "openvino bf16": OpenVINOImageEncoder(model.visual, size, "bf16", f"bench-{args.model}"),
            **_onnx_runtimes(model.visual, x, Path(tmp)),
        }
        times: dict[str, list[float]] = {k: [] for k in runtimes}
        outs = {}
        with torch.inference_mode():
            for name, fn in runtimes.items():
                outs[name] = torch.nn.functional.normalize(fn(x).float(), dim=-1)
            for _ in range(args.repeats):
                for name, fn in runtimes.items():
                    t0 = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - t0)
    ref = outs["torch fp32"]
    rows = []
    base = args.batch / float(np.median(times["torch fp32"]))
    print(f"{'runtime':<28}{'images/s':>10}{'vs torch fp32':>15}{'min cosine':>12}")
    for name in runtimes:
        ips = args.batch / float(np.median(times[name]))
        cos = float((outs[name] * ref).sum(-1).min())
        rows.append({"runtime": name, "images_per_s": round(ips, 2), "ratio": round(ips / base, 2), "min_cosine": round(cos, 5)})
        print(f"{name:<28}{ips:>10.1f}{ips / base:>15.2f}{cos:>12.5f}")
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
