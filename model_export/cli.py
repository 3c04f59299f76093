"""Thin command line over the model_export library: parse arguments, set up logging, call."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from model_export.sources import default_cache_dir

DEFAULT_MODELS_DIR = Path("models")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_export", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=None, help="download/feature cache")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train heads/top blocks on a dataset (developers)")
    train.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        help="ImageFolder roots (cat/, dog/ in each); the split is stratified by source",
    )
    train.add_argument("--only", nargs="*", help="train only these model names")
    train.add_argument("--no-finetune", action="store_true", help="skip stage 2")
    train.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="built ONNX model (manifest.json beside it) whose probabilities the distilled runs learn from",
    )

    build = commands.add_parser("build", help="rebuild ONNX models + manifest from committed weights")
    build.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR)
    build.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=None,
        help="dataset roots for evaluation (optional; the same roots as `train`)",
    )
    build.add_argument(
        "--fit-temperatures",
        action="store_true",
        help="choose each model's serving resolution among its candidates and fit its temperature, "
        "both on the val split, recorded in evaluation.json (needs --data)",
    )
    build.add_argument(
        "--int8-ranges",
        action="store_true",
        help="recompute the int8 activation ranges and the convolutions' input means (for the "
        "bias correction) from train photos (needs --data)",
    )
    build.add_argument(
        "--calibrate",
        action="store_true",
        help="deprecated: both --fit-temperatures and --int8-ranges",
    )
    build.add_argument("--threads", type=int, default=2, help="intra-op threads for latency figures")
    build.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="build only these models (and their int8 variants), no cascade, no evaluation record",
    )

    verify = commands.add_parser("verify", help="re-check hashes and parity of built models")
    verify.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR)
    verify.add_argument("--data", type=Path, nargs="+", default=None, help="check parity on val photos")

    report = commands.add_parser("report", help="print the manifest as a table")
    report.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR)
    report.add_argument("--plot", type=Path, default=None, help="write the frontier plot (PNG) here")
    report.add_argument(
        "--speedups-only",
        action="store_true",
        help="print only the int8 speed-ups (make report runs this in .venv-openvino for OpenVINO's)",
    )
    report.add_argument(
        "--provider",
        choices=["all", "cpu", "openvino"],
        default="all",
        help="whose speed-ups to measure: every CPU provider the installed onnxruntime offers (all), "
        "onnxruntime's own (cpu) or OpenVINO (openvino, onnxruntime-openvino installed)",
    )

    evaluate = commands.add_parser("evaluate", help="measure built models (and the cascade) on a dataset")
    evaluate.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR)
    evaluate.add_argument(
        "--data", type=Path, nargs="+", required=True, help="ImageFolder roots (cat/, dog/)"
    )
    evaluate.add_argument(
        "--all-images",
        action="store_true",
        help="every photo under --data is the test set (an independent collection)",
    )
    evaluate.add_argument("--write", action="store_true", help="store the figures in the manifest")
    evaluate.add_argument("--plot", type=Path, default=None, help="write the frontier plot (PNG) here")
    evaluate.add_argument(
        "--max-side",
        type=int,
        default=None,
        metavar="PX",
        help="shrink every photo to at most PX on its longer side and save it again as JPEG "
        "(quality 75) first: figures for thumbnails and small photos (never written to the manifest)",
    )
    evaluate.add_argument(
        "--provider",
        choices=["cpu", "openvino", "openvino-bf16"],
        default="cpu",
        help="the onnxruntime provider that runs the models: the manifest's figures are the CPU "
        "provider's; openvino (onnxruntime-openvino installed) measures the answers a server with "
        "CATDOG_PROVIDERS=openvino gives, openvino-bf16 those of one that also has "
        "CATDOG_OPENVINO_PRECISION=bf16 (never written to the manifest)",
    )

    shift = commands.add_parser(
        "source-shift",
        help="developers: what an unseen photo source costs (leave one source out, head only)",
    )
    shift.add_argument("--data", type=Path, nargs="+", required=True, help="ImageFolder roots (cat/, dog/)")
    shift.add_argument(
        "--models", nargs="+", default=["mobilenet", "xception"], help="backbones by model name"
    )
    shift.add_argument(
        "--train-every", type=int, default=1, help="use every N-th training photo (features cost time)"
    )
    shift.add_argument("--threads", type=int, default=2)

    fetch = commands.add_parser("fetch", help="download and verify pretrained weight sources")
    fetch.add_argument("--source", action="append", help="artifact key (default: the defaults)")
    fetch.add_argument("--source-digest", default=None, help="expected hash for an unpinned source")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before any command imports Keras: the backend it binds to, and TensorFlow's C++ chatter.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cache_dir = args.cache_dir or default_cache_dir()
    if args.command == "train":
        from model_export.records import read_training_record
        from model_export.specs import TRAINING_RECORD
        from model_export.teacher import Teacher
        from model_export.train import TrainConfig
        from model_export.training_run import train_all

        cfg = TrainConfig(finetune=not args.no_finetune)
        previous = read_training_record(TRAINING_RECORD) if TRAINING_RECORD.exists() else None
        teacher = Teacher.from_build(args.teacher) if args.teacher else None
        train_all(args.data, cfg, cache_dir, args.only, previous, teacher)
        return 0
    if args.command == "fetch":
        from model_export import sources

        for key in args.source or list(sources.DEFAULT_SOURCES.values()):
            path = sources.fetch(sources.ARTIFACTS[key], cache_dir, args.source_digest)
            logging.getLogger("model_export").info("%s verified: %s", key, path)
        return 0
    if args.command == "build":
        from model_export.build import build_all

        if args.calibrate:
            logging.getLogger("model_export").warning(
                "--calibrate is deprecated and goes in the next release: it means "
                "--fit-temperatures --int8-ranges, say which you want"
            )
        build_all(
            args.out,
            args.data,
            cache_dir,
            args.threads,
            fit_temperatures=args.fit_temperatures or args.calibrate,
            int8_ranges=args.int8_ranges or args.calibrate,
            only=args.only,
        )
        return 0
    if args.command == "verify":
        from model_export.verify import verify_all

        return verify_all(args.out, cache_dir, args.data)
    if args.command == "evaluate":
        from catdog_core.sessions import CPU, OPENVINO
        from model_export.data import SHRUNK_JPEG_QUALITY
        from model_export.evaluate import remeasure
        from model_export.records import read_training_record
        from model_export.report import plot_frontier, source_table, table
        from model_export.specs import TRAINING_RECORD
        from service.manifest import write_manifest

        if args.write and args.max_side:
            parser.error("--write stores the figures of the photos as they are; drop --max-side")
        if args.write and args.provider != "cpu":
            parser.error("--write stores the CPU provider's figures; drop --provider")
        seed = read_training_record(TRAINING_RECORD).split.seed
        provider = OPENVINO if args.provider.startswith("openvino") else CPU
        precision = "bf16" if args.provider == "openvino-bf16" else "fp32"
        manifest = remeasure(
            args.out / "manifest.json", args.data, args.all_images, seed, args.max_side, provider, precision
        )
        if provider == OPENVINO:
            print(f"every model run on onnxruntime's OpenVINO provider, floating-point layers in {precision}")
        if args.max_side:
            print(
                f"every photo shrunk to at most {args.max_side} px and saved again as JPEG "
                f"(quality {SHRUNK_JPEG_QUALITY}) first"
            )
        print(table(manifest))
        print()
        print(source_table(manifest))
        if args.plot:
            plot_frontier(manifest, args.plot)
        if args.write and not args.all_images:
            write_manifest(manifest, args.out / "manifest.json")
        return 0
    if args.command == "source-shift":
        from model_export import source_shift
        from model_export.records import read_training_record
        from model_export.specs import TRAINING_RECORD

        seed = read_training_record(TRAINING_RECORD).split.seed
        for name in args.models:
            shifts = source_shift.measure(name, args.data, seed, cache_dir, args.threads, args.train_every)
            print(source_shift.table(name, shifts), flush=True)
        return 0
    if args.command == "report":
        from model_export.report import print_report

        print_report(args.out, args.plot, args.speedups_only, args.provider)
        return 0
    raise AssertionError(args.command)
