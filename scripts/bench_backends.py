"""Image-tower inference alone, per runtime and precision, on one batch: the levers behind
``--backend`` and ``--precision`` (decoding and the index are left out; see bench_index.py).

    python scripts/bench_backends.py [--model ViT-B-32] [--batch 64] [--repeats 5] [--json]

Runtimes: torch fp32 (the reference), torch bf16 weights, torch int8 dynamic quantisation of
the Linear layers (``torch.ao.quantization.quantize_dynamic``), OpenVINO fp32, bf16 and int8
(NNCF post-training quantisation calibrated on the batch itself, as ``--precision int8`` does on
the first photos it embeds; indexer/quantize.py), and,
when the ``onnxruntime`` package is installed (it is not a dependency), ONNX Runtime fp32 and
int8 (``onnxruntime.quantization.quantize_dynamic``). Each runs the same batch: Magento photos
(``$LOOKALIKE_DATASETS``, default ``../shared/datasets``), random pixels where there are none;
the figure is the median images/s over ``--repeats`` timed runs after one warm-up, with the
runs of all runtimes interleaved so background load hits them alike. Agreement: the lowest
cosine between a runtime's embedding and the torch fp32 one, over the batch.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchenv  # noqa: E402

if __name__ == "__main__":  # before numpy loads OpenBLAS; never when imported
    benchenv.reexec_without_blas_env(__file__)

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets"))


def _calibrated(encoder, x: torch.Tensor):
    """An int8 encoder calibrated on ``x`` (as ``lookalike index`` does on its first photos); says so if it
    stayed fp32 (too few photos, or rejected by the check against fp32)."""
    if encoder.calibrate(x) != "int8":
        print(f"the int8 tower runs {encoder.precision}: see the warning above", file=sys.stderr)
    return encoder


def _batch(preprocess, n: int, size: int) -> tuple[torch.Tensor, str]:
    """``n`` preprocessed Magento photos, or random pixels where the datasets are missing."""
    from indexer.images import open_image

    files = sorted((DATASETS / "magento" / "images").rglob("*.jpg"))[:n]
    if len(files) < n:
        torch.manual_seed(1)
        return torch.randn(n, 3, size, size), "random pixels"
    return torch.stack([preprocess(open_image(f, draft_size=2 * size)) for f in files]), f"{n} Magento photos"


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
    ap.add_argument("--model", default="ViT-B-32",
                    help="open_clip architecture (random weights) or a bundled model (lookalike-base, its own weights)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep-blas-env", action="store_true",
                    help=f"keep {' / '.join(benchenv.BLAS_ENV)} if set (default: re-run without them)")
    args = ap.parse_args(argv)
    for line in benchenv.describe_machine(benchenv.machine(with_model_runtime=True)):
        print(line, file=sys.stderr)
    import open_clip

    from indexer.backends import OpenVINOImageEncoder

    torch.manual_seed(0)
    if args.model in open_clip.list_models():
        model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
    else:  # a bundled model, which open_clip cannot build by name: its torch module as load_model builds it
        from indexer.errors import LookalikeError
        from indexer.model import load_model

        try:
            loaded = load_model(args.model, None, "cpu", precision="fp32", backend="torch")
        except LookalikeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        model, preprocess = loaded.model, loaded.preprocess
    model.eval()
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list)) else model.visual.image_size
    x, source = _batch(preprocess, args.batch, size)
    print(f"batch: {source}", file=sys.stderr)
    bf16 = copy.deepcopy(model.visual).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model.visual), {torch.nn.Linear}, dtype=torch.qint8)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOOKALIKE_CACHE_DIR"] = tmp  # convert and calibrate afresh, never reuse another run's
        runtimes = {
            "torch fp32": model.visual,
            "torch bf16": lambda t: bf16(t.to(torch.bfloat16)),
            "torch int8 dynamic": int8,
            "openvino fp32": OpenVINOImageEncoder(model.visual, size, "fp32", f"bench-{args.model}"),
            "openvino bf16": OpenVINOImageEncoder(model.visual, size, "bf16", f"bench-{args.model}"),
            "openvino int8 (NNCF)": _calibrated(OpenVINOImageEncoder(model.visual, size, "int8", f"bench-{args.model}"), x),
            **_onnx_runtimes(model.visual, x, Path(tmp)),
        }
        times: dict[str, list[float]] = {k: [] for k in runtimes}
        outs = {}
        with torch.inference_mode():
            for name, fn in list(runtimes.items()):
                try:
                    outs[name] = torch.nn.functional.normalize(fn(x).float(), dim=-1)
                except Exception as e:  # e.g. torch's dynamic int8 Linear under a tower that reads .weight.dtype
                    print(f"{name} cannot run this tower ({type(e).__name__}: {e}): its row is skipped", file=sys.stderr)
                    del runtimes[name]
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
        print(json.dumps({"model": args.model, "batch": args.batch, "batch_source": source,
                          "threads": torch.get_num_threads(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
