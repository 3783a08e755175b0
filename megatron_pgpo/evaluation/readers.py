"""Reading benchmark files as distributed: parquet and jsonl through ``datasets``, VLMEvalKit's TSV (base64
images), and JSON documents (a list of records, or an object of records keyed by id). Images come as a ``datasets``
Image struct (bytes / path), raw bytes, a path relative to the file, base64 text, or a list of those.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from PIL import Image

from ..data.files import DataError, _without_image_decoding, decode_image

#: File types a benchmark directory may hold, in the order they are looked for.
SUFFIXES = (".parquet", ".jsonl", ".json", ".tsv")


def benchmark_files(directory: Path, patterns: Sequence[str]) -> List[Path]:
    """The files under ``directory`` matching the first of ``patterns`` that matches anything (sorted)."""
    for pattern in patterns:
        found = sorted(p for p in directory.glob(pattern) if p.is_file() and p.suffix in SUFFIXES)
        if found:
            return found
    return []


def iter_rows(path: Path) -> Iterator[Dict[str, Any]]:
    """Every row of one file as a dict (images left undecoded)."""
    if path.suffix == ".json":
        document = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(document, dict):  # {"id": {...}, ...}
            for key, row in document.items():
                yield {"__key__": key, **row} if isinstance(row, dict) else {"__key__": key, "value": row}
            return
        if isinstance(document, list):
            yield from (row for row in document if isinstance(row, dict))
            return
        raise DataError(f"{path}: expected a JSON list or object of records")
    import datasets

    if path.suffix == ".tsv":
        import csv
        import sys

        csv.field_size_limit(sys.maxsize)  # base64 images are long fields
        with path.open(newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f, delimiter="\t")
        return
    builder = {".parquet": "parquet", ".jsonl": "json"}[path.suffix]
    ds = datasets.load_dataset(builder, data_files=[str(path)], split="train")
    for column in ds.column_names:
        ds = _without_image_decoding(ds, column)
    yield from ds


def _maybe_base64(value: str):
    """Bytes of a base64 image string, or None when ``value`` is not one (then it is a path)."""
    if len(value) < 128 or "/" in value[:64] and Path(value).suffix:
        return None
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        return None


def load_image(value: Any, base_dir: Path) -> Image.Image:
    """An RGB image from any of the encodings in the module docstring (exactly one image)."""
    if isinstance(value, (list, tuple)):
        images = [v for v in value if v is not None]
        if len(images) != 1:
            raise ValueError(f"expected one image, got {len(images)}")
        value = images[0]
    if isinstance(value, str):
        raw = _maybe_base64(value)
        if raw is not None:
            value = raw
    return decode_image(value, base_dir)


def count_images(values: Sequence[Any]) -> int:
    """Images present among ``values`` (columns such as MMMU-Pro's ``image_1`` .. ``image_7``)."""
    return sum(1 for v in values if v not in (None, "", [], {}) and not (isinstance(v, dict) and not any(v.values())))


def files_and_rows(directory: Path, patterns: Sequence[str]) -> Iterator[Tuple[Path, int, Dict[str, Any]]]:
    """(file, row number, row) over every matching file."""
    for path in benchmark_files(directory, patterns):
        for i, row in enumerate(iter_rows(path)):
            yield path, i, row


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()
