"""`captioner` command line: caption, train, evaluate, serve."""
import csv
import dataclasses
import functools
import json
import logging
import re
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from .options import BACKENDS, DATA_FORMATS, DEFAULT_BACKEND, DecodeOptions, default_server_workers

log = logging.getLogger("captioner")
OUTPUT_FORMATS = ("jsonl", "csv", "txt")
CSV_COLUMNS = ["path", "caption", "score", "objects", "error"]
_DEFAULT = DecodeOptions()
_LIMITS = DecodeOptions.LIMITS


def decode_flags(*names):
    """Click options for the named DecodeOptions fields, defaults and limits read from
    DecodeOptions; the command receives them as one `decode` keyword (a DecodeOptions)."""
    flags = {
        "beam_size": click.option("--beam-size", default=_DEFAULT.beam_size, show_default=True,
                                  type=click.IntRange(*_LIMITS["beam_size"])),
        "n_best": click.option("--n-best", default=_DEFAULT.n_best, show_default=True,
                               type=click.IntRange(*_LIMITS["n_best"]),
                               help="Also list this many candidates per image (jsonl only shows them)."),
        "max_length": click.option("--max-length", default=_DEFAULT.max_length, show_default=True,
                                   type=click.IntRange(*_LIMITS["max_length"]), help="Words per caption."),
        "length_alpha": click.option("--length-alpha", default=_DEFAULT.length_alpha, show_default=True,
                                     type=click.FloatRange(*_LIMITS["length_alpha"]),
                                     help="Rank candidates by log-prob / length**alpha."),
        "grounding": click.option("--grounding/--no-grounding", default=_DEFAULT.grounding, show_default=True,
                                  help="Make the caption name the objects the encoder's classifier is sure of."),
        "concept_threshold": click.option("--concept-threshold", default=_DEFAULT.concept_threshold,
                                          show_default=True, type=click.FloatRange(*_LIMITS["concept_threshold"]),
                                          help="Probability at which a concept is reported as an object "
                                               "(and forced into the caption with grounding)."),
        "max_concepts": click.option("--max-concepts", default=_DEFAULT.max_concepts, show_default=True,
                                     type=click.IntRange(*_LIMITS["max_concepts"]),
                                     help="At most this many objects forced into one caption."),
    }

    def decorate(command):
        @functools.wraps(command)  # keeps the click parameters declared below this decorator
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            try:
                kwargs["decode"] = DecodeOptions(**values)
            except ValueError as e:
                raise click.UsageError(str(e))
            return command(**kwargs)
        for name in reversed(names):
            wrapper = flags[name](wrapper)
        return wrapper
    return decorate


backend_flag = click.option(
    "--backend", default=DEFAULT_BACKEND, show_default=True, type=click.Choice(BACKENDS),
    help="How the encoder runs: auto picks the fastest backend that captions as well as torch fp32 here.")


def _check_device(ctx, param, value):
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r} is not auto, cpu, cuda or cuda:N")
    return value


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)


@click.group()
@click.version_option(package_name="captioner")
def main():
    """Caption images with a CNN + LSTM model (Show and Tell)."""


# Exit statuses of `captioner caption` (README "Command line").
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_OUTPUT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
TXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_TXT_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}
_TXT_ESCAPED = re.compile(r"\\[\\tnr]")


def csv_cell(value):
    """A CSV cell a spreadsheet shows as text: a leading formula character gets a ' before it."""
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


class RecordWriter:
    """Writes one record per input file as soon as it is known (nothing is lost if a long
    run is interrupted). `header=False` when appending to a CSV that has one.

    Paths are written so that every line stays one record: JSONL escapes what JSON must
    (and writes a file name that is not UTF-8 as \\udcXX escapes, as Python's os.fsdecode
    reads it); txt escapes backslash, tab, CR and LF as \\\\ \\t \\r \\n; csv quotes
    as CSV does and prefixes a cell that starts with = + - @ tab or CR with '. In csv and
    txt a name that is not UTF-8 keeps its original bytes (the stream is opened with
    errors="surrogateescape")."""

    def __init__(self, stream, fmt, header=True):
        self.stream, self.fmt = stream, fmt
        if fmt == "csv":
            self.csv = csv.writer(stream)
            if header:
                self.csv.writerow(CSV_COLUMNS)

    def write(self, record):
        if self.fmt == "jsonl":
            line = json.dumps(record, ensure_ascii=False)
            if not line.isascii() and not _utf8_clean(line):  # a file name that is not UTF-8
                line = json.dumps(record)
            self.stream.write(line + "\n")
        elif self.fmt == "csv":
            objects = "; ".join(f"{o['word']} ({o['label']}) {o['p']:.2f}" for o in record.get("objects", []))
            self.csv.writerow([csv_cell(record["path"]), csv_cell(record.get("caption", "")),
                               record.get("score", ""), csv_cell(objects), csv_cell(record.get("error", ""))])
        else:
            text = record["caption"] if "caption" in record else f"ERROR: {record['error']}"
            self.stream.write(f"{record['path'].translate(TXT_ESCAPES)}\t{text.translate(TXT_ESCAPES)}\n")
        self.stream.flush()


def _utf8_clean(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def recorded_paths(output, fmt):
    """The paths an earlier run already wrote to `output` (for --resume). A last line cut
    short by a crash is removed, so that appending starts on a fresh line."""
    with open(output, "rb+") as f:
        data = f.read()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("%s: removing an incomplete last line (%d bytes) left by an interrupted run", output,
                        len(data) - complete)
            f.truncate(complete)
            data = data[:complete]
    lines = data.decode("utf-8", errors="surrogateescape").splitlines()
    if fmt == "jsonl":
        done = set()
        for n, line in enumerate(lines, 1):
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise click.ClickException(f"--resume: {output} line {n} is not a caption record; "
                                           "is it the output of this command?") from None
        return done
    if fmt == "csv":
        rows = list(csv.reader(lines))
        if rows and rows[0] != CSV_COLUMNS:
            raise click.ClickException(f"--resume: {output} does not start with the header {','.join(CSV_COLUMNS)}")
        # a path cell neutralised against formulas (csv_cell) is read back without its '
        return {row[0][1:] if row[0][:1] == "'" and row[0][1:2] in FORMULA_START else row[0] for row in rows[1:] if row}
    return {_TXT_ESCAPED.sub(lambda m: _TXT_UNESCAPE[m.group()], line.split("\t", 1)[0]) for line in lines}


def read_file_list(stream):
    """Paths (or URIs) from --files-from: one a line, blank lines skipped."""
    return [line.rstrip("\r\n") for line in stream if line.strip()]


@main.command()
@click.argument("paths", nargs=-1)  # strings: with --engine ray they may be URIs (s3://...)
@click.option("--files-from", type=click.File("r", encoding="utf-8", errors="surrogateescape"),
              help="Also caption the paths listed in this file, one a line ('-' for standard input).")
@click.option("--recursive", "-r", is_flag=True, help="Also caption images in sub-folders.")
@click.option("--output", "-o",
              help="Write records to this file instead of standard output (with --engine ray: a folder or URI).")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS + ("parquet",)),
              help="Record format (default: from --output's extension, else jsonl; parquet only with --engine ray).")
@click.option("--resume", is_flag=True,
              help="Append to --output and skip every path it already records (after a crash or Ctrl-C).")
@decode_flags("beam_size", "n_best", "max_length", "length_alpha", "grounding", "concept_threshold", "max_concepts")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 1024))
@click.option("--workers", default=None, type=click.IntRange(0, 64),
              help="Image-decoding worker processes (default: half the cores, up to 4).")
@click.option("--device", default="auto", show_default=True, callback=_check_device,
              help="auto, cpu, cuda or cuda:N.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path),
              help="Checkpoint to use (default: the shipped weights/).")
@backend_flag
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: this process; ray: Ray Data, on a local Ray instance or a cluster (--address).")
@click.option("--actors", default=1, show_default=True, type=click.IntRange(1),
              help="Ray engine: model replicas (each loads the model once).")
@click.option("--gpus-per-actor", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Ray engine: GPUs each model replica reserves (0: CPU).")
@click.option("--address", default=None, help="Ray engine: a running cluster to join ('auto', or ray://host:10001).")
def caption(paths, files_from, recursive, output, fmt, resume, decode, batch_size, workers, device, weights, backend,
            engine, actors, gpus_per_actor, address):
    """Caption image files and folders. One record per file: {"path", "caption", "score",
    "objects"} or {"path", "error"}. Exit status 0 if every file was captioned, 1 if some
    failed."""
    listed = read_file_list(files_from) if files_from else []
    if not paths and not files_from:
        raise click.UsageError("give image files or folders, or --files-from LIST")
    missing = [p for p in paths if not Path(p).exists() and not (engine == "ray" and "://" in p)]
    if missing:
        raise click.UsageError(f"path {missing[0]!r} does not exist")
    if resume and not output:
        raise click.UsageError("--resume needs --output (the file or folder to continue)")
    if engine == "ray":
        from .cluster import caption_with_ray

        if not output:
            raise click.UsageError("--engine ray writes sharded files: give an --output folder")
        _setup_logging()
        try:
            summary = caption_with_ray([*paths, *listed], output, fmt or "jsonl", decode,
                                       recursive=recursive, resume=resume, weights=weights, backend=backend,
                                       batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor,
                                       address=address)
        except OSError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(EXIT_OUTPUT_ERROR)
        except ValueError as e:
            raise click.ClickException(str(e))
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted; the shards written so far stay in {output}: continue with the same "
                       "command and --resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        click.echo(f"{summary['captioned']} captioned, {summary['failed']} failed, {summary['skipped']} already "
                   f"done; records in {output}", err=True)
        sys.exit(1 if summary["failed"] else 0)
    _caption_locally([Path(p) for p in paths], [Path(p) for p in listed], recursive, Path(output) if output else None,
                     fmt, resume, decode, batch_size, workers, device, weights, backend)


def _caption_locally(paths, listed, recursive, output, fmt, resume, decode, batch_size, workers, device, weights,
                     backend):
    from tqdm import tqdm

    from .checkpoint import CheckpointError
    from .images import IMAGE_EXTENSIONS, find_images
    from .inference import file_captioner

    _setup_logging()
    if fmt is None:
        suffix = output.suffix.lower().lstrip(".") if output else ""
        fmt = suffix if suffix in OUTPUT_FORMATS else "jsonl"
    if fmt == "parquet":
        raise click.UsageError("--format parquet is for --engine ray (sharded output); use jsonl or csv here")
    if output and output.is_dir():
        raise click.UsageError(f"--output {output} is a folder; give a file")
    if output and output.suffix.lower() in IMAGE_EXTENSIONS:
        raise click.UsageError(f"--output {output} has an image's extension; records go to a .jsonl, .csv or "
                               ".txt file (refused so that a photo is never overwritten)")
    files = find_images(paths, recursive) + [f for p in listed for f in
                                             (find_images([p], recursive) if p.is_dir() else [p])]
    if not files:
        raise click.UsageError("no image files found (extensions: jpg jpeg png gif bmp webp tif tiff; "
                               "use --recursive for sub-folders)")
    if output and output.exists() and output.resolve() in {f.resolve() for f in files if f.exists()}:
        raise click.UsageError(f"--output {output} is one of the input files")
    append = bool(resume and output.is_file() and output.stat().st_size)
    if append:
        done = recorded_paths(output, fmt)
        total = len(files)
        files = [f for f in files if str(f) not in done]
        click.echo(f"--resume: {total - len(files)} of {total} files already in {output}; "
                   f"captioning the other {len(files)}", err=True)
    try:
        captioner = file_captioner(weights, device=device, backend=backend)
    except (CheckpointError, ValueError, OSError) as e:
        raise click.ClickException(str(e))
    try:
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
            stream = open(output, "a" if append else "w", newline="", encoding="utf-8", errors="surrogateescape")
        else:
            if hasattr(sys.stdout, "reconfigure"):
                sys.stdout.reconfigure(errors="surrogateescape")
            stream = sys.stdout
    except OSError as e:
        click.echo(f"Error: cannot write {output}: {e.strerror or e}", err=True)
        sys.exit(EXIT_OUTPUT_ERROR)
    writer = RecordWriter(stream, fmt, header=not append)
    failures = done = 0
    try:
        with tqdm(total=len(files), desc="captioning", unit="img", file=sys.stderr) as bar:
            for i, result, error in captioner.caption_files(files, decode, batch_size, workers):
                if error is not None:
                    failures += 1
                    writer.write({"path": str(files[i]), "error": error})
                else:
                    record = {"path": str(files[i]), "caption": result["caption"], "score": result["score"],
                              "objects": result["objects"]}
                    if decode.n_best > 1 and fmt == "jsonl":
                        record["alternatives"] = result["alternatives"]
                    writer.write(record)
                done += 1
                bar.update()
    except KeyboardInterrupt:
        _close_quietly(stream, output)
        click.echo(f"\ninterrupted after {done} of {len(files)} files"
                   + ("; continue with the same command and --resume" if output else ""), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as e:  # a full disk, a vanished output folder: say so, no traceback
        _close_quietly(stream, output)
        click.echo(f"Error: writing {output or 'standard output'} failed after {done} records: "
                   f"{e.strerror or e}", err=True)
        sys.exit(EXIT_OUTPUT_ERROR)
    if output:
        try:
            stream.close()
        except OSError as e:
            click.echo(f"Error: writing {output} failed: {e.strerror or e}", err=True)
            sys.exit(EXIT_OUTPUT_ERROR)
    if failures:
        click.echo(f"{failures} of {len(files)} files could not be captioned", err=True)
    sys.exit(EXIT_SOME_FAILED if failures else EXIT_OK)


def _close_quietly(stream, output):
    if output:
        try:
            stream.close()
        except OSError:
            pass


def train_flags(command):
    """Click options for every TrainConfig field, their defaults, limits, choices and help
    read from TrainConfig (the validation decoding fields come from decode_flags). The
    command receives `values` (a dict for TrainConfig) and `given` (the settings set on the
    command line, which --resume takes over the run's stored ones)."""
    from .options import TrainConfig

    config_fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "decode"]
    decode_names = ("beam_size", "length_alpha", "grounding", "concept_threshold", "max_concepts")

    @functools.wraps(command)
    def wrapper(**kwargs):
        ctx = click.get_current_context()
        given = {name for name in ctx.params
                 if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
        if given & set(decode_names):  # the decoding flags make `decode`
            given.add("decode")
        values = {f.name: kwargs.pop(f.name) for f in config_fields}
        values["decode"] = kwargs.pop("decode")
        return command(values=values, given=given, **kwargs)

    wrapper = decode_flags(*decode_names)(wrapper)  # builds `decode` before `wrapper` runs
    for f in reversed(config_fields):
        wrapper = _config_option(f)(wrapper)
    return wrapper


def _config_option(f):
    """The click option of one TrainConfig field."""
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        return click.option(flag, is_flag=True, default=default, show_default="/" in flag,
                            help=meta["help"])
    low, high = meta["limits"] or (None, None)
    low_open, high_open = meta["open_limits"]
    if meta["path"]:
        ctype = click.Path(exists=True, file_okay=meta["path"] != "dir", dir_okay=meta["path"] != "file",
                           path_type=Path)
    elif meta["choices"]:
        ctype = click.Choice(meta["choices"])
    elif kind == "int":
        ctype = click.IntRange(low, high, min_open=low_open, max_open=high_open) if meta["limits"] else int
    elif kind == "float":
        ctype = click.FloatRange(low, high, min_open=low_open, max_open=high_open) if meta["limits"] else float
    else:
        ctype = click.Path(file_okay=False, path_type=Path) if f.name in ("out", "cache_dir") else str
    if kind == "tuple":
        return click.option(flag, multiple=True, type=ctype, help=meta["help"])
    return click.option(flag, type=ctype, default=default, show_default=default is not None,
                        required=f.name in ("data", "out"), help=meta["help"],
                        callback=_check_device if f.name == "device" else None)


@main.command()
@train_flags
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
def train(values, given, resume):
    """Train a captioner; the best checkpoint is OUT/best.safetensors. Validation captions
    are decoded with the --beam-size and grounding options that users will get. On several
    GPUs: torchrun --nproc_per_node N -m captioner train ... (the same flags)."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .options import TrainConfig
    from .train import resume_config
    from .train import train as run_training

    _setup_logging()
    out = values["out"]
    try:
        config = resume_config(out, values, given) if resume else TrainConfig(**values)
        summary = run_training(config, resume=resume)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; every finished epoch is saved in {out}: continue with the same command "
                   "and --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if summary.get("main", True):  # under torchrun, process 0 speaks for all
        click.echo(f"best val {summary['metric']} {summary['best']:.4f}; model: {Path(out) / 'best.safetensors'}")


@main.command()
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path),
              help="Checkpoint to score (default: the shipped weights/).")
@click.option("--run", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A training run folder: its best checkpoint, on the data, layout and split it trained with "
                   "(--data and the rest may be left out).")
@click.option("--data", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(DATA_FORMATS))
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "dev", "test", "all"]),
              help="Which images to score; all = every image of the data (a set kept for evaluation).")
@decode_flags("beam_size", "max_length", "length_alpha", "grounding", "concept_threshold", "max_concepts")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True, callback=_check_device,
              help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=None, type=click.IntRange(0, 64))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file for the scores and every caption (default: scores-SPLIT.json beside "
                   "--checkpoint, or in the current folder for the shipped weights).")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Splits by image file name: a Karpathy json (dataset_coco.json) or a list of validation images.")
@backend_flag
def evaluate(checkpoint, run, data, fmt, images, split, decode, batch_size, device, workers, output,
             val_fraction, split_file, backend):
    """Score a checkpoint with the coco-caption metrics on one split of a dataset."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .evaluate import evaluate_checkpoint
    from .inference import DEFAULT_WEIGHTS

    _setup_logging()
    if run:
        from .train import stored_config

        settings = stored_config(run)
        if settings is None:
            raise click.UsageError(f"--run {run}: no training run there (no train_state.pt)")
        checkpoint = checkpoint or run / "best.safetensors"
        source = click.get_current_context().get_parameter_source
        data = data or Path(settings.data)
        if source("fmt") == ParameterSource.DEFAULT:
            fmt = settings.format
        images = images or (Path(settings.images) if settings.images else None)
        if source("val_fraction") == ParameterSource.DEFAULT:
            val_fraction = settings.val_fraction
        split_file = split_file or (Path(settings.split_file) if settings.split_file else None)
    if data is None:
        raise click.UsageError("give --data (or --run, a training run folder)")
    if output is None:  # beside a run's checkpoint; for the shipped weights, here (not in weights/)
        output = (checkpoint.parent if checkpoint else Path(".")) / f"scores-{split}.json"
    checkpoint = checkpoint or DEFAULT_WEIGHTS
    try:
        report = evaluate_checkpoint(checkpoint, data, split, fmt=fmt, images=images, decode=decode,
                                     batch_size=batch_size, device=device,
                                     num_workers=workers, val_fraction=val_fraction,
                                     backend=backend, split_file=split_file)
    except (CheckpointError, DataError, ValueError) as e:
        raise click.ClickException(str(e))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    click.echo(f"{report['images']} images, split {split}, backend {report['backend']}, beam {decode.beam_size}, "
               f"grounding {'on' if decode.grounding else 'off'}, tokenizer {report['scores']['tokenizer']}")
    if report["scores"]["tokenizer"] != "ptb":
        click.echo("note: Java not found, so METEOR is missing and the PTB tokenizer was replaced by a "
                   "simple one; install a Java runtime (make java) for the standard scores", err=True)
    for name, value in report["scores"].items():
        if name != "tokenizer":
            click.echo(f"{name:8s} {value:.4f}")
    click.echo(f"captions and scores written to {output}")


@main.command()
@click.option("--weights", type=click.Path(exists=True, path_type=Path),
              help="Checkpoint whose encoder to export (default: the shipped weights/).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="ONNX file to write.")
@click.option("--int8", is_flag=True, help="Quantise to int8 (static, per-channel), calibrated on real photos.")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of photos for int8 calibration (default: the bundled examples/).")
def export(weights, out, int8, calibration):
    """Export a checkpoint's encoder to ONNX, for deploying it elsewhere: input `pixels`
    (B, 3, 224, 224), preprocessed as captioner.images.preprocess does; output `features`
    (B, 1280), the pooled vector the decoder starts from."""
    import tempfile

    from .backends import export_onnx, quantize_int8
    from .checkpoint import CheckpointError, load_model
    from .inference import DEFAULT_WEIGHTS

    _setup_logging()
    try:
        model, _, _ = load_model(weights or DEFAULT_WEIGHTS)
        out.parent.mkdir(parents=True, exist_ok=True)
        if int8:
            with tempfile.TemporaryDirectory() as tmp:
                quantize_int8(export_onnx(model.encoder, Path(tmp) / "fp32.onnx"), out, calibration)
        else:
            export_onnx(model.encoder, out)
    except (CheckpointError, ValueError, OSError) as e:
        raise click.ClickException(str(e))
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {'int8' if int8 else 'fp32'})")


@main.group()
def cache():
    """The image-feature store of `captioner train` (in --cache-dir)."""


_cache_dir_flag = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                               help="The cache folder (default: ~/.cache/captioner or $CAPTIONER_CACHE).")


@cache.command("prune")
@_cache_dir_flag
def cache_prune(cache_dir):
    """Drop features of changed or deleted images, old cache formats and other encoder
    versions, and compact each store's shards. Safe while training runs."""
    from .backends import DEFAULT_CACHE_DIR
    from .features import prune_store

    _setup_logging()
    s = prune_store(cache_dir or DEFAULT_CACHE_DIR)
    click.echo(f"{s['stores']} store(s): kept {s['kept']} features and {s['failed_kept']} known-unreadable images, "
               f"dropped {s['dropped']}; shards {s['shards_before']} -> {s['shards_after']}; "
               f"removed {len(s['removed'])} old cache(s); freed {s['bytes_freed'] / 1e6:.1f} MB")


@cache.command("info")
@_cache_dir_flag
def cache_info(cache_dir):
    """List the feature stores: entries, shards and size of each."""
    from .backends import DEFAULT_CACHE_DIR
    from .features import store_info

    rows = store_info(cache_dir or DEFAULT_CACHE_DIR)
    if not rows:
        click.echo(f"no feature stores in {cache_dir or DEFAULT_CACHE_DIR}")
    for r in rows:
        entries = "?" if r["entries"] is None else f"{r['entries']} features, {r['failed']} unreadable"
        click.echo(f"{r['version']}/{r['store']}  {r['root']}  {entries}, {r['shards']} shard(s), "
                   f"{r['bytes'] / 1e6:.1f} MB")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="gunicorn worker processes (default: one per core, up to 4); each loads the model "
                   "and gets cores/workers threads.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path),
              help="Checkpoint to serve (default: the shipped weights/).")
@click.option("--device", default="auto", show_default=True, callback=_check_device,
              help="auto, cpu, cuda or cuda:N.")
@backend_flag
def serve(host, port, workers, weights, device, backend):
    """Serve the HTTP API and upload page with gunicorn (server/gunicorn.conf.py)."""
    import os

    import server

    conf = Path(server.__file__).resolve().parent / "gunicorn.conf.py"
    workers = workers or default_server_workers()
    env = {**os.environ, "CAPTIONER_DEVICE": device, "CAPTIONER_WORKERS": str(workers),
           "CAPTIONER_BACKEND": backend}
    if weights:
        env["CAPTIONER_WEIGHTS"] = str(weights.resolve())
    argv = [sys.executable, "-m", "gunicorn", "-c", str(conf), "--bind", f"{host}:{port}",
            "--workers", str(workers), "server.wsgi:app"]
    click.echo(f"serving on http://{host}:{port}/ with {workers} worker(s)", err=True)
    os.execve(sys.executable, argv, env)  # gunicorn takes over this process and its signals
