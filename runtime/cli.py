"""`interactive`: export engines, show buckets, extract features to Parquet.

Exit codes: 0 success; 1 a fatal error (bad engine, unwritable output, failed export); 2 bad
usage; 3 the command finished but some images failed (their rows say why); 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). Every failure is one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .buckets import all_buckets, bucket_for, format_size, parse_size
from .manifest import PACKAGE, EngineError, package_version
from .optional import optional_import
from .paths import ESCAPE_ERRORS, display_name
from .registry import BACKENDS
from .settings import (
    ARCHS,
    DEFAULT_AREA_SIDE,
    NORMALIZATIONS,
    PRECISIONS,
    VGG_BLOCKS,
    ExportSettings,
    add_export_arguments,
    comma_list,
    random_seed,
)

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
LOG_LEVELS = ["debug", "info", "warning"]
# Options every command also accepts after its name (`interactive index ... --log-level info`).
COMMON = argparse.ArgumentParser(add_help=False)
COMMON.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt: the same cleanup runs (finally
    blocks, decoding pools shut down, temporary files removed) before `main` returns 143."""


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 128 + signal.SIGTERM


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure a user can cause ends in one line on stderr
    (`interactive CMD: error: ...`) and its exit code, never a traceback (but with
    `--log-level debug`)."""
    _text_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    command = f"interactive {args.command}"
    check = getattr(args, "check", None)
    if check is not None:  # what the parser alone cannot see (e.g. --layers against the engine)
        try:
            check(args)
        except UsageError as err:
            args.command_parser.error(str(err))  # one line, exit 2
    signals = _SignalGuard()
    try:
        with signals:
            return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{command}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:  # `interactive buckets | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as err:
        if signals.terminated:  # e.g. a worker that the same SIGTERM killed first
            print(f"{command}: terminated", file=sys.stderr)
            return EXIT_TERMINATED
        print(f"{command}: error: {error_line(err)}", file=sys.stderr)
        if args.log_level == "debug":
            traceback.print_exc()
        return EXIT_FATAL


class UsageError(ValueError):
    """Bad usage found after parsing (a flag that contradicts another or the engine): exit 2."""


def configure_logging(level: str) -> None:
    """`--log-level` applies to interactive's own loggers only: third-party ones (PIL's TIFF tags,
    urllib3, matplotlib, fsspec...) stay at WARNING, so `--log-level debug` shows our messages."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger(PACKAGE).setLevel(level.upper())


class HelpFormatter(argparse.HelpFormatter):
    """`--help` shows each option's default (unless it is None, False, empty or already in the
    text), also for options without a help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _shows_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            action.help = "(default: %(default)s)"  # argparse prints no line without a text
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    hidden = default is None or default is False or default is argparse.SUPPRESS or default == []
    return bool(action.option_strings) and not hidden


def size_arg(text: str) -> str:
    """argparse `type=` for a WxH size: bad text is bad usage (exit 2); the text is kept."""
    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def size_list_arg(text: str) -> str:
    """argparse `type=` for WxH,WxH,...: each one checked, the text kept."""
    sizes = comma_list(text)
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected WxH,WxH..., got {text!r}")
    for size in sizes:
        size_arg(size)
    return text


def buckets_arg(text: str) -> str:
    """`--buckets` of export: 'common', 'all' or WxH,WxH,..."""
    if text.strip() in ("common", "all"):
        return text.strip()
    try:
        return size_list_arg(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"expected 'common', 'all' or WxH,WxH...: {err}") from None


def layer_names(arch: str | None = None) -> list[str]:
    """Every layer name of `arch` (of any architecture when None), in network order."""
    names: list[str] = []
    for a in [arch] if arch else list(ARCHS):
        for block, convs in enumerate(VGG_BLOCKS[a], start=1):
            for k in range(1, convs + 1):
                names.append(f"conv-{block}-{k}")
            names.append(f"pool-{block}")
        names += ["fc-6", "fc-7"]
    return list(dict.fromkeys(names))


def layers_arg(text: str) -> str:
    """argparse `type=` for --layers: names a VGG network has (the engine's own list is checked
    once it is loaded), no repeats; the text is kept."""
    names = comma_list(text)
    if not names:
        raise argparse.ArgumentTypeError("no layers given")
    unknown = [t for t in names if t not in layer_names()]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown layer{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(VGG layers are conv-B-K, pool-1..pool-5, fc-6, fc-7)"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"layers repeated in {text!r}")
    return text


def _check_export(args: argparse.Namespace) -> None:
    """The export settings' own checks (arch's layers, width_div, heatmaps with orig...)."""
    try:
        settings = ExportSettings.from_args(args)
        random_seed(settings.weights)
    except ValueError as err:
        raise UsageError(str(err)) from None
    unknown = [t for t in settings.layers if t not in layer_names(settings.arch)]
    if unknown:
        raise UsageError(f"--layers {', '.join(unknown)}: {settings.arch} has no such layer")


def _check_engine_layers(args: argparse.Namespace) -> None:
    """--layers of index and viz against the engine's manifest (an engine that cannot be read
    is left for the command itself to report: exit 1)."""
    if not args.layers:
        return
    from .manifest import EngineManifest

    try:
        available = EngineManifest.load(args.engine).layers
    except Exception:
        return
    unknown = [t for t in comma_list(args.layers) if t not in available]
    if unknown:
        raise UsageError(
            f"--layers {', '.join(unknown)}: not in this engine ({', '.join(available)})"
        )


# The errors that explain themselves: their message is the line. Anything else is unexpected
# and its line names its type.
_EXPECTED = (EngineError, ValueError, RuntimeError)


def error_line(err: BaseException) -> str:
    """One line for `err`: an OSError as `NAME: reason`, an expected error as its message,
    anything else as `Type: message` with a hint to rerun with `--log-level debug`."""
    try:
        return _error_line(err)
    except Exception:  # the last resort must not fail itself
        return ascii(f"{type(err).__name__}: {err!r}")


def _error_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        names = [display_name(os.fsdecode(n)) for n in (err.filename, err.filename2) if n]
        text = f"{' -> '.join(names)}: {err.strerror}" if names else err.strerror
    elif isinstance(err, (OSError, *_EXPECTED)):
        text = str(err) or type(err).__name__
    else:
        text = f"{type(err).__name__}: {err} (a bug? rerun with --log-level debug for details)"
    return " ".join(display_name(text).split())


def _text_streams() -> None:
    """Let stdout and stderr print any file name: a byte of a name that is not valid UTF-8
    comes out as `\\xNN` (as in the `path` column) rather than as a UnicodeEncodeError at the
    end of a long run."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a closed or exotic stream
                reconfigure(errors=ESCAPE_ERRORS)


class _SignalGuard:
    """While a command runs, SIGTERM raises Terminated in the main thread (once: a second SIGTERM
    during the cleanup is ignored, so the cleanup finishes); the old handler comes back after."""

    def __init__(self) -> None:
        self.terminated = False
        self._previous: Any = None

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if not self.terminated:
            self.terminated = True
            raise Terminated()


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type=`: an integer >= minimum; anything else is bad usage (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = _at_least(1)  # counts that must be at least 1
non_negative_int = _at_least(0)  # counts where 0 means "automatic"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interactive",
        description="InterActive deep features (Xie et al., CVPR 2016) with static ONNX engines.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--log-level", default="warning", choices=LOG_LEVELS,
        help="interactive's own messages (third-party libraries stay at warning)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_export(sub)
    _add_build(sub)
    _add_buckets(sub)
    _add_extract(sub)
    _add_index(sub)
    _add_viz(sub)
    _add_eval(sub)
    _add_knn(sub)
    _add_search(sub)
    _add_bench(sub)
    return parser


def progress_line(line: str) -> None:
    """Progress of long commands goes to stderr, unbuffered, so stdout stays the result."""
    print(line, file=sys.stderr, flush=True)


def _command(
    sub: argparse._SubParsersAction,
    handler: Callable[[argparse.Namespace], int],
    name: str,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand taking the common options, run by `handler(args) -> exit code`."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, parents=[COMMON], help=help, description=description, formatter_class=HelpFormatter
    )
    p.set_defaults(handler=handler, command_parser=p)
    return p


def _engine_options(p: argparse.ArgumentParser, output: str, batch_size: int = 0) -> None:
    """--engine and -o for every command that runs an engine; --backend/--batch-size if batched."""
    p.add_argument("--engine", required=True, type=Path, help="engine directory")
    p.add_argument("-o", "--output", required=True, type=Path, help=output)
    if batch_size:
        p.add_argument("--backend", default="auto", choices=BACKENDS, help="runtime backend")
        p.add_argument(
            "--batch-size", type=positive_int, default=batch_size, help="images per engine call"
        )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        _run_export,
        "export",
        help="export one ONNX graph per bucket into an engine directory (needs torch)",
        description="Export the analytic InterActive graph, one static ONNX graph per bucket, "
        "sharing one weights.bin. Every bucket is validated against the autograd reference.",
    )
    p.add_argument("--out", required=True, type=Path, help="engine directory (created/extended)")
    add_export_arguments(p)
    _retype(p, layers=layers_arg, fixed=size_arg, width_div=positive_int, area=positive_int)
    p.add_argument(
        "--buckets", default="common", type=buckets_arg, help="'common', 'all', or WxH,WxH,..."
    )
    p.add_argument("--no-validate", action="store_true", help="skip the reference check")
    p.set_defaults(check=_check_export)


def _retype(p: argparse.ArgumentParser, **types: Callable[[str], Any]) -> None:
    """Give flags added elsewhere (settings.add_export_arguments) a checking argparse type."""
    for action in p._actions:
        if action.dest in types:
            action.type = types[action.dest]


def _run_export(args: argparse.Namespace) -> int:
    exporter = optional_import(
        "interactive_features.export.exporter",
        "interactive export needs torch and onnx",
        "`pip install torch==2.13.0` (CPU) then `pip install 'interactive-features[export]'`",
    )
    request = exporter.ExportRequest(
        out=args.out,
        settings=ExportSettings.from_args(args),
        buckets=args.buckets,
        validate=not args.no_validate,
    )
    started = time.perf_counter()
    manifest = exporter.export_engine(request, log=progress_line)
    print(
        f"engine {manifest.directory}: {len(manifest.buckets)} buckets "
        f"({', '.join(format_size(b) for b in manifest.buckets)}) in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return EXIT_OK


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        _run_build,
        "build",
        help="build TensorRT plans from an engine directory's graphs (needs TensorRT and a GPU)",
        description="Build one weight-stripped TensorRT plan per bucket and precision beside the "
        "engine's graphs (refitted from weights.bin at load), and record the build facts in the "
        "manifest. Plans are tied to the GPU architecture and TensorRT version they were built "
        "with.",
    )
    p.add_argument("--engine", required=True, type=Path, help="engine directory")
    p.add_argument("--backend", required=True, choices=["tensorrt"], help="plan kind")
    p.add_argument("--precision", default="fp16", choices=PRECISIONS, help="plan precision")
    p.add_argument("--max-batch", type=positive_int, default=8, help="profile batch range 1..B")
    p.add_argument(
        "--buckets", type=size_list_arg, help="WxH,WxH (default: every bucket of the engine)"
    )
    p.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GB")
    p.add_argument("--lazy", action="store_true", help="build each plan on its first use instead")
    p.add_argument("--force", action="store_true", help="rebuild plans that exist")


def _run_build(args: argparse.Namespace) -> int:
    from interactive_features.engines.tensorrt_build import BuildSettings, build_plans

    settings = BuildSettings(
        precision=args.precision,
        max_batch=args.max_batch,
        workspace_gb=args.workspace,
        lazy=args.lazy,
        force=args.force,
    )
    buckets = [parse_size(b) for b in comma_list(args.buckets)] if args.buckets else None
    started = time.perf_counter()
    manifest = build_plans(args.engine, settings, buckets, log=progress_line)
    plans = manifest.data.get("tensorrt", {}).get("plans", {})
    built = sorted(b for b, by_precision in plans.items() if args.precision in by_precision)
    print(
        f"engine {manifest.directory}: {args.precision} plans for {len(built)} buckets "
        f"({', '.join(built) or 'none yet'}) in {time.perf_counter() - started:.0f} s"
    )
    return EXIT_OK


def _add_buckets(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        _run_buckets,
        "buckets",
        help="the bucket of each size, or the whole table",
        description="Print the bucket (W x H) of each given image size WxH, or the whole table.",
    )
    p.add_argument("sizes", nargs="*", type=size_arg, help="image sizes WxH", metavar="WxH")
    p.add_argument(
        "--area", type=_at_least(32), default=DEFAULT_AREA_SIDE, help="area as a square's side"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _run_buckets(args: argparse.Namespace) -> int:
    area = args.area * args.area
    if args.sizes:
        rows = {s: format_size(bucket_for(*parse_size(s), area=area)) for s in args.sizes}
        if args.json:
            print(json.dumps(rows))
        for size, bucket in rows.items():
            if not args.json:
                print(f"{size} -> {bucket}")
        return EXIT_OK
    table = all_buckets(area)
    if args.json:
        print(json.dumps([format_size(b) for b in table]))
        return EXIT_OK
    print(f"{len(table)} buckets at area {args.area}x{args.area} (W x H, aspect W/H):")
    for w, h in table:
        print(f"  {w:>5}x{h:<5} {w / h:5.2f}")
    return EXIT_OK


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        _run_extract,
        "extract",
        help="features of images into a Parquet file",
        description="Extract features of IMAGE files into one Parquet file: one row per image "
        "(path, width, height, bucket, one list column per layer, status), written as batches "
        "finish. -o is a .parquet file, or a directory (then DIR/features.parquet).",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    _engine_options(p, "output .parquet file, or a directory (DIR/features.parquet)", batch_size=8)
    for action in p._actions:  # a name that is not .parquet is bad usage (exit 2), before work
        if action.dest == "output":
            action.type = _extract_output
    p.add_argument(
        "--threads", type=non_negative_int, default=0, help="ONNX Runtime threads (0: all cores)"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


def _extract_output(text: str) -> str:
    from .extract import OutputNameError, extract_output

    try:
        extract_output(text)  # checked here (bad usage); extract_to_parquet resolves it
    except OutputNameError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text  # a str: Path would drop a trailing separator (-o DIR/)


def _run_extract(args: argparse.Namespace) -> int:
    from .extract import extract_to_parquet

    summary = extract_to_parquet(
        args.engine, [str(p) for p in args.images], args.output,
        backend=args.backend, batch_size=args.batch_size, threads=args.threads,
        progress=args.progress,
    )  # fmt: skip
    print(summary.line())
    for reason in summary.errors:
        print(f"  failed: {reason}", file=sys.stderr)
    return EXIT_PARTIAL if summary.errors else EXIT_OK


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        _run_index,
        "index",
        help="a whole collection into sharded Parquet, resumable",
        description="Index SOURCE (a directory tree, a text file of paths, a Parquet/CSV file "
        "with a path column, a WebDataset tar shard or a brace pattern of them like "
        "data-{000000..000009}.tar; any of these files as a URL: https://, s3://, gs://, hf://) "
        "into OUTDIR/part-NNNNN.parquet shards plus _manifest.json. The "
        "output always equals the current SOURCE: rerun the same command to resume after an "
        "interruption or to bring OUTDIR up to date after SOURCE changed (only new inputs are "
        "processed; rows of removed inputs are removed). One job per OUTDIR at a time.",
    )
    # str, not Path: Path would fold a URL's `//`
    p.add_argument("source", metavar="SOURCE")
    _engine_options(p, "output directory (OUTDIR)", batch_size=16)
    p.add_argument(
        "--workers", type=_at_least(0), default=max(1, (os.cpu_count() or 2) - 1),
        help="decoding processes (0: decode in the main process; default: the cores less one)",
    )  # fmt: skip
    p.add_argument("--shard-size", type=_at_least(1), default=1000, help="rows per new shard")
    p.add_argument(
        "--layers", type=layers_arg, help="comma-separated subset of the engine's layers"
    )
    p.add_argument("--normalize", default="none", choices=NORMALIZATIONS, help="each layer's rows")
    p.add_argument("--concat", action="store_true", help="one `features` column")
    p.add_argument("--path-column", default="path", help="for Parquet/CSV sources")
    p.add_argument(
        "--columns", type=comma_list, metavar="A,B|all",
        help="Parquet/CSV SOURCE: carry these columns (all: all but the path column) into the rows",
    )  # fmt: skip
    p.add_argument("--heatmaps", action="store_true", help="store small heatmaps (<= 32 px)")
    p.add_argument(
        "--content-hash", action="store_true",
        help="a sha256 column: the hash of each file's bytes (to find copies under other paths)",
    )  # fmt: skip
    p.add_argument(
        "--limit", type=_at_least(1),
        help="only the first N entries of SOURCE (the output then holds those only)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="read headers only; report buckets")
    p.add_argument("--overwrite", action="store_true", help="replace another job's output")
    p.add_argument(
        "--retry-failed", action="store_true",
        help="index again the inputs whose row failed (status not ok)",
    )  # fmt: skip
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="a progress bar (default: on a terminal; plain lines every 10 s otherwise)",
    )  # fmt: skip
    p.add_argument(
        "--ray", nargs="?", const="local", metavar="ADDRESS",
        help="run on Ray (pip install 'interactive-features[ray]'): no ADDRESS starts a local "
        "instance; "
        "'auto' joins this machine's cluster; 'ray://HOST:10001' goes through Ray Client",
    )  # fmt: skip
    p.add_argument("--actors", type=_at_least(1), default=1, help="with --ray: extraction actors")
    p.set_defaults(check=_check_engine_layers)


def _run_index(args: argparse.Namespace) -> int:
    from .index_sources import ColumnsError

    try:
        return _index(args)
    except ColumnsError as err:  # --columns against SOURCE: bad usage, exit 2
        args.command_parser.error(str(err))  # raises SystemExit(2)
        raise


def _index(args: argparse.Namespace) -> int:
    from .index import Executor, IndexOptions, dry_run, run_index

    options = IndexOptions(
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        layers=comma_list(args.layers) if args.layers else None,
        normalize=args.normalize,
        concat=args.concat,
        path_column=args.path_column,
        limit=args.limit,
        heatmaps=args.heatmaps,
        content_hash=args.content_hash,
        columns=args.columns,
    )
    if args.dry_run:
        plan = dry_run(args.source, args.engine, options)
        print(f"{plan['images']} images, {plan['unreadable']} unreadable headers")
        for bucket, n in plan["buckets"].items():
            flag = "  (missing)" if bucket in plan["missing"] else ""
            print(f"  {bucket:>9} {n:>8}{flag}")
        if plan["missing"]:
            print(f"the engine lacks {len(plan['missing'])} buckets; add them with:")
            print(f"  {plan['export_command']}")
        return EXIT_OK
    executor: Executor
    if args.ray is not None:
        from .ray_index import RayExecutor

        address = None if args.ray == "local" else args.ray
        executor = RayExecutor(address=address, actors=args.actors, backend=args.backend)
    else:
        from .index_local import LocalExecutor

        executor = LocalExecutor(workers=args.workers, backend=args.backend)
    report = run_index(
        args.source, args.engine, args.output, options, executor,
        overwrite=args.overwrite, retry_failed=args.retry_failed, progress=args.progress,
        say=progress_line,
    )  # fmt: skip
    print(
        f"{report.images} images in the output ({report.errors} errors); since the last run: "
        f"{report.changes()}; this run processed {report.processed} in {report.seconds:.1f} s "
        f"({report.images_per_second:.2f} images/s), wrote {report.written_shards} shards, "
        f"rewrote {report.rewritten_shards}, removed {report.removed_shards}, left "
        f"{report.skipped_shards} as they were; by bucket {dict(report.by_bucket)}; "
        f"output {args.output}"
    )
    return EXIT_PARTIAL if report.errors else EXIT_OK


# viz's defaults (runtime/viz.py holds the same; a test checks): written here so that building
# the parser does not import numpy and Pillow for every command.
VIZ_SCALES, VIZ_SCALE, VIZ_ALPHA, VIZ_COLORMAP = ("layer", "shared"), "layer", 0.55, "inferno"


def _add_viz(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        _run_viz,
        "viz",
        help="draw activeness heatmaps over an image (or each row of an index) into PNGs",
        description="Render gamma-hat (export/ALGORITHM.md section 5) over IMAGE for each layer, "
        "one panel per layer, with a header (file, bucket, config, weights, scale) and a "
        "colorbar; each map is drawn as blocks of its cells (nearest neighbour), its size and "
        "maximum in the panel's title. IMAGE needs --engine, exported with --heatmaps. With "
        "--index OUTDIR, -o is a directory and gets one PNG per ok row of the index, named "
        "NNNNN-ID-STEM.png (the row's position among the ok rows in shard order, its id "
        "column, the file's stem); the maps come from --engine when given (the image run "
        "again, full resolution), else from the index's heatmap columns (index --heatmaps, "
        "<= 32 px), else from the engine that made the index.",
    )
    p.add_argument("image", type=Path, nargs="?", metavar="IMAGE")
    p.add_argument("--index", type=Path, metavar="OUTDIR", help="an index's rows instead of IMAGE")
    p.add_argument("--engine", type=Path, help="engine directory (exported with --heatmaps)")
    p.add_argument(
        "-o", "--output", required=True, type=Path,
        help="output .png (IMAGE), or directory (--index)",
    )  # fmt: skip
    p.add_argument("--limit", type=_at_least(1), help="with --index: the first N ok rows only")
    p.add_argument(
        "--layers", type=layers_arg, help="comma-separated subset of the engine's layers"
    )
    p.add_argument(
        "--columns", type=non_negative_int, default=0, help="panels per row (0: automatic)"
    )
    p.add_argument("--panel-width", type=_at_least(16), default=256, help="pixels per panel")
    p.add_argument(
        "--scale", choices=VIZ_SCALES, default=VIZ_SCALE,
        help="layer: each panel's own maximum is its top colour; shared: one range over all "
        "panels of an image, so weak layers look weak (default: layer, because gamma-hat's size "
        "differs ~10^4 between layers, pool-5 against conv-3-3: one range leaves the conv "
        "panels black)",
    )  # fmt: skip
    p.add_argument(
        "--alpha", type=_unit_interval, default=VIZ_ALPHA,
        help="overlay opacity: 0 the photo alone, 1 the colours alone",
    )  # fmt: skip
    p.add_argument(
        "--colormap", type=_colormap_arg, default=VIZ_COLORMAP, metavar="NAME",
        help="inferno, viridis, gray (built in), or any other matplotlib colormap when "
        "matplotlib is installed; NAME_r reversed",
    )  # fmt: skip
    p.set_defaults(check=_check_viz)


def _number_in(low: float, high: float, closed: bool) -> Callable[[str], float]:
    """An argparse float type: a number in [low, high] (`closed`) or (low, high); NaN never."""
    interval = f"[{low:g}, {high:g}]" if closed else f"({low:g}, {high:g})"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number in {interval}, got {text!r}"
            ) from None
        inside = low <= value <= high if closed else low < value < high  # NaN fails both
        if not inside:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


_unit_interval = _number_in(0.0, 1.0, closed=True)  # --alpha
_fraction = _number_in(0.0, 1.0, closed=False)  # --test-fraction


def _checked_text(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: the text itself once `check(text)` has not raised ValueError, whose
    message becomes the usage error."""

    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return parse


def _colormap_arg(text: str) -> str:
    from .viz import colormap  # ColormapError is a ValueError

    return _checked_text(colormap)(text)


def _check_viz(args: argparse.Namespace) -> None:
    """IMAGE xor --index; IMAGE needs --engine; --limit goes with --index."""
    if (args.image is None) == (args.index is None):
        raise UsageError("give either IMAGE or --index OUTDIR (one of them)")
    if args.image is not None and args.engine is None:
        raise UsageError("IMAGE needs --engine DIR (an engine exported with --heatmaps)")
    if args.image is not None and args.limit is not None:
        raise UsageError("--limit goes with --index")
    if args.engine is not None:
        _check_engine_layers(args)
    elif args.layers:  # against the index's heatmap columns (an unreadable index: exit 1 later)
        from .viz import index_heatmap_layers

        try:
            stored = index_heatmap_layers(args.index)
        except Exception:
            return
        unknown = [t for t in comma_list(args.layers) if stored and t not in stored]
        if unknown:
            raise UsageError(
                f"--layers {', '.join(unknown)}: no heatmap column in {args.index} "
                f"({', '.join(stored)})"
            )


def _run_viz(args: argparse.Namespace) -> int:
    from .api import Extractor
    from .viz import Style, index_heatmap_layers, index_run, render_file, render_index

    layers = comma_list(args.layers) if args.layers else None
    style = Style(
        columns=args.columns, panel_width=args.panel_width, alpha=args.alpha,
        scale=args.scale, colormap=args.colormap,
    )  # fmt: skip
    if args.index is None:
        with Extractor.open(args.engine) as extractor:
            path = render_file(extractor, str(args.image), layers, args.output, style)
        print(f"wrote {path}")
        return EXIT_OK
    engine = args.engine
    if engine is None and not index_heatmap_layers(args.index):
        engine = index_run(args.index).get("engine", {}).get("directory")
    with contextlib.ExitStack() as stack:
        rerun = stack.enter_context(Extractor.open(engine)) if engine else None
        report = render_index(
            args.index, args.output, style, layers=layers, limit=args.limit,
            extractor=rerun, say=progress_line,
        )  # fmt: skip
    print(
        f"wrote {report.written} PNGs for {report.rows} rows of {args.index} into {args.output} "
        f"(maps from {report.source}); {len(report.failed)} failed"
    )
    return EXIT_PARTIAL if report.failed else EXIT_OK


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        _run_eval,
        "eval",
        help="classification accuracy (linear SVM) and retrieval mAP of indexes of one "
        "labelled collection, one row per engine",
        description="The paper's protocol on INDEX_DIRs of the same images (one per engine): a "
        "one-vs-rest linear SVM on each L2-normalised layer and on their concatenation, C chosen "
        "by cross-validation on the training images, accuracy on the test images; retrieval mAP "
        "of the test images querying the training images by cosine similarity on the "
        "concatenation. One split (keyed by path) for every engine, over the paths present in "
        "all of them.",
    )
    p.add_argument("index_dirs", nargs="+", metavar="INDEX_DIR", help="index OUTDIRs")
    p.add_argument(
        "--labels", required=True, metavar="folder|COLUMN",
        help="'folder': each image's parent folder name; else a column of the rows",
    )  # fmt: skip
    p.add_argument("--layers", type=layers_arg, help="comma-separated subset of the layers")
    p.add_argument(
        "--test-fraction", type=_fraction, default=0.3, help="per class, for the seeded split"
    )
    split = p.add_mutually_exclusive_group()
    split.add_argument("--seed", type=non_negative_int, default=0, help="fixes the split")
    split.add_argument(
        "--split", type=Path, metavar="SPLIT_FILE",
        help="CSV with path and split (train/test) columns, e.g. from --save-split",
    )  # fmt: skip
    p.add_argument("--save-split", type=Path, metavar="FILE", help="write the split used (CSV)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-o", "--output", type=Path, metavar="TABLE.csv", help="the table as CSV")
    p.set_defaults(check=_check_eval)


def _check_eval(args: argparse.Namespace) -> None:
    """Outputs that are directories, and --layers against each index's feature columns (an
    index that cannot be read is left for the command itself to report: exit 1), before the
    work."""
    for flag, path in (("-o", args.output), ("--save-split", args.save_split)):
        if path is not None and path.is_dir():
            raise UsageError(f"{flag} {path}: a directory (give a file name)")
    if not args.layers:
        return
    from .vectors import feature_columns

    for index in args.index_dirs:
        try:
            available = feature_columns(index)
        except Exception:
            continue
        unknown = [t for t in comma_list(args.layers) if t not in available]
        if unknown:
            raise UsageError(
                f"--layers {', '.join(unknown)}: not in {index} ({', '.join(available)})"
            )


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    report = evaluate(
        args.index_dirs, args.labels, layers=comma_list(args.layers) if args.layers else None,
        test_fraction=args.test_fraction, seed=args.seed, split=args.split,
    )  # fmt: skip
    if args.output:
        report.write_csv(args.output)
    if args.save_split:
        report.write_split(args.save_split)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.summary())
        print(report.format_table())
    if report.unlabelled:
        print(f"  {report.unlabelled} images without a label left out", file=sys.stderr)
    if report.unsplit:
        print(f"  {report.unsplit} labelled images not in {args.split} left out", file=sys.stderr)
    incomplete = False
    for engine in report.engines:
        if engine.missing or engine.failed:
            incomplete = True
            shown = ", ".join(engine.missing[:3]) + (", ..." if len(engine.missing) > 3 else "")
            print(
                f"  {engine.name}: {engine.failed} failed rows, {len(engine.missing)} labelled "
                f"images missing (left out of every row){': ' + shown if shown else ''}",
                file=sys.stderr,
            )
    return EXIT_PARTIAL if incomplete else EXIT_OK


# The index kinds of `interactive knn build` (runtime/knn.INDEX_KINDS; spelled here so that the
# parser does not import faiss's side of the package: a test keeps them equal).
KNN_INDEX_KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")


def _add_knn(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        _run_knn,
        "knn",
        help="a FAISS kNN index over an index OUTDIR (needs faiss)",
        description="Build a FAISS inner-product (cosine) index over the vectors of an index "
        "OUTDIR: each layer L2-normalised, side by side, the whole normalised.",
    )
    actions = p.add_subparsers(dest="knn_action", required=True, metavar="ACTION")
    b: argparse.ArgumentParser = actions.add_parser(
        "build", parents=[COMMON], formatter_class=HelpFormatter,
        help="build KNN_DIR from INDEX_DIR",
        description="Count INDEX_DIR's vectors from the Parquet footers, choose an index from "
        "their number, dimension and --memory (auto: exact below 10,000 vectors, else HNSW, IVF "
        "or IVF-PQ, whichever fits first), train it on a bounded sample, add the shards one by "
        "one (failed rows skipped and counted), and write KNN_DIR/knn.faiss, rows.parquet (faiss "
        "row -> id, path, shard) and knn.json.",
    )  # fmt: skip
    b.set_defaults(command_parser=b)
    b.add_argument(
        "index_dir", type=Path, metavar="INDEX_DIR", help="an `interactive index` OUTDIR"
    )
    b.add_argument("-o", "--output", required=True, type=Path, help="kNN directory (KNN_DIR)")
    b.add_argument(
        "--layers", type=layers_arg,
        help="columns a vector is made of (default: the --concat column, else every layer)",
    )  # fmt: skip
    b.add_argument("--index", default="auto", choices=KNN_INDEX_KINDS, help="index type")
    b.add_argument(
        "--memory", default="4G", type=_memory_arg,
        help="memory budget: the index, and at most half of it for the training sample",
    )  # fmt: skip
    b.add_argument("--overwrite", action="store_true", help="replace the index in KNN_DIR")
    b.set_defaults(check=_check_knn_layers)


def _memory_arg(text: str) -> str:
    from .knn import parse_memory

    return _checked_text(parse_memory)(text)


def _check_knn_layers(args: argparse.Namespace) -> None:
    """--layers against INDEX_DIR's feature columns (bad usage, exit 2); an INDEX_DIR that cannot
    be read is left for the command itself (exit 1)."""
    if not args.layers:
        return
    from .vectors import feature_columns

    try:
        available = feature_columns(args.index_dir)
    except Exception:
        return
    unknown = [t for t in comma_list(args.layers) if t not in available]
    if unknown:
        raise UsageError(
            f"--layers {', '.join(unknown)}: not a column of {args.index_dir} "
            f"({', '.join(available)})"
        )


def _run_knn(args: argparse.Namespace) -> int:
    from .knn import build_knn

    result = build_knn(
        args.index_dir, args.output, layers=comma_list(args.layers) if args.layers else None,
        index=args.index, memory=args.memory, overwrite=args.overwrite, say=progress_line,
    )  # fmt: skip
    print(result.line())
    return EXIT_OK


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        _run_search,
        "search",
        help="the nearest neighbours of images (or of indexed ids) in a kNN index",
        description="Search KNN_DIR (made by `interactive knn build`) with QUERY images, "
        "extracted with the engine the index was built from (or --engine DIR, which must be the "
        "same engine), or with --by-id, ids of rows already in the index. Prints query, rank, "
        "score (cosine), path and id per hit.",
    )
    p.add_argument("knn_dir", type=Path, metavar="KNN_DIR")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="image files (ids with --by-id)")
    p.add_argument("--engine", type=Path, help="engine directory (default: the recorded one)")
    p.add_argument("-k", type=positive_int, default=10, help="neighbours per query")
    p.add_argument("--json", action="store_true", help="one JSON object per hit")
    p.add_argument("--sheet", type=_png_arg, help="also draw a contact sheet PNG", metavar="PNG")
    p.add_argument("--by-id", action="store_true", help="QUERY are ids of indexed rows")


def _png_arg(text: str) -> Path:
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"expected a .png file name, got {text!r}")
    return Path(text)


def _run_search(args: argparse.Namespace) -> int:
    from .knn import KnnIndex
    from .search import json_lines, save_contact_sheet, table_lines

    with KnnIndex.open(args.knn_dir, engine=args.engine) as knn:
        if args.by_id:
            results = knn.search_ids(args.queries, args.k)
            images: list[object | None] = [knn.file_of(q) for q in args.queries]
        else:
            knn.extractor()  # the engine is checked before any image is read
            results = knn.search(args.queries, args.k)
            images = list(args.queries)
    for i in sorted(results.errors):
        print(f"interactive search: error: {error_line(ValueError(results.errors[i]))}",
              file=sys.stderr)  # fmt: skip
    if len(results.errors) == len(results):
        return EXIT_FATAL
    for line in json_lines(results) if args.json else table_lines(results):
        print(line)
    if args.sheet:
        print(f"wrote {save_contact_sheet(results, images, args.k, args.sheet)}", file=sys.stderr)
    return EXIT_PARTIAL if results.errors else EXIT_OK


def _add_bench(sub: argparse._SubParsersAction) -> None:
    # Every argument goes to the bench package's own parser (imported only when run, since it
    # needs torch): no '-' prefix here, so `--engine ...` is collected rather than parsed.
    p = sub.add_parser(
        "bench",
        add_help=False,
        prefix_chars="\0",
        help="latency, throughput and FLOP rate of every backend against the peers (needs torch)",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    harness = optional_import(
        "interactive_features.bench.harness",
        "interactive bench needs torch, captum and matplotlib",
        "`pip install 'interactive-features[export,bench]'`",
    )
    return int(harness.main(args.bench_args))


if __name__ == "__main__":
    sys.exit(main())
