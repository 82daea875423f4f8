"""`captioner` command line: caption, train, evaluate, export, cache and serve.

Each command checks its arguments, calls the library and turns its errors into messages
and exit statuses. The flags of the settings dataclasses (DecodeOptions, TrainConfig,
EvalConfig in options.py) are generated from their fields, one flag per field; the record
formats that `caption` writes are in records.py.
"""
import dataclasses
import functools
import json
import logging
import re
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from .machine import default_server_workers
from .options import (BACKENDS, DEFAULT_BACKEND, DEFAULT_DEVICE, WORKERS_LIMITS, CalibrateConfig, DecodeOptions,
                      EvalConfig, TrainConfig)
from .records import OUTPUT_FORMATS, RecordError, RecordWriter, caption_record, recorded_paths, sentence_case

# Exit statuses of `captioner caption` (docs/cli.md).
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_OUTPUT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# The settings of a training run that `evaluate --run` reuses where no flag sets them.
RUN_DATA_SETTINGS = ("data", "format", "images", "val_fraction", "split_file")


def _check_device(ctx, param, value):
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r} is not auto, cpu, cuda or cuda:N")
    return value


# Flags that several commands share, declared once.
def device_flag(help="auto, cpu, cuda or cuda:N."):
    return click.option("--device", default=DEFAULT_DEVICE, show_default=True, callback=_check_device, help=help)


def weights_flag(help):
    return click.option("--weights", type=click.Path(exists=True, path_type=Path), help=help)


def workers_flag(help="Image-decoding worker processes (default: half the cores, up to 4)."):
    return click.option("--workers", default=None, type=click.IntRange(*WORKERS_LIMITS), help=help)


backend_flag = click.option(
    "--backend", default=DEFAULT_BACKEND, show_default=True, type=click.Choice(BACKENDS),
    help="How the encoder runs: auto picks the fastest backend that captions as well as torch fp32 here.")
# Settings fields whose flag is one of the shared ones (with the field's help).
SHARED_FLAGS = {"device": device_flag, "workers": workers_flag}


def field_option(f):
    """The click option of one settings field, from its metadata (options.setting)."""
    meta = f.metadata
    if f.name in SHARED_FLAGS:
        return SHARED_FLAGS[f.name](help=meta["help"])
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        return click.option(flag, is_flag=True, default=default, show_default="/" in flag, help=meta["help"])
    if kind == "tuple":
        return click.option(flag, multiple=True, type=_click_type(meta, kind), help=meta["help"])
    return click.option(flag, type=_click_type(meta, kind), default=default, show_default=default is not None,
                        required=meta["required"], help=meta["help"])


def _click_type(meta, kind):
    if meta["path"] == "out":
        return click.Path(file_okay=False, path_type=Path)
    if meta["path"]:
        return click.Path(exists=True, file_okay=meta["path"] != "dir", dir_okay=meta["path"] != "file",
                          path_type=Path)
    if meta["choices"]:
        return click.Choice(meta["choices"])
    low, high = meta["limits"] or (None, None)
    low_open, high_open = meta["open_limits"]
    if kind == "int":
        return click.IntRange(low, high, min_open=low_open, max_open=high_open) if meta["limits"] else int
    if kind == "float":
        return click.FloatRange(low, high, min_open=low_open, max_open=high_open) if meta["limits"] else float
    return str


def _field_flags(cls, names, collect):
    """Decorator: a click option for each of the fields `names` of the settings dataclass
    `cls`; the command receives, in their place, the keyword arguments `collect(values)`
    returns ({name: value})."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}

    def decorate(command):
        @functools.wraps(command)  # keeps the click parameters declared below this decorator
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, **collect(values))
        for name in reversed(names):
            wrapper = field_option(by_name[name])(wrapper)
        return wrapper
    return decorate


def decode_flags(exclude=()):
    """Flags for the DecodeOptions fields but `exclude`; the command receives them as one
    `decode` (a DecodeOptions; values it refuses are a usage error)."""
    def collect(values):
        try:
            return {"decode": DecodeOptions(**values)}
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    return _field_flags(DecodeOptions, [f.name for f in dataclasses.fields(DecodeOptions) if f.name not in exclude],
                        collect)


def config_flags(cls):
    """Flags for the fields of `cls` (TrainConfig, EvalConfig) but `decode` (decode_flags).
    The command receives `values` (a dict for `cls`) and `given` (the names of the
    parameters set on the command line, which take over a run's stored settings)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name != "decode"]
    return _field_flags(cls, names, lambda values: {"values": values, "given": _given_parameters()})


def _given_parameters():
    ctx = click.get_current_context()
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}


def gather(name, *params):
    """Decorator: the command receives the click parameters `params` as one dict `name`."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(**kwargs):
            group = {p: kwargs.pop(p) for p in params}
            return command(**kwargs, **{name: group})
        return wrapper
    return decorate


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)


@click.group()
@click.version_option(package_name="captioner")
def main():
    """Caption images with a CNN + LSTM model (Show and Tell)."""


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
@decode_flags()
@click.option("--min-confidence", type=click.FloatRange(0, 1),
              help="Withhold captions whose confidence is under this: their record gets \"caption\": null and "
                   "\"low_confidence\": true (txt: [low confidence]), for a person to write.")
@click.option("--sentence-case", is_flag=True,
              help="Write captions as sentences, as alt text is: \"A cat is sitting on the floor.\"")
@click.option("--write-xmp", is_flag=True,
              help="Also write each caption to the photo's XMP sidecar (photo.jpg.xmp) as dc:description, "
                   "keeping the sidecar's other fields.")
@click.option("--write-xmp-embedded", is_flag=True,
              help="Also write each caption into the JPEG's own XMP (dc:description); rewrites the file, "
                   "keeping every other byte. JPEG only.")
@click.option("--attention-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write, for each photo, a PNG of what the model looked at for each caption word (attention "
                   "models; implies --attention), into this folder.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 1024))
@workers_flag()
@device_flag()
@weights_flag("Checkpoint to use (default: the shipped weights/).")
@backend_flag
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: this process; ray: Ray Data, on a local Ray instance or a cluster (--address).")
@click.option("--actors", default=1, show_default=True, type=click.IntRange(1),
              help="Ray engine: model replicas (each loads the model once).")
@click.option("--gpus-per-actor", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Ray engine: GPUs each model replica reserves (0: CPU).")
@click.option("--address", default=None, help="Ray engine: a running cluster to join ('auto', or ray://host:10001).")
@gather("model", "weights", "device", "backend")  # inference.file_captioner's arguments
@gather("ray", "actors", "gpus_per_actor", "address")  # the Ray engine's
@gather("archive", "sentence_case", "write_xmp", "write_xmp_embedded", "attention_dir")  # done to each record
def caption(paths, files_from, recursive, output, fmt, resume, decode, min_confidence, batch_size, workers, model,
            engine, ray, archive):
    """Caption image files, folders and http(s) URLs. One record per file: {"path", "caption",
    "score", "confidence", "objects"} or {"path", "error"}. Exit status 0 if every file was
    captioned, 1 if some failed."""
    from .images import is_url

    listed = read_file_list(files_from) if files_from else []
    if not paths and not files_from:
        raise click.UsageError("give image files or folders, or --files-from LIST")
    missing = [p for p in paths if not Path(p).exists() and not is_url(p) and not (engine == "ray" and "://" in p)]
    if missing:
        raise click.UsageError(f"path {missing[0]!r} does not exist")
    _check_archive_flags(archive, engine, [p for p in [*paths, *listed] if is_url(p)])
    if archive["attention_dir"]:
        decode = decode.replace(attention=True)
    if decode.attention and engine == "ray":
        raise click.UsageError("--attention and --attention-dir: only with the local engine")
    if resume and not output:
        raise click.UsageError("--resume needs --output (the file or folder to continue)")
    if min_confidence is not None:
        _check_calibrated(model["weights"])
    if engine == "ray":
        _caption_on_ray([*paths, *listed], recursive, output, fmt or "jsonl", resume, decode, min_confidence,
                        batch_size, model, ray)
    else:
        _caption_locally([*paths, *listed], recursive, Path(output) if output else None, fmt, resume, decode,
                         min_confidence, batch_size, workers, model, archive)


def _check_archive_flags(archive, engine, urls):
    """--sentence-case and --write-xmp(-embedded) are for the local engine, and XMP for local files."""
    given = [flag for flag, name in (("--sentence-case", "sentence_case"), ("--write-xmp", "write_xmp"),
                                     ("--write-xmp-embedded", "write_xmp_embedded")) if archive[name]]
    if given and engine == "ray":
        raise click.UsageError(f"{given[0]}: only with the local engine")
    if urls and (archive["write_xmp"] or archive["write_xmp_embedded"]):
        raise click.UsageError(f"--write-xmp: {urls[0]} is a URL; XMP is written beside or into local files")


def _check_calibrated(weights):
    """--min-confidence needs a model whose captions have a confidence."""
    from .checkpoint import CheckpointError, read_checkpoint
    from .inference import DEFAULT_WEIGHTS

    try:
        tensors, info = read_checkpoint(weights or DEFAULT_WEIGHTS)[3:]
    except CheckpointError as e:
        raise click.ClickException(str(e))
    if "calibration.weights" not in tensors:
        raise click.UsageError(f"--min-confidence: {weights or DEFAULT_WEIGHTS} gives no confidence; fit one with "
                               "`captioner calibrate`")


def read_file_list(stream):
    """Paths (or URIs) from --files-from: one a line, blank lines skipped."""
    return [line.rstrip("\r\n") for line in stream if line.strip()]


def _caption_on_ray(inputs, recursive, output, fmt, resume, decode, min_confidence, batch_size, model, ray):
    from .cluster import caption_with_ray

    if not output:
        raise click.UsageError("--engine ray writes sharded files: give an --output folder")
    if decode.n_best > 1:
        raise click.UsageError("--n-best: the Ray engine writes one caption a file; use the local engine for "
                               "alternatives")
    _setup_logging()
    try:
        summary = caption_with_ray(inputs, output, fmt, decode, recursive=recursive, resume=resume,
                                   weights=model["weights"], backend=model["backend"], batch_size=batch_size,
                                   min_confidence=min_confidence, **ray)
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
    sys.exit(EXIT_SOME_FAILED if summary["failed"] else EXIT_OK)


def _caption_locally(inputs, recursive, output, fmt, resume, decode, min_confidence, batch_size, workers, model,
                     archive):
    """Caption in this process, writing each record to `output` (None: standard output) as
    soon as it is known; with `resume`, skip the files `output` already records; `archive`:
    the --sentence-case and --write-xmp flags."""
    from .checkpoint import CheckpointError
    from .inference import file_captioner

    _setup_logging()
    fmt = _local_format(output, fmt)
    if decode.n_best > 1 and fmt != "jsonl":
        raise click.UsageError(f"--n-best: only jsonl records hold alternatives; {fmt} has one caption a file")
    files = _files_to_caption(inputs, recursive, output)
    append = bool(resume and output.is_file() and output.stat().st_size)
    if append:
        files = _not_yet_recorded(files, output, fmt)
    try:
        captioner = file_captioner(**model)
    except (CheckpointError, ValueError, OSError) as e:
        raise click.ClickException(str(e))
    stream = _open_output(output, append)
    writer = RecordWriter(stream, fmt, header=not append)
    records = _caption_records(captioner, files, decode, batch_size, workers, min_confidence,
                               alternatives=fmt == "jsonl", archive=archive)
    failures = _write_records(records, writer, len(files), output)
    if failures:
        click.echo(f"{failures} of {len(files)} files could not be captioned", err=True)
    sys.exit(EXIT_SOME_FAILED if failures else EXIT_OK)


def _local_format(output, fmt):
    """The record format: --format, else --output's extension, else jsonl."""
    if fmt is None:
        suffix = output.suffix.lower().lstrip(".") if output else ""
        fmt = suffix if suffix in OUTPUT_FORMATS else "jsonl"
    if fmt == "parquet":
        raise click.UsageError("--format parquet is for --engine ray (sharded output); use jsonl or csv here")
    return fmt


def _files_to_caption(inputs, recursive, output):
    """The image files of `inputs`, refusing an --output that would overwrite a folder, a
    photo or an input."""
    from .images import IMAGE_EXTENSIONS, find_images, is_url

    if output and output.is_dir():
        raise click.UsageError(f"--output {output} is a folder; give a file")
    if output and output.suffix.lower() in IMAGE_EXTENSIONS:
        raise click.UsageError(f"--output {output} has an image's extension; records go to a .jsonl, .csv or "
                               ".txt file (refused so that a photo is never overwritten)")
    files = find_images(inputs, recursive)
    if not files:
        extensions = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise click.UsageError(f"no image files found (extensions: {extensions}; use --recursive for sub-folders)")
    local = [f for f in files if not is_url(f)]
    if output and output.exists() and output.resolve() in {f.resolve() for f in local if f.exists()}:
        raise click.UsageError(f"--output {output} is one of the input files")
    return files


def _not_yet_recorded(files, output, fmt):
    """--resume: the files that `output` does not record yet."""
    try:
        done = recorded_paths(output, fmt)
    except RecordError as e:
        raise click.ClickException(str(e)) from None
    todo = [f for f in files if str(f) not in done]
    if not todo:
        click.echo(f"--resume: all {len(files)} files are already captioned in {output}; nothing to do", err=True)
        sys.exit(EXIT_OK)
    click.echo(f"--resume: {len(files) - len(todo)} of {len(files)} files already in {output}; "
               f"captioning the other {len(todo)}", err=True)
    return todo


def _open_output(output, append):
    """The stream records go to: `output` (its folder made if missing), or standard output."""
    try:
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
            return open(output, "a" if append else "w", newline="", encoding="utf-8", errors="surrogateescape")
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="surrogateescape")
        return sys.stdout
    except OSError as e:
        click.echo(f"Error: cannot write {output}: {e.strerror or e}", err=True)
        sys.exit(EXIT_OUTPUT_ERROR)


def _caption_records(captioner, files, decode, batch_size, workers, min_confidence, alternatives, archive):
    """One record per file, in order (records.caption_record); `alternatives`: include the
    n-best candidates (and the attention maps) of jsonl; `archive`: see _finish_record."""
    if decode.attention and not captioner.model.config.attention:
        raise click.UsageError("--attention: this model reads the pooled feature only and has no attention maps")
    root = None  # --attention-dir mirrors the folders below the local files' common folder
    if archive["attention_dir"]:
        from .feature_store import common_folder

        local = [str(Path(f).resolve()) for f in files if "://" not in str(f)]
        root = Path(common_folder(local)) if local else None
    for i, result, error in captioner.caption_files(files, decode, batch_size, workers):
        if error is not None:
            yield {"path": str(files[i]), "error": error}
            continue
        record = caption_record(str(files[i]), result, min_confidence)
        if decode.n_best > 1 and alternatives:
            record["alternatives"] = result["alternatives"]
        if decode.attention and alternatives:
            record["attention"] = result["attention"]
        record = _finish_record(record, files[i], archive)
        if archive["attention_dir"] and record["caption"] is not None:  # a withheld caption is not drawn either
            _write_attention_png(record, archive["attention_dir"], files[i], result, root)
        yield record


def _write_attention_png(record, folder, file, result, root):
    """--attention-dir: write the figure of one photo (heatmaps.py) titled with the record's
    caption (as written: --sentence-case) and put its path in the record as "attention_png";
    a failure makes the record an error that keeps its caption."""
    from .heatmaps import write_figure
    from .images import ImageError, load_input

    try:
        record["attention_png"] = str(write_figure(folder, file, load_input(file), result["attention"],
                                                   record["caption"], root))
    except (ImageError, OSError) as e:
        record["error"] = f"attention map not written: {e}"


def _finish_record(record, file, archive):
    """--sentence-case, then --write-xmp and --write-xmp-embedded, on the record of the
    captioned `file`. A withheld caption writes no XMP; a failed XMP write makes the record
    an error that keeps its caption (the run goes on)."""
    from .xmp import XmpError, embed_in_jpeg, write_sidecar

    if archive["sentence_case"]:
        if record["caption"]:
            record["caption"] = sentence_case(record["caption"])
        if "alternatives" in record:
            record["alternatives"] = [{**a, "caption": sentence_case(a["caption"])} for a in record["alternatives"]]
    if record["caption"] is None:
        return record
    try:
        if archive["write_xmp"]:
            write_sidecar(file, record["caption"])
        if archive["write_xmp_embedded"]:
            embed_in_jpeg(file, record["caption"])
    except XmpError as e:
        record["error"] = f"XMP not written: {e}"
    except OSError as e:
        record["error"] = f"XMP not written: {e.filename}: {e.strerror or e}"
    return record


def _write_records(records, writer, total, output):
    """Write `records` (`total` of them) with a progress bar, then close `output`. -> how
    many are errors. Ctrl-C and a failed write end the command with their exit status,
    keeping what was written."""
    from tqdm import tqdm

    failures = done = 0
    try:
        with tqdm(total=total, desc="captioning", unit="img", file=sys.stderr) as bar:
            for record in records:
                writer.write(record)
                failures += "error" in record
                done += 1
                bar.update()
    except KeyboardInterrupt:
        _close_quietly(writer.stream, output)
        click.echo(f"\ninterrupted after {done} of {total} files"
                   + ("; continue with the same command and --resume" if output else ""), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as e:  # a full disk, a vanished output folder: say so, no traceback
        _close_quietly(writer.stream, output)
        click.echo(f"Error: writing {output or 'standard output'} failed after {done} records: "
                   f"{e.strerror or e}", err=True)
        sys.exit(EXIT_OUTPUT_ERROR)
    if output:
        try:
            writer.stream.close()
        except OSError as e:
            click.echo(f"Error: writing {output} failed: {e.strerror or e}", err=True)
            sys.exit(EXIT_OUTPUT_ERROR)
    return failures


def _close_quietly(stream, output):
    if output:
        try:
            stream.close()
        except OSError:
            pass


@main.command()
@config_flags(TrainConfig)
@decode_flags(exclude=("n_best", "max_length", "attention"))  # TrainConfig sets them (one caption, no maps)
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
def train(values, given, decode, resume):
    """Train a captioner; the best checkpoint is OUT/best.safetensors. Validation captions
    are decoded with the --beam-size and grounding options that users will get. On several
    GPUs: torchrun --nproc_per_node N -m captioner train ... (the same flags)."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .run_state import resume_config
    from .train import train as run_training

    _setup_logging()
    values["decode"] = decode
    if given & {f.name for f in dataclasses.fields(DecodeOptions)}:  # a decoding flag sets `decode`
        given.add("decode")
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
@config_flags(EvalConfig)
@decode_flags(exclude=("n_best", "attention"))  # one caption per image is scored
@device_flag()
@workers_flag()
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file for the scores and every caption (default: scores-SPLIT.json beside "
                   "--checkpoint, or in the current folder for the shipped weights).")
@backend_flag
def evaluate(checkpoint, run, values, given, decode, device, workers, output, backend):
    """Score a checkpoint with the coco-caption metrics on one split of a dataset."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .evaluate import evaluate_checkpoint
    from .inference import DEFAULT_WEIGHTS

    _setup_logging()
    if run:
        values.update(_run_data_settings(run, given))
        checkpoint = checkpoint or run / "best.safetensors"
    if values["data"] is None:
        raise click.UsageError("give --data (or --run, a training run folder)")
    if output is None:  # beside a run's checkpoint; for the shipped weights, here (not in weights/)
        output = (checkpoint.parent if checkpoint else Path(".")) / f"scores-{values['split']}.json"
    checkpoint = checkpoint or DEFAULT_WEIGHTS
    try:
        report = evaluate_checkpoint(checkpoint, EvalConfig(**values), decode, device=device, workers=workers,
                                     backend=backend)
    except (CheckpointError, DataError, ValueError) as e:
        raise click.ClickException(str(e))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    _print_scores(report, values["split"], decode)
    click.echo(f"captions and scores written to {output}")


@main.command()
@weights_flag("Checkpoint to calibrate (default: the shipped weights/).")
@config_flags(CalibrateConfig)
@device_flag()
@workers_flag()
@backend_flag
def calibrate(weights, values, given, device, workers, backend):
    """Fit a model's person detector and caption confidence on captioned photos, and write
    the model with them to --out. Without them a model bans no people words and its
    captions carry no confidence."""
    from .calibrate import calibrate_checkpoint
    from .checkpoint import CheckpointError
    from .data import DataError
    from .inference import DEFAULT_WEIGHTS

    _setup_logging()
    try:
        config = CalibrateConfig(**values)
        report = calibrate_checkpoint(weights or DEFAULT_WEIGHTS, config, device=device, workers=workers,
                                      backend=backend)
    except (CheckpointError, DataError, ValueError) as e:
        raise click.ClickException(str(e))
    head, conf = report["person_head"], report["confidence"]
    click.echo(f"person detector: {head['photos']} captioned photos and {head['no_people']} without anyone; "
               f"fit AUROC {head['fit_auroc']:.3f}")
    click.echo(f"confidence: {conf['captions']} captions (CHAIR-s {conf['CHAIR-s']:.3f}); fit AUROC "
               f"{conf['fit_auroc']:.3f}")
    for low, high, n, mean, share in conf["reliability"]:
        click.echo(f"  {low:.1f}-{high:.1f}: {n:4d} captions, mean confidence {mean:.3f}, truthful {share:.3f}")
    click.echo(f"model written to {config.out}")


def _check_port_free(host, port):
    """Fail with one clear line when host:port cannot be bound, before gunicorn starts (it
    would print its banner, then retry for seconds)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise click.UsageError(f"--host {host}: {e.strerror}")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            click.echo(f"Error: cannot serve on {host}:{port}: {e.strerror or e} (is another server using it? "
                       "choose another --port)", err=True)
            sys.exit(EXIT_OUTPUT_ERROR)


def _run_data_settings(run, given):
    """The data settings of the training run in the folder `run` that no given flag sets.
    Without --split: its data's test split where it has one, else the run's validation split."""
    from .data import read_dataset
    from .run_state import stored_config

    settings = stored_config(run)
    if settings is None:
        raise click.UsageError(f"--run {run}: no training run there (no train_state.pt)")
    values = {name: getattr(settings, name) for name in RUN_DATA_SETTINGS if name not in given}
    if "split" not in given:
        records = read_dataset(settings.data, settings.format, settings.images, settings.val_fraction,
                               settings.split_file)
        values["split"] = "test" if any(r.split == "test" for r in records) else "val"
        click.echo(f"--run: scoring the {values['split']} split of {settings.data}", err=True)
    return values


def _print_scores(report, split, decode):
    click.echo(f"{report['images']} images, split {split}, backend {report['backend']}, beam {decode.beam_size}, "
               f"grounding {'on' if decode.grounding else 'off'}, tokenizer {report['scores']['tokenizer']}")
    if report["scores"]["tokenizer"] != "ptb":
        click.echo("note: Java not found, so METEOR is missing and the PTB tokenizer was replaced by a "
                   "simple one; install a Java runtime (make java) for the standard scores", err=True)
    for name, value in report["scores"].items():
        if name != "tokenizer":
            click.echo(f"{name:8s} {value:.4f}")
    h = report["hallucination"]
    click.echo(f"CHAIR-s  {h['CHAIR-s']:.4f}  (captions naming an object no reference names)")
    click.echo(f"CHAIR-i  {h['CHAIR-i']:.4f}  (object mentions that no reference names)")
    click.echo(f"repeats  {h['repeats']:.4f}  (captions with a doubled word or a repeated trigram)")
    if h["hallucinated"]:
        click.echo("most hallucinated: " + ", ".join(f"{obj} {n}" for obj, n in h["hallucinated"][:5]))
    if "confidence_auroc" in h:
        click.echo(f"confidence AUROC {h['confidence_auroc']:.4f} (names nothing absent); by confidence:")
        for row in h["reliability"]:
            click.echo(f"  {row['low']:.1f}-{row['high']:.1f}: {row['captions']:4d} captions, mean confidence "
                       f"{row['confidence']:.3f}, truthful {row['truthful']:.3f}")


@main.command()
@weights_flag("Checkpoint whose encoder to export (default: the shipped weights/).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="ONNX file to write.")
@click.option("--int8", is_flag=True, help="Quantise to int8 (static, per-channel), calibrated on real photos.")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of photos for int8 calibration (default: the bundled examples/).")
def export(weights, out, int8, calibration):
    """Export a checkpoint's encoder to ONNX, for deploying it elsewhere: input `pixels`
    (B, 3, 224, 224), preprocessed as captioner.images.preprocess does; output `features`
    (B, 1280), the pooled vector the decoder starts from."""
    import tempfile

    from .export import export_onnx, quantize_int8
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
    from .machine import DEFAULT_CACHE_DIR
    from .feature_store import prune_store

    _setup_logging()
    s = prune_store(cache_dir or DEFAULT_CACHE_DIR)
    click.echo(f"{s['stores']} store(s): kept {s['kept']} features and {s['failed_kept']} known-unreadable images, "
               f"dropped {s['dropped']}; shards {s['shards_before']} -> {s['shards_after']}; "
               f"removed {len(s['removed'])} old cache(s); freed {s['bytes_freed'] / 1e6:.1f} MB")


@cache.command("info")
@_cache_dir_flag
def cache_info(cache_dir):
    """List the feature stores: entries, shards and size of each."""
    from .machine import DEFAULT_CACHE_DIR
    from .feature_store import store_info

    rows = store_info(cache_dir or DEFAULT_CACHE_DIR)
    if not rows:
        click.echo(f"no feature stores in {cache_dir or DEFAULT_CACHE_DIR}")
    for r in rows:
        entries = "?" if r["entries"] is None else f"{r['entries']} features, {r['failed']} unreadable"
        maps = f" ({r['spatial_entries']} with spatial maps, {r['spatial_bytes'] / 1e6:.1f} MB of it)" \
            if r.get("spatial") else ""
        click.echo(f"{r['version']}/{r['store']}  {r['root']}  {entries}, {r['shards']} shard(s), "
                   f"{r['bytes'] / 1e6:.1f} MB{maps}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="gunicorn worker processes (default: one per core, up to 4); each loads the model "
                   "and gets cores/workers threads.")
@weights_flag("Checkpoint to serve (default: the shipped weights/).")
@device_flag()
@backend_flag
def serve(host, port, workers, weights, device, backend):
    """Serve the HTTP API and upload page with gunicorn (server/gunicorn.conf.py)."""
    import os

    import server

    conf = Path(server.__file__).resolve().parent / "gunicorn.conf.py"
    _check_port_free(host, port)
    workers = workers or default_server_workers()
    env = {**os.environ, "CAPTIONER_DEVICE": device, "CAPTIONER_WORKERS": str(workers),
           "CAPTIONER_BACKEND": backend}
    if weights:
        env["CAPTIONER_WEIGHTS"] = str(weights.resolve())
    argv = [sys.executable, "-m", "gunicorn", "-c", str(conf), "--bind", f"{host}:{port}",
            "--workers", str(workers), "server.wsgi:app"]
    click.echo(f"serving on http://{host}:{port}/ with {workers} worker(s)", err=True)
    os.execve(sys.executable, argv, env)  # gunicorn takes over this process and its signals
