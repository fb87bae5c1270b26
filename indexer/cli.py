"""The ``lookalike`` command: parses arguments and calls the library. Errors end in one line, exit status 2.

Longer than our ~400-line guide because it holds the argument definitions and help texts of every
subcommand; each ``cmd_*`` function is a few lines that call the library (nothing here is a rule
the server also needs: those live in :mod:`indexer.modelspec`).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sqlite3
import sys
from pathlib import Path

from . import modelspec as ms
from .errors import LookalikeError

#: ``index`` exits with status 1 when more than this share of the catalogue's photos failed
DEFAULT_MAX_FAILED_FRACTION = 0.5


def _model_args(p: argparse.ArgumentParser, model_help: str, pretrained_help: str) -> None:
    """The model options; the help texts say where the default model comes from for this command."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=model_help)
    g.add_argument("--pretrained", default=None, help=pretrained_help)
    g.add_argument("--device", default="auto", help=ms.DEVICE_HELP)
    g.add_argument("--precision", choices=ms.PRECISIONS, default="auto", help=ms.PRECISION_HELP)
    g.add_argument("--backend", choices=ms.BACKENDS, default="auto", help=ms.BACKEND_HELP)
    g.add_argument("--offline", action="store_true",
                   help="never contact the model hub: use cached or local weights only (also: HF_HUB_OFFLINE=1)")


def _model_spec(args) -> ms.ModelSpec:
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    return ms.ModelSpec(args.model, args.pretrained, args.precision, args.backend, args.device)


def _load_model(args):
    """The model the arguments name (the default model when they name none), for work without an index."""
    return _model_spec(args).load()


def _existing_identity(path: str):
    """The model identity an existing index at ``path`` records; None where there is no index yet."""
    from .records import MANIFEST_NAME, ModelIdentity

    if not (Path(path) / MANIFEST_NAME).is_file():
        return None
    from .store import read_manifest

    return ModelIdentity.from_dict(read_manifest(path)["model"])


def _open_index(path: str, writable: bool = False):
    from .store import Store

    return Store.open(path, writable=writable)


def _model_for_index(args, store):
    """The index's model, or the one the arguments name if it has the same weights."""
    return _model_spec(args).load_for(store)


# ---------------------------------------------------------------- commands
def cmd_index(args) -> int:
    from .catalogue import ColumnMap, read_catalogue

    columns = ColumnMap(args.id_column, args.image_column, args.title_column, args.category_column)
    catalogue = read_catalogue(args.catalogue, columns, args.image_root, args.allow_outside_root)
    if not catalogue.rows:
        problems = "; ".join(f"{p.where}: {p.message}" for p in catalogue.problems[:5])
        raise LookalikeError(f"no photos found in {args.catalogue}" + (f" ({problems})" if problems else ""))
    if args.engine == "ray":
        report = _index_on_ray(args, catalogue)
    else:
        model = _model_spec(args).load(_existing_identity(args.out))  # missing weights fail here, before torch loads
        from .pipeline import index_catalogue
        from .store import Store

        with Store.create(args.out, model.identity) as store:
            store.set_index_choice(args.index_type, args.memory_budget)  # applied by the pipeline's final save
            report = index_catalogue(
                catalogue, store, model, catalogue_name=str(args.catalogue), batch_size=args.batch_size,
                workers=args.workers, prune=args.prune, progress=not args.quiet,
                allow_private_urls=args.allow_private_urls,
            )
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print(report.summary())
        print(f"report: {Path(args.out) / 'report.json'}")
    manifest = Path(args.catalogue)
    relative_root = manifest.resolve().parent if manifest.is_file() and args.image_root is None else None
    failure = report.failure(args.max_failed_fraction, relative_root)
    if failure:
        print(f"lookalike: error: {failure}", file=sys.stderr)
        return 1
    return 0


def _index_on_ray(args, catalogue):
    """``index --engine ray``: the driver identifies the model's weights (on its CPU, with torch: no
    compilation), then Ray actors embed (:mod:`indexer.pipeline_ray`)."""
    import dataclasses

    from .pipeline_ray import index_catalogue_ray, ray_session
    from .store import Store

    session = ray_session(args.ray_address)
    session.check()  # Ray missing, nobody at the address: say so before loading the model
    spec = _model_spec(args)
    identity = dataclasses.replace(spec, device="cpu", backend="torch", precision="fp32").load(
        _existing_identity(args.out)).identity
    with session, Store.create(args.out, identity) as store:
        store.set_index_choice(args.index_type, args.memory_budget)
        return index_catalogue_ray(
            catalogue, store, spec, identity, catalogue_name=str(args.catalogue), workers=args.ray_workers,
            cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
            batch_size=args.batch_size, prune=args.prune, progress=not args.quiet,
            allow_private_urls=args.allow_private_urls,
        )


def cmd_serve(args) -> int:
    from server import serving
    from server.app import create_app
    from server.observability import configure_logging
    from server.settings import ServerSettings

    if args.config:
        if not Path(args.config).is_file():
            raise LookalikeError(f"config file {args.config} not found")
        os.environ["LOOKALIKE_CONFIG"] = args.config
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        settings = ServerSettings()
    except Exception as e:  # pydantic ValidationError, TOML syntax errors: the user's configuration
        raise LookalikeError(f"bad server configuration: {e}") from None
    index = args.index or settings.index
    if index is None:
        raise LookalikeError("no index to serve: give INDEX_DIR or set LOOKALIKE_INDEX")
    from .store import read_manifest

    read_manifest(index)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(index, settings=settings, model_name=args.model, pretrained=args.pretrained,
                     device=None if args.device == "auto" else args.device,
                     precision=None if args.precision == "auto" else args.precision,
                     backend=None if args.backend == "auto" else args.backend,
                     labels_file=Path(args.labels) if args.labels else None, background_load=True)
    serving.run(app, settings, args.host, args.port)
    return 0


def cmd_search(args) -> int:
    from .compose import check_text_weight, composer, parse_box, query_text

    if not args.image and (args.box or args.negative_text or args.text_weight is not None):
        raise LookalikeError("--box, --negative-text and --text-weight refine a photo: give --image too")
    if not args.image and not args.text:
        raise LookalikeError("give --image PHOTO, --text WORDS, or both (a photo refined by words)")
    box = parse_box(args.box) if args.box else None  # bad values fail before the model loads
    weight = check_text_weight(args.text_weight) if args.text_weight is not None else None
    query_text(args.text), query_text(args.negative_text, "--negative-text")
    _check_photo_path(args.image)  # a typo in the path fails in a second, not after the model loads
    with _open_index(args.index) as store:
        model = _model_for_index(args, store)
        if args.image:
            vecs = _embed_query_photo(model, args.image, box)
            compose = composer(model, args.text, args.negative_text, weight)
            if compose is not None:
                vecs = compose(vecs)
        else:
            vecs = model.embed_texts([args.text])
        from .search import PHOTO_QUERY_MIN_SCORE

        default = PHOTO_QUERY_MIN_SCORE if args.image else None  # text cosines: each model's own scale
        min_score = args.min_score if args.min_score is not None else default
        hits = store.search(vecs, args.k, category=args.category, min_score=min_score, ef_search=args.ef_search,
                            nprobe=args.nprobe)[0]
    if args.json:
        print(json.dumps({"results": [h.to_dict() for h in hits]}, ensure_ascii=False))
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank:>3}  {h.score:.4f}  {h.product_id}  {h.title or ''}  [{h.category or ''}]  {h.source}")
    return 0


def _check_photo_path(path: str | None) -> None:
    """Raise LookalikeError unless ``path`` (when given) is a readable file (an http(s) URL is not checked)."""
    from .photo_sources import is_url

    if path is None or is_url(path):
        return
    p = Path(path)
    if not p.is_file():
        reason = "is a directory" if p.is_dir() else "no such file"
        raise LookalikeError(f"cannot use {path}: not_found: {reason}")
    if not os.access(p, os.R_OK):
        raise LookalikeError(f"cannot use {path}: unreadable: permission denied")


def _embed_query_photo(model, path: str, box):
    """``(1, dim)`` embedding of the photo at ``path``, or of ``box`` of it (:func:`indexer.compose.crop_box`)."""
    from .compose import crop_box
    from .images import ImageError, open_image

    try:
        image = open_image(path, draft_size=model.draft_size)
    except ImageError as e:
        raise LookalikeError(f"cannot use {path}: {e.reason}: {e}") from None
    return model.embed_images([crop_box(image, box) if box is not None else image])


def cmd_label(args) -> int:
    from .labels import LabelSet, ZeroShotClassifier

    label_set = LabelSet.load(args.labels)
    first = Path(args.targets[0])
    if len(args.targets) == 1 and first.is_dir() and (first / "catalogue.sqlite").is_file():
        return _label_index(args, label_set)
    model = _load_model(args)  # missing default weights fail here, before torch loads
    from .pipeline import embed_paths

    clf = ZeroShotClassifier(model, label_set)
    ok, vecs, errors = embed_paths(model, args.targets)
    if args.closed_set:
        _closed_set(clf, vecs)
    closed = clf.reference_term is not None
    rows = [{"image": path, "labels": labels, "none_of_these": rejected, "closed_set": closed}
            for path, labels, rejected in zip(ok, clf.top_k(vecs, args.top_k), clf.none_of_these(vecs))]
    rows += [{"image": path, "error": msg} for path, msg in errors.items()]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['image']}: error: {r['error']}")
                continue
            ranked = ", ".join(f"{lab['label']} {lab['score']:.1%}" for lab in r["labels"])
            if r["none_of_these"]:
                ranked = (f"none of these (best label's cosine {r['labels'][0]['cosine']:.3f} is under the model's "
                          f"label_min_cosine {clf.model.calibration['label_min_cosine']}); closest: {ranked}")
            print(f"{r['image']}: {ranked}")
    return 1 if errors and not ok else 0


def _closed_set(clf, reference) -> None:
    """Rank labels relative to ``reference`` photos (indexer.labels' hubness correction), or say why not."""
    from .labels import MIN_REFERENCE

    if not clf.set_reference(reference) and len(reference):
        print(f"--closed-set: {clf.reference_size} distinct usable photos, fewer than the {MIN_REFERENCE} it needs; "
              "labels are ranked by plain cosine", file=sys.stderr)


def _label_index(args, label_set) -> int:
    import numpy as np

    from .labels import ZeroShotClassifier

    with _open_index(args.targets[0], writable=True) as store:
        model = _model_for_index(args, store)
        clf = ZeroShotClassifier(model, label_set)
        if args.closed_set:
            _closed_set(clf, store.reference_vectors())
        closed = clf.reference_term is not None
        pids, means = [], []
        for pid, vecs in store.iter_products():
            mean = vecs.mean(axis=0)
            pids.append(pid)
            means.append(mean / max(float((mean**2).sum()) ** 0.5, 1e-12))
        results, rejected = {}, {}
        for i in range(0, len(pids), 4096):
            chunk = np.asarray(means[i:i + 4096], np.float32)
            for pid, labs, rej in zip(pids[i:i + 4096], clf.top_k(chunk, args.top_k), clf.none_of_these(chunk)):
                results[pid], rejected[pid] = labs, rej
        # a product no label fits (the reject option) keeps no label rather than a wrong one
        store.set_labels({pid: (None, None) if rejected[pid] else (labs[0]["label"], labs[0]["score"])
                          for pid, labs in results.items()},
                         label_set.to_dict())  # the server labels query photos with the same set
        store.save()
        out = Path(args.report) if args.report else store.path / "labels.jsonl"
    if out.suffix.lower() == ".csv":
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "label", "score", "cosine", "none_of_these", "labels", "closed_set"])
            for pid, labs in results.items():
                label, score = (None, None) if rejected[pid] else (labs[0]["label"], labs[0]["score"])
                w.writerow([pid, label, score, labs[0]["cosine"], rejected[pid], json.dumps(labs), closed])
    else:
        with open(out, "w", encoding="utf-8") as f:
            for pid, labs in results.items():
                row = {"id": pid, "labels": labs, "none_of_these": rejected[pid], "closed_set": closed}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.json:
        rows = [{"id": pid, "labels": labs, "none_of_these": rejected[pid], "closed_set": closed}
                for pid, labs in results.items()]
        print(json.dumps(rows, ensure_ascii=False))
    else:
        n_rejected = sum(bool(r) for r in rejected.values())
        none = (f" ({n_rejected} fit none of the labels: best cosine under the model's label_min_cosine "
                f"{model.calibration['label_min_cosine']}; they keep no label)" if n_rejected else "")
        how = (f" as a closed set (ranked against {clf.reference_size} of the index's photos)" if closed else "")
        print(f"labelled {len(results)} products{how}{none}; report: {out}")
    return 0


def cmd_add(args) -> int:
    from .store import Product
    from .updates import PhotoUpload, upsert_product

    meta = {}
    for item in args.meta or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LookalikeError(f"--meta {item!r}: use KEY=VALUE")
        meta[key] = value
    photos = []
    for path in args.images:
        try:
            photos.append(PhotoUpload(Path(path).read_bytes(), str(Path(path).resolve()), Path(path).name))
        except OSError as e:
            raise LookalikeError(f"cannot read {path}: {e.strerror or e}") from None
    with _open_index(args.index, writable=True) as store:
        model = _model_for_index(args, store)
        product, created = upsert_product(store, model, Product(args.id, args.title, args.category, meta), photos)
        store.save()
    n = len(product["images"])
    print(f"{'added' if created else 'updated'} {product['id']} with {n} photo{'' if n == 1 else 's'}")
    return 0


def cmd_delete(args) -> int:
    from .updates import delete_product

    ids = list(dict.fromkeys(args.ids))  # an id named twice is deleted once
    with _open_index(args.index, writable=True) as store:
        # all or nothing: this process holds the write lock, so what exists now still exists below
        missing = [pid for pid in ids if not store.has_product(pid)]
        if missing:
            raise LookalikeError(f"no product with id {', '.join(map(repr, missing))}; nothing was deleted")
        for pid in ids:
            delete_product(store, pid)
        store.save()
    print(f"deleted {len(ids)} product{'' if len(ids) == 1 else 's'}")
    return 0


def cmd_info(args) -> int:
    with _open_index(args.index) as store:
        m = store.manifest()
        info = {
            "path": str(store.path),
            "products": m["products"],
            "photos": m["photos"],
            "model": m["model"],
            "dim": m["model"]["dim"],
            "index": m["index"],
            "categories": dict(store.categories()),
            "created_at": m["created_at"],
            "updated_at": m["updated_at"],
        }
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
    else:
        print(f"{info['path']}: {info['products']} products, {info['photos']} photos")
        print(f"model: {m['model']['name']} (pretrained={m['model']['pretrained']}), dim {info['dim']}, "
              f"weights sha256 {m['model']['weights_sha256'][:16]}")
        idx = m["index"]
        params = ", ".join(f"{k}={v}" for k, v in idx["params"].items())
        budget = idx["choice"]["memory_budget_bytes"] / 2**30
        print(f"index: {idx['type']}{f' ({params})' if params else ''}, {idx['metric']}; chosen by "
              f"--index-type {idx['choice']['requested']}, memory budget {budget:g} GiB; updated {info['updated_at']}")
        for cat, n in list(info["categories"].items())[:30]:
            print(f"  {n:>6}  {cat}")
    return 0


def cmd_rebuild(args) -> int:
    with _open_index(args.index, writable=True) as store:
        store.set_index_choice(args.index_type, args.memory_budget)
        store.rebuild_index()
        spec = store.index_spec()
    print(f"rebuilt {args.index}: {spec.type} index" + "".join(f", {k}={v}" for k, v in spec.params.items()))
    return 0


def cmd_check(args) -> int:
    with _open_index(args.index) as store:
        result = store.check()
    if args.json:
        print(json.dumps(result))
    else:
        state = "consistent" if result["ok"] else "INCONSISTENT"
        print(f"{result['path']}: {state}: {result['products']} products, {result['photos']} photos, "
              f"generation {result['generation']}")
        for p in result["problems"]:
            print(f"  problem: {p}")
        for n in result.get("notes", []):
            print(f"  note: {n}")
    return 0 if result["ok"] else 1


def cmd_audit(args) -> int:
    from .audit import AuditOptions, parse_parts, run_audit
    from .audit_report import write_report

    options = AuditOptions(args.near_duplicate_min_cosine, args.neighbours, args.category_min_margin,
                           args.outlier_min_z, parts=parse_parts(args.parts), max_pairs=args.max_pairs)
    with _open_index(args.index) as store:
        model = _model_for_index(args, store) if "category_disagreements" in options.parts else None
        say = None if args.json else (lambda msg: print(msg, file=sys.stderr))
        out = Path(args.out) if args.out else store.path / "audit"
        if out.resolve() == store.path.resolve():  # its report.json is the indexing run's (failures, skipped rows)
            raise LookalikeError(f"--out {out} is the index directory; its report.json is the indexing report: "
                                 "choose another folder (default: INDEX_DIR/audit)")
        if out.exists() and not out.is_dir():  # said before the audit runs, not after
            raise LookalikeError(f"--out {out} is a file; give a folder for report.json, .csv and .html")
        report = run_audit(store, model, options, progress=say)
        try:
            paths = write_report(report, out, store.resolve_source)
        except OSError as e:
            raise LookalikeError(f"cannot write the audit report to {out}: {e.strerror or e}") from None
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        for part, n in report["counts"].items():
            print(f"{n:>6}  {part}")
        print(f"report: {paths['html']} (and report.json, report.csv)")
    return 0


def cmd_finetune(args) -> int:
    from .finetune import DEFAULT_TEMPLATES, FinetuneConfig, finetune

    weights = {}
    for spec in args.weight or []:
        key, sep, factor = spec.rpartition(":")
        if not sep or "=" not in key:
            raise LookalikeError(f"--weight {spec!r}: use COLUMN=VALUE:FACTOR, e.g. source=magento-train:8")
        try:
            weights[key] = float(factor)
        except ValueError:
            raise LookalikeError(f"--weight {spec!r}: {factor!r} is not a number") from None
    cfg = FinetuneConfig(
        catalogues=args.catalogues, out=args.out, model=args.model, pretrained=args.pretrained,
        from_scratch=args.from_scratch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        templates=args.caption_template or list(DEFAULT_TEMPLATES), seed=args.seed, weights=weights,
        max_minutes=args.max_minutes, precision=args.precision, split_file=args.split_file,
        workers=args.workers, warmup_steps=args.warmup_steps, name=args.name,
    )
    summary = finetune(cfg, progress=not args.quiet)
    print(f"wrote {args.out}: {summary['steps']} steps ({summary['epochs_done']} epochs) in "
          f"{summary['wall_seconds']:.0f} s, final loss {summary['final_loss']}, {summary['images_per_s']} images/s")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, format_table
    from .magento import build_manifest

    datasets = Path(args.datasets)
    if not (datasets / "cifar10").is_dir():
        raise LookalikeError(f"no datasets at {datasets}: pass --datasets DIR (the folder with cifar10/, "
                             "fashion-mnist/, magento/)")
    spec = _model_spec(args)
    model = spec.load()
    if args.magento:
        magento_rows = [json.loads(line) for line in Path(args.magento).read_text().splitlines() if line.strip()]
    else:
        magento_rows, _ = build_manifest(datasets / "magento")
    folder = ms.local_dir(ms.open_clip_name(spec.for_new_index()[0])[0])
    split = folder / "magento_split.json" if folder is not None else None
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    baseline = None
    if args.speed_baseline != "none":
        from .model import load_model

        baseline = load_model(args.speed_baseline, "none", args.device, args.precision, args.backend)
    result = evaluate(model, datasets, magento_rows, split, args.limit, progress=say, speed_baseline=baseline)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help already speaks of it or there is none
    to show (no value, or a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in text.lower()):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookalike", description="Visual similarity search for product catalogues.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    # -v after the command as well: SUPPRESS keeps a command's parser from resetting a -v given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                   parents=[common], formatter_class=_HelpFormatter)

    p = command("index", help="embed a catalogue's photos into an index directory")
    p.add_argument("catalogue", help="folder of images, .csv/.jsonl manifest, .tar shard or folder of shards")
    p.add_argument("--out", required=True, help="index directory (created, or updated if it exists)")
    _model_args(p, ms.MODEL_HELP, ms.PRETRAINED_HELP)
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="photos per forward pass (default 64 on CPU, 256 on CUDA)")
    p.add_argument("--workers", type=_non_negative, default=None,
                   help="decoding processes (default: CPU cores, at most 32)")
    p.add_argument("--prune", action="store_true", help="remove products and photos no longer in the catalogue")
    p.add_argument("--max-failed-fraction", type=_fraction, default=DEFAULT_MAX_FAILED_FRACTION, metavar="F",
                   help="exit with status 1 when more than this share (0 to 1) of the catalogue's photos failed, or "
                        "when none was indexed; the index and report.json are written either way")
    p.add_argument("--id-column", default="id", help="manifest column with the product id")
    p.add_argument("--image-column", default="image", help="manifest column with the photo's path or URL")
    p.add_argument("--title-column", default="title", help="manifest column with the product title")
    p.add_argument("--category-column", default="category",
                   help="manifest column with the category (a path such as Men/Tops/Hoodies)")
    p.add_argument("--image-root", default=None,
                   help="folder that relative image paths start from (default: the manifest's)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read relative image paths, and a folder's symbolic links, that lead outside the root")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="fetch photo URLs on private, loopback or link-local addresses (internal catalogues)")
    _index_type_args(p)
    g = p.add_argument_group("Ray cluster (--engine ray; pip install 'lookalike[ray]')")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: decode workers and the model in this process; ray: Ray actors read, decode and "
                        "embed, this process commits (see docs/PERFORMANCE.md, 'Scaling out')")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="HOST:PORT of a running head node, ray://HOST:10001, auto (this machine's cluster) or "
                        "local (start Ray here for this run); default $RAY_ADDRESS, else local")
    g.add_argument("--ray-workers", type=_positive, default=None, metavar="N",
                   help="model-holding actors (default: the cluster's CPUs / --cpus-per-worker, or its GPUs / "
                        "--gpus-per-worker)")
    g.add_argument("--cpus-per-worker", type=_worker_cpus, default=1.0, metavar="C",
                   help="CPUs each actor reserves, also its photo-reading threads (default 1)")
    g.add_argument("--gpus-per-worker", type=_worker_gpus, default=0.0, metavar="G",
                   help="GPUs each actor reserves, e.g. 1, or 0.5 for two actors per GPU (default 0: CPU)")
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)

    p = command("serve", help="start the HTTP query server")
    p.add_argument("index", nargs="?", default=None, help="index directory (default: LOOKALIKE_INDEX)")
    p.add_argument("--config", default=None, help="TOML settings file (also: LOOKALIKE_CONFIG); see README")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (0 to 65535; 0 picks a free one)")
    p.add_argument("--labels", default=None,
                   help="label set .yaml/.json for the labels of query photos (default: the set the index was "
                        "last labelled with by 'lookalike label INDEX', else data/labels/retail.yaml)")
    _model_args(p, ms.INDEX_MODEL_HELP, ms.INDEX_PRETRAINED_HELP)
    p.set_defaults(func=cmd_serve)

    from .compose import DEFAULT_TEXT_WEIGHT  # numpy and Pillow, no torch

    p = command("search", help="find products similar to a photo (or a box of it), matching a text, or both")
    p.add_argument("index", help="index directory")
    p.add_argument("--image", help="query photo")
    p.add_argument("--text", help="query text, e.g. 'red running shoes'; with --image, words that refine the photo "
                                  "(a composed query: 'in red', 'a backpack')")
    p.add_argument("--text-weight", type=float, default=None, metavar="W",
                   help="with --image and --text: how much the words count, 0 (photo alone) to 1 (words alone); "
                        f"default {DEFAULT_TEXT_WEIGHT}, measured on Magento (README, 'Composed queries')")
    p.add_argument("--negative-text", default=None, metavar="WORDS",
                   help="with --image: words to move away from, e.g. 'blue' (subtracted with --text-weight)")
    p.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1",
                   help="with --image: search only this box of the photo (left, top, right, bottom after EXIF "
                        "orientation), in pixels, or in fractions of the width and height when all four are <= 1")
    p.add_argument("-k", type=_positive, default=10, help="number of products (default 10)")
    p.add_argument("--category", default=None, help="only products in this category (or below it)")
    p.add_argument("--min-score", type=_cosine, default=None,
                   help="drop results whose cosine is under this, -1..1 (default: 0 for --image, where a negative "
                        "cosine means unlike; none for --text)")
    p.add_argument("--ef-search", type=_positive, default=None,
                   help="HNSW index: candidates explored per query, more = better recall, slower "
                        "(default: the index's)")
    p.add_argument("--nprobe", type=_positive, default=None,
                   help="IVF-PQ index: inverted lists visited per query, more = better recall, slower "
                        "(default: the index's)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    _model_args(p, ms.INDEX_MODEL_HELP, ms.INDEX_PRETRAINED_HELP)
    p.set_defaults(func=cmd_search)

    p = command("label", help="zero-shot labels for photos, or for every product of an index")
    p.add_argument("targets", nargs="+", metavar="INDEX_DIR|PATH", help="an index directory, or image files")
    p.add_argument("--labels", default=None, help="label set .yaml/.json (default data/labels/retail.yaml)")
    p.add_argument("--top-k", type=_positive, default=5, help="labels to report per photo or product")
    p.add_argument("--report", default=None,
                   help="for an index: report file, .jsonl or .csv (default INDEX_DIR/labels.jsonl)")
    p.add_argument("--json", action="store_true", help="print the labels as JSON")
    p.add_argument("--closed-set", action="store_true",
                   help="every label names something these photos hold (e.g. the catalogue's own categories): rank "
                        "labels relative to the photos they fit best (hubness correction; needs >= 100 photos). "
                        "Lifts labels whose words the model never trained on; harmful when labels name things "
                        "the photos do not hold")
    _model_args(p, ms.LABEL_MODEL_HELP, ms.LABEL_PRETRAINED_HELP)
    p.set_defaults(func=cmd_label)

    p = command("finetune", help="contrastive training of a CLIP model on catalogue photos and captions")
    p.add_argument("catalogues", nargs="+", metavar="MANIFEST", help="catalogues (any format 'index' reads)")
    p.add_argument("--out", required=True, help="model folder to write (open_clip format)")
    p.add_argument("--model", default=ms.DEFAULT_MODEL, help="model to start from, or an architecture config .json")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", default=None, help="weights to start from (tag or file)")
    src.add_argument("--from-scratch", action="store_true", help="random initial weights")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the catalogues (fractions allowed)")
    p.add_argument("--batch-size", type=_positive, default=128, help="photo-caption pairs per training step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW, cosine schedule)")
    p.add_argument("--warmup-steps", type=_non_negative, default=200, help="steps of linear learning-rate warm-up")
    p.add_argument("--caption-template", action="append", metavar="TEMPLATE",
                   help="caption template over the row's columns, e.g. 'a photo of a {title}.' (repeatable)")
    p.add_argument("--weight", action="append", metavar="COLUMN=VALUE:FACTOR",
                   help="repeat rows whose COLUMN equals VALUE FACTOR times per epoch (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random seed (initial weights, shuffling)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much wall time")
    p.add_argument("--precision", choices=ms.TRAIN_PRECISIONS, default="auto", help=ms.TRAIN_PRECISION_HELP)
    p.add_argument("--split-file", default=None, help="JSON split to copy into the model folder (for eval)")
    p.add_argument("--workers", type=_positive, default=2, help="decoding processes")
    p.add_argument("--name", default=None, help="model name for the card (default: the folder name)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = command("eval", help="zero-shot and catalogue-retrieval quality of a model")
    p.add_argument("--datasets", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"),
                   help="folder with cifar10/, fashion-mnist/, magento/ (default ../shared/datasets)")
    p.add_argument("--magento", default=None, help="Magento manifest (default: built from DATASETS/magento)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="at most N test images of CIFAR-10 and of Fashion-MNIST, and N Magento query photos (evenly "
                        "spread; the Magento photos are still searched among the whole catalogue)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--speed-baseline", default="ViT-B-32",
                   help="open_clip architecture whose embedding speed (random weights, same device, precision and "
                        "back-end) is measured in the same run for the speed ratio; 'none' skips it (default ViT-B-32)")
    _model_args(p, ms.EVAL_MODEL_HELP, ms.PRETRAINED_HELP)
    p.set_defaults(func=cmd_eval)

    p = command("add", help="add or replace one product with its photos")
    p.add_argument("index", help="index directory")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="the product's photos (replace its current ones)")
    p.add_argument("--id", required=True, help="product id (an existing product is replaced)")
    p.add_argument("--title", default=None, help="product title")
    p.add_argument("--category", default=None, help="category path, e.g. Men/Tops/Hoodies")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="other metadata (repeatable)")
    _model_args(p, ms.INDEX_MODEL_HELP, ms.INDEX_PRETRAINED_HELP)
    p.set_defaults(func=cmd_add)

    p = command("delete", help="delete products and their photos")
    p.add_argument("index", help="index directory")
    p.add_argument("ids", nargs="+", metavar="ID", help="ids of the products to delete")
    p.set_defaults(func=cmd_delete)

    p = command("info", help="what an index holds")
    p.add_argument("index", help="index directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = command("rebuild", help="rebuild an index's FAISS vectors from its database, e.g. as another index type")
    p.add_argument("index", help="index directory")
    _index_type_args(p)
    p.set_defaults(func=cmd_rebuild)

    p = command("check", help="verify that an index's vectors and metadata agree (exit 1 if not)")
    p.add_argument("index", help="index directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_check)

    p = command("audit", help="find reused photos, near-duplicates, wrong categories and outliers in an index")
    from . import audit as au

    p.add_argument("index", help="index directory")
    p.add_argument("--out", default=None, help="report folder for report.json, .csv, .html (default INDEX_DIR/audit)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--parts", default=",".join(au.PARTS), help="comma-separated parts to run")
    p.add_argument("--near-duplicate-min-cosine", type=_number_between(0.01, 1, "a cosine"), default=None,
                   help="photos of different products at or above this cosine are near-duplicates (default: the "
                        f"model's calibrated {au.CALIBRATION_KEY}, else {au.DEFAULT_NEAR_DUPLICATE_MIN_COSINE})")
    p.add_argument("--neighbours", type=_positive, default=au.DEFAULT_NEIGHBOURS,
                   help="nearest photos fetched per photo at first (more are fetched while they pass the threshold)")
    p.add_argument("--category-min-margin", type=_fraction, default=au.DEFAULT_CATEGORY_MIN_MARGIN,
                   help="zero-shot probability margin over the catalogue category that flags a product")
    p.add_argument("--outlier-min-z", type=_number_between(0.01, 1000, "a z-score"), default=au.DEFAULT_OUTLIER_MIN_Z,
                   help="robust z-score of the distance to the category centroid that flags an outlier")
    p.add_argument("--max-pairs", type=_positive, default=au.DEFAULT_MAX_PAIRS,
                   help="stop with an error past this many near-duplicate pairs (a threshold too low for the model)")
    _model_args(p, ms.INDEX_MODEL_HELP, ms.INDEX_PRETRAINED_HELP)
    p.set_defaults(func=cmd_audit)
    return parser


def _index_type_args(p: argparse.ArgumentParser) -> None:
    from .ann import EXACT_UP_TO, REQUESTABLE

    g = p.add_argument_group("index type")
    g.add_argument("--index-type", choices=list(REQUESTABLE), default=None,
                   help=f"auto: exact (flat) below {EXACT_UP_TO:,} photos, else hnsw if it fits --memory-budget, "
                        "else ivfpq; an explicit type is kept as the catalogue grows (default: the index's "
                        "recorded choice, auto for a new one)")
    g.add_argument("--memory-budget", type=_byte_size, default=None, metavar="SIZE",
                   help="memory the FAISS index may use, e.g. 4GB, 512MiB (default: the index's, 4GiB for a new one)")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _byte_size(text: str) -> int:
    """An argparse type: a size such as 4GB, 1.5GiB, 512MB or 1000000 (bytes)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 4GB, 512MiB or a number of bytes")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return size


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum, with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v

    return parse


def _number_between(low: float, high: float, what: str = "a number"):
    """An argparse type: a number from ``low`` to ``high``, with a clear message otherwise."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"{what} is from {low:g} to {high:g}, got {text}")
        return v

    return parse


_positive = _int_at_least(1)


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (the resolver would silently wrap 99999 to 34463)."""
    v = _int_at_least(0)(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"a port is from 0 to 65535, got {text}")
    return v


_fraction = _number_between(0, 1, "a fraction")
_cosine = _number_between(-1, 1, "a cosine")
_non_negative = _int_at_least(0)
_worker_cpus = _number_between(0.01, 1024, "CPUs per worker")
_worker_gpus = _number_between(0, 64, "GPUs per worker")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LookalikeError as e:
        print(f"lookalike: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's, not ours: a full disk, a read-only folder, a file where a folder goes
        where = f"{e.filename}: " if e.filename else ""
        print(f"lookalike: error: {where}{e.strerror or e}; committed work is kept, re-run when it is fixed",
              file=sys.stderr)
        return 2
    except sqlite3.OperationalError as e:  # "database or disk is full", "attempt to write a readonly database"
        print(f"lookalike: error: the index database: {e}; committed work is kept, re-run when it is fixed",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lookalike: interrupted; committed work is kept, re-run to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
