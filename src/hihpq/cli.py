"""Command line: ``hihpq train | evaluate | encode | search | serve | index | configs | demo | bench | report``.

``hihpq index`` has ``info``, ``add`` and ``remove``. Every command that produces results writes ``run.json`` (config,
seed, versions, git commit) beside them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hihpq.config import ConfigError, builtin_configs, load_config
from hihpq.runinfo import run_record, write_json

log = logging.getLogger("hihpq")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="built-in config name (see `hihpq configs`) or a YAML file")
    _add_override_args(p)


def _add_override_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. -o train.epochs=10 (repeatable)",
    )
    p.add_argument("--data", help="dataset location (CIFAR-10: folder with cifar10-jpeg/; else $HIHPQ_DATA)")
    p.add_argument("--device", help="cpu or cuda (overrides train.device)")


def _load(args) -> object:
    overrides = list(args.overrides)
    if getattr(args, "images", None):
        overrides += ["data.dataset=images", f"data.root={args.images}"]
    if getattr(args, "eval_labels", None):
        overrides.append(f"data.eval_labels={args.eval_labels}")
    if args.config is None:
        if not getattr(args, "images", None):
            raise ConfigError("give a config (see `hihpq configs`) or --images DIR")
        args.config = "photos"
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    if getattr(args, "data", None):
        overrides.append(f"data.root={args.data}")
    cfg = load_config(args.config, overrides)
    _check_device(cfg.train.device)
    return cfg


def _check_device(device: str) -> None:
    """A CUDA device that is not there is refused here, not by a traceback deep in the first model move."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA device is available here; use --device cpu")
    n = int(device.split(":", 1)[1]) if ":" in device else 0
    if n >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (refused at parse time, before a model is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


#: Config keys a resumed run may change: where things are and how fast they run, not what is computed.
RESUME_SAFE_KEYS = (
    "name",
    "data.root",
    "features.cache_dir",
    "features.num_workers",
    "train.device",
    "train.num_threads",
    "eval.",
)


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b, name = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_config_differences(a, b, f"{name}."))
        elif a != b and not any(name == k or (k.endswith(".") and name.startswith(k)) for k in RESUME_SAFE_KEYS):
            out.append(f"{name}: {a!r} in the run, {b!r} now")
    return out


def _check_run_folder(out: Path, cfg, *, resume: bool, force: bool) -> None:
    """Before any work: --resume continues the same run (a checkpoint and an unchanged config), and a plain
    train does not overwrite a run folder's results without --force."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"--resume given but no checkpoint at {out / 'checkpoint.pt'}")
        saved_path = out / "config.yaml"
        if not saved_path.is_file():
            raise FileNotFoundError(f"--resume: {saved_path} is missing, so the resumed config cannot be checked")
        diff = _config_differences(load_config(str(saved_path)).to_dict(), cfg.to_dict())
        if diff:
            raise ConfigError(
                f"--resume with a config that differs from the run's {saved_path}: {'; '.join(diff)}. "
                f"Resume with the run's own config, or train into another --out (only {', '.join(RESUME_SAFE_KEYS)}* "
                "may change)"
            )
    elif not force and any((out / name).exists() for name in ("model.pt", "checkpoint.pt")):
        held = "a finished run (model.pt)" if (out / "model.pt").exists() else "an interrupted run (checkpoint.pt)"
        raise ConfigError(
            f"{out} already holds {held}; pass --resume to continue it, --force to train over it, or another --out"
        )


# ------------------------------------------------------------------------------------------------- commands
def cmd_configs(args) -> int:
    for name in builtin_configs():
        print(name)
    return 0


def cmd_train(args) -> int:
    from hihpq.runs import train_run

    cfg = _load(args)
    from hihpq.data.prepare import make_split, resolve_levels

    out = Path(args.out or f"runs/{cfg.name}")
    split = make_split(cfg)  # every process: concurrent unpackers of the CIFAR-10 tarball are safe
    resolve_levels(cfg, len(split.train))  # hierarchy sizes from the data when the config gives none
    cfg.check_training_size(len(split.train))  # before the features: levels against the training set
    _check_run_folder(out, cfg, resume=args.resume, force=args.force)
    out = train_run(cfg, out, resume=args.resume, evaluate=not args.no_eval, split=split)
    print(f"model, log and run record in {out}/")
    return 0


def _run_config(loaded, args):
    """The training config a model file records (provenance), for the protocol it is evaluated on."""
    from hihpq.config import from_dict

    recorded = loaded.provenance.get("config")
    if not recorded:
        raise ValueError(f"{loaded.path} records no training config: evaluate it with the Python API")
    cfg = from_dict(recorded)
    if getattr(args, "device", None):
        cfg.train.device = args.device
    return cfg


def cmd_evaluate(args) -> int:
    from hihpq import evaluation as E
    from hihpq.models.io import load_model

    loaded = load_model(args.model, device=args.device or "cpu")
    cfg = _run_config(loaded, args)
    split, q_emb, db_emb = E.protocol_embeddings(loaded, cfg, args.data)
    if not len(split.query):
        raise ValueError("the model's images have no labels: nothing to evaluate (train with --eval-labels FILE)")
    topk = args.topk or cfg.eval.topk
    ranked, info, index = E.rank_embedded(loaded.model, q_emb, db_emb, topk, args.metric or cfg.eval.metric)
    scores = {**E.retrieval_scores(ranked, split.query_labels, split.database_labels, topk), **info}
    print(f"{split.summary()}\nmAP@{topk} = {scores[f'map_at_{topk}']:.4f}")
    out = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    write_json(out / "eval.json", run_record(cfg.to_dict(), cfg.seed, eval=scores))
    if args.save_codes:
        E.save_retrieval(args.save_codes, index, q_emb, ranked, split, topk, scores[f"map_at_{topk}"])
        print(f"codes, query embeddings, codebooks and rankings in {args.save_codes}")
    return 0


def cmd_encode(args) -> int:
    from hihpq import evaluation as E
    from hihpq.atomic import check_output
    from hihpq.encoder import Encoder
    from hihpq.index import write_index
    from hihpq.index.io import is_index_file

    check_output(args.out, looks_like=is_index_file, what="hihpq index file", force=args.force)  # before any work
    if args.shard and not args.images:
        raise ValueError("--shard needs --images FOLDER (the protocol's database is encoded in one pass)")
    enc = Encoder.load(args.model, device=args.device)
    out, names = Path(args.out), None
    if args.images:
        from hihpq.data.prepare import list_images

        paths, ids, shard_meta = [p.absolute() for p in list_images(args.images)], None, {}
        if args.shard:  # this process's slice of the sorted paths; ids stay global positions
            from hihpq.index.shards import select_shard

            paths, ids, shard_meta, out = select_shard(paths, args.shard, args.out)
        index = enc.index(paths, ids=ids, metric=args.metric, progress=True, on_error="skip")
        index.user_metadata = {**index.user_metadata, **shard_meta}
        if enc.skipped:
            more = ", ..." if len(enc.skipped) > 5 else ""
            print(f"skipped {len(enc.skipped)} unreadable image(s): {', '.join(enc.skipped[:5])}{more}")
    else:
        cfg = _run_config(enc.model_file, args)
        split, _, emb = E.protocol_embeddings(enc.model_file, cfg, args.data)
        names = [split.dataset.describe(int(i)) for i in split.database]
        index = E.build_index(enc.model_file.model, emb, metric=args.metric)
        index.user_metadata = {**index.user_metadata, **enc.index_metadata()}
    write_index(index, out, item_names=names, force=args.force)
    print(f"wrote {index.ntotal} codes ({index.M} bytes each) to {out}")
    return 0


def cmd_search(args) -> int:
    from hihpq.data.folders import readable_images
    from hihpq.data.prepare import list_images
    from hihpq.encoder import Encoder
    from hihpq.index import read_index
    from hihpq.index_update import check_model

    index = read_index(args.index)
    model_path = args.model or index.user_metadata.get("model")
    if not model_path:
        raise ValueError("this index records no model; pass --model RUN_DIR")
    queries, bad = readable_images(list_images(args.query))  # one bad query is skipped, not fatal
    if bad:
        more = ", ..." if len(bad) > 5 else ""
        print(f"skipped {len(bad)} unreadable query image(s): {'; '.join(bad[:5])}{more}", file=sys.stderr)
    if not queries:
        raise ValueError(f"no readable query image in {args.query}")
    enc = Encoder.load(model_path, device=args.device)
    check_model(args.index, index.user_metadata, enc)
    emb = enc.embed(queries)
    D, I = index.search(emb, args.k)
    for q, drow, irow in zip(queries, D, I, strict=True):
        print(f"query {q}")
        names = index.get_metadata(irow) if index.has_item_metadata else [""] * len(irow)
        for rank, (d, i, name) in enumerate(zip(drow, irow, names, strict=True), 1):
            if i >= 0:
                print(f"  {rank:3d}  id={i:<8d} d={d:.4f}  {name}")
    return 0


def cmd_index_add(args) -> int:
    from hihpq.index_update import add_images

    counts = add_images(args.index, args.images, model=args.model, device=args.device)
    print(
        f"added {counts['added']} image(s) to {args.index}; {counts['already_present']} already there, "
        f"{counts['unreadable']} unreadable"
    )
    return 0


def cmd_index_remove(args) -> int:
    from hihpq.index_update import remove_items

    removed = remove_items(args.index, ids=args.ids, paths=args.paths)
    print(f"removed {removed} item(s) from {args.index}")
    return 0


def cmd_index_merge(args) -> int:
    from hihpq.index.shards import merge_index_files

    summary = merge_index_files(args.out, args.shards)
    print(f"merged {summary['n_files']} files: {summary['n_items']} codes in {summary['out']}")
    return 0


def cmd_serve(args) -> int:
    from hihpq.service import serve

    _check_device(args.device)
    options = {"device": args.device, "k": args.k, "k_max": max(args.k, 100), "max_upload_mb": args.max_upload_mb}
    options["threads"] = args.threads
    serve(args.index, args.model, host=args.host, port=args.port, **options)
    return 0


def cmd_index_info(args) -> int:
    from hihpq.index import describe_index

    info = describe_index(args.index, verify=args.verify)  # --verify: every checksum, IndexFileError on a mismatch
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    if args.verify:
        print("every section checksum matches")
    return 0


def cmd_demo(args) -> int:
    from hihpq.demo import run_demo

    _check_device(args.device)
    run_demo(data=args.data, out=args.out, device=args.device, quick=args.quick)
    return 0


def cmd_bench(args) -> int:
    from hihpq.benchmark import run_grid

    overrides = list(args.overrides)
    if args.device:
        _check_device(args.device)
        overrides.append(f"train.device={args.device}")
    out = Path(args.out)
    run_grid(args.protocol, args.methods, args.bits, args.seeds, out, overrides, args.data, progress=not args.quiet)
    table = out.with_suffix("") / "table.md"
    print(f"\n{table.read_text()}\nrecords in {out}, report and per-run details in {table.parent}/")
    return 0


def cmd_report(args) -> int:
    from hihpq.benchmark import write_grid_report

    out = Path(args.results)
    if not out.is_file():
        raise FileNotFoundError(f"no results file {out} (the records written by `hihpq bench --out`)")
    table = out.with_suffix("") / "table.md"
    title = args.title
    if title is None and table.is_file():  # keep the protocol summary of the last bench run
        first = table.read_text().splitlines()[:1]
        title = first[0].lstrip("# ").strip() if first and first[0].startswith("# ") else None
    paths = write_grid_report(out, title=title)
    print(f"{table.read_text()}\nwrote {', '.join(p.name for p in paths)} in {table.parent}/")
    return 0


# --------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hihpq", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("configs", help="list the built-in configs")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("train", help="train HiHPQ on a protocol (cached frozen-backbone views, or end to end)")
    p.add_argument("config", nargs="?", help="built-in config name (see `hihpq configs`) or a YAML file")
    _add_override_args(p)
    p.add_argument(
        "--images",
        metavar="DIR",
        help="train on every image below DIR (no labels needed; config default: photos); sets data.dataset=images",
    )
    p.add_argument("--eval-labels", metavar="FILE.csv", help="with --images: path,label lines enabling evaluation")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (same config)")
    p.add_argument("--force", action="store_true", help="train over a run already in --out")
    p.add_argument("--no-eval", action="store_true", help="skip the retrieval evaluation after training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="mAP@K of a trained model on its protocol")
    p.add_argument("model", help="run directory or model.pt")
    p.add_argument("--data")
    p.add_argument("--topk", type=_positive_int)
    p.add_argument("--metric", choices=["adc", "sdc"])
    p.add_argument("--device", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--save-codes",
        metavar="FILE.npz",
        help="also write the database codes, query embeddings, codebooks, curvatures, labels and rankings "
        "(to recompute the figures independently)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("encode", help="encode a database into an index file")
    p.add_argument("model", help="run directory or model.pt")
    p.add_argument("--out", required=True, help="index file to write")
    p.add_argument("--images", help="an image folder to encode (default: the protocol's database)")
    p.add_argument("--data")
    p.add_argument("--metric", choices=["adc", "sdc"], default="adc")
    p.add_argument("--device", help="cpu (default) or cuda[:N]")
    p.add_argument("--force", action="store_true", help="overwrite --out even when it is not an index file")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="encode only shard I (0-based) of N contiguous shards of the sorted --images files, into "
        "OUT-IIIII-of-NNNNN; 'auto' takes I/N from torchrun (RANK/WORLD_SIZE); join with `hihpq index merge`",
    )
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("search", help="search an index with query images")
    p.add_argument("index")
    p.add_argument("--query", required=True, help="an image or a folder of images")
    p.add_argument("-k", type=_positive_int, default=10)
    p.add_argument("--model", help="run directory (default: the one recorded in the index)")
    p.add_argument("--device", help="cpu (default) or cuda[:N]")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="serve an index over HTTP: search API and web page (needs hihpq[serve])")
    p.add_argument("index")
    p.add_argument("--model", help="run directory or model.pt (default: the one recorded in the index)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    p.add_argument("-k", type=_positive_int, default=10, help="results per search unless the request says (default 10)")
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest accepted upload (default 10 MB)")
    p.add_argument("--threads", type=_positive_int, help="torch threads of the model (default: the usable cores)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("index", help="index file tools")
    isub = p.add_subparsers(dest="index_command", required=True)
    pi = isub.add_parser("info", help="describe an index file")
    pi.add_argument("index")
    pi.add_argument("--verify", action="store_true", help="check every section's checksum (exit 2 on a mismatch)")
    pi.set_defaults(func=cmd_index_info)
    pa = isub.add_parser("add", help="encode images with the index's own model and append them (atomic)")
    pa.add_argument("index")
    pa.add_argument("--images", required=True, help="an image or a folder; paths already in the index are skipped")
    pa.add_argument("--model", help="run directory (default: the one recorded in the index; must be that model)")
    pa.add_argument("--device", help="cpu (default) or cuda[:N]")
    pa.set_defaults(func=cmd_index_add)
    pr = isub.add_parser("remove", help="remove items by path or id (atomic)")
    pr.add_argument("index")
    which = pr.add_mutually_exclusive_group(required=True)
    which.add_argument("--paths", nargs="+", help="image paths as added (relative ones are made absolute)")
    which.add_argument("--ids", nargs="+", type=int)
    pr.set_defaults(func=cmd_index_remove)
    pm = isub.add_parser("merge", help="join index shard files (from encode --shard) into one index")
    pm.add_argument("out", help="merged index file to write")
    pm.add_argument("shards", nargs="+", help="the shard files, every one exactly once")
    pm.set_defaults(func=cmd_index_merge)

    p = sub.add_parser("demo", help="train, encode and evaluate on a reduced CIFAR-10 (II); compare with PCA+PQ")
    p.add_argument("--data", help="folder holding CIFAR-10 (else $HIHPQ_DATA, else download, else digits)")
    p.add_argument("--out", default="hihpq-demo", help="where results.json and the plot go")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="an even smaller run (a minute or two)")
    p.set_defaults(func=cmd_demo)

    from hihpq.report_tables import METHOD_NAMES  # the names of benchmark.METHODS, without importing the training code

    p = sub.add_parser(
        "bench",
        help="run a grid of methods x bits x seeds on a protocol; write results.json, table.md and plots",
    )
    p.add_argument("--protocol", default="cifar10-ii", help="config family, e.g. cifar10-ii, cifar10-i, flickr25k")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["hihpq", "pq", "opq"],
        choices=list(METHOD_NAMES),
        metavar="METHOD",
        help=f"any of {', '.join(METHOD_NAMES)} (default: hihpq pq opq)",
    )
    p.add_argument("--bits", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--seeds", nargs="+", type=int, default=[2021])
    p.add_argument("--out", default="results.json", help="records file (merged); details and report beside it")
    _add_override_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="rewrite table.md and the plots of a results file (no training)")
    p.add_argument("results", help="records file written by hihpq bench, e.g. bench/results/cifar10_ii_lite0.json")
    p.add_argument("--title", help="heading of table.md (default: the current one)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every SIMD build it tries
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as escapes, never crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return args.func(args)
    except Exception as exc:
        message = _user_error(exc)
        if message is None or args.verbose:  # a bug, or asked for: the traceback
            raise
        print(f"hihpq {args.command}: error: {message}", file=sys.stderr)
        return 2


def _user_error(exc: Exception) -> str | None:
    """The message of an error caused by the input or the machine (None: a bug, shown with its traceback)."""
    train = sys.modules.get("hihpq.train")
    if isinstance(exc, ConfigError | ValueError) or (train and isinstance(exc, train.TrainingDiverged)):
        return str(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename is None:
        return str(exc)  # ours: the message says what is missing and what to do
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename} is a folder, not a file"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    if isinstance(exc, RuntimeError) and "state_dict" in str(exc):
        first = str(exc).strip().splitlines()[0]
        return f"the model file does not fit the model its config builds (wrong shapes or keys): {first}"
    return None


if __name__ == "__main__":
    sys.exit(main())
