"""The records `captioner caption` writes, one per input file: the jsonl, csv and txt
formats, reading an output file back for --resume, and the repair of a last line that a
crash cut short (the Ray engine's shards get the same repair, cluster.py).

Every line stays one record whatever a file name holds: JSONL escapes what JSON must (and
writes a file name that is not UTF-8 as \\udcXX escapes, as Python's os.fsdecode reads it);
txt escapes backslash, tab, CR and LF as \\\\ \\t \\r \\n; csv quotes as CSV does and prefixes
a cell that starts with = + - @ tab or CR with ' (a spreadsheet would run it as a formula).
In csv and txt a name that is not UTF-8 keeps its original bytes (the stream is opened with
errors="surrogateescape").
"""
import csv
import json
import logging
import re

log = logging.getLogger(__name__)
OUTPUT_FORMATS = ("jsonl", "csv", "txt")
CSV_COLUMNS = ["path", "caption", "score", "confidence", "objects", "error"]
# What txt says in place of a caption withheld by --min-confidence.
LOW_CONFIDENCE_TEXT = "[low confidence]"
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
TXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_TXT_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}
_TXT_ESCAPED = re.compile(r"\\[\\tnr]")


class RecordError(ValueError):
    """An output file that does not hold this command's records."""


def csv_cell(value):
    """A CSV cell a spreadsheet shows as text: a leading formula character gets a ' before it."""
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def sentence_case(caption):
    """A caption as a sentence, as alt text is written: "a cat is on the floor" -> "A cat is
    on the floor." (the model's captions are lower-case and unpunctuated)."""
    caption = caption.strip()
    if not caption:
        return caption
    return caption[0].upper() + caption[1:] + ("" if caption[-1] in ".!?" else ".")


def caption_record(path, result, min_confidence=None):
    """The record of one captioned file (`result`: a Captioner result). A caption whose
    confidence is under `min_confidence` is withheld: "caption" null and "low_confidence"
    true, the record kept, so that nothing goes missing silently and an archive can send
    exactly these photos to a person."""
    record = {"path": path, "caption": result["caption"], "score": result["score"],
              "confidence": result["confidence"], "objects": result["objects"]}
    if min_confidence is not None and result["confidence"] is not None and result["confidence"] < min_confidence:
        record["caption"], record["low_confidence"] = None, True
    return record


class RecordWriter:
    """Writes one record per input file as soon as it is known (nothing is lost if a long
    run is interrupted). `header=False` when appending to a CSV that has one."""

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
            confidence = record.get("confidence")
            self.csv.writerow([csv_cell(record["path"]), csv_cell(record.get("caption") or ""),
                               record.get("score", ""), "" if confidence is None else confidence, csv_cell(objects),
                               csv_cell(record.get("error", ""))])
        else:
            text = f"ERROR: {record['error']}" if "error" in record else record["caption"] or LOW_CONFIDENCE_TEXT
            self.stream.write(f"{record['path'].translate(TXT_ESCAPES)}\t{text.translate(TXT_ESCAPES)}\n")
        self.stream.flush()


def _utf8_clean(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def complete_lines(data, name):
    """`data`, the bytes of a records file, up to its last newline: a last line that a crash
    cut short is dropped (with a warning naming the file `name`), so that appending starts
    on a fresh line."""
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        log.warning("%s: removing an incomplete last line (%d bytes) left by an interrupted run", name,
                    len(data) - complete)
    return data[:complete]


def recorded_paths(output, fmt):
    """The paths an earlier run already wrote to the file `output` (for --resume), after
    cutting off an incomplete last line. Raises RecordError if it holds something else."""
    with open(output, "rb+") as f:
        data = f.read()
        complete = complete_lines(data, output)
        if len(complete) < len(data):
            f.truncate(len(complete))
    lines = complete.decode("utf-8", errors="surrogateescape").splitlines()
    if fmt == "jsonl":
        done = set()
        for n, line in enumerate(lines, 1):
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise RecordError(f"--resume: {output} line {n} is not a caption record; "
                                  "is it the output of this command?") from None
        return done
    if fmt == "csv":
        rows = list(csv.reader(lines))
        if rows and rows[0] != CSV_COLUMNS:
            raise RecordError(f"--resume: {output} does not start with the header {','.join(CSV_COLUMNS)}")
        # a path cell neutralised against formulas (csv_cell) is read back without its '
        return {row[0][1:] if row[0][:1] == "'" and row[0][1:2] in FORMULA_START else row[0] for row in rows[1:] if row}
    return {_TXT_ESCAPED.sub(lambda m: _TXT_UNESCAPE[m.group()], line.split("\t", 1)[0]) for line in lines}
