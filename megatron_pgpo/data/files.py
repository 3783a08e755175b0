"""Local dataset files (parquet / jsonl, with images) in the two common RLVR layouts, loaded with ``datasets``.

=========  ==========  ========  ===========================================
layout     question    answer    images
=========  ==========  ========  ===========================================
virl39k    question    answer    image (one image or a list of them)
geo3k      problem     answer    images (a list; EasyR1's layout)
=========  ==========  ========  ===========================================

``layout="auto"`` picks by column names. Images may be ``datasets.Image`` values (struct of bytes/path, how they
round-trip through parquet), raw bytes, or paths (relative to the data file). Rows that cannot be used — a
missing or corrupt image, an image over ``MAX_SOURCE_PIXELS`` (a decompression bomb, or a scan that would take
gigabytes to decode), an empty question or answer, a .jsonl line that is not UTF-8 or not JSON, a prompt over the
length limit — are skipped and counted per reason, and each reason is logged once; a file with no usable row is
an error at start-up.
"""
from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from PIL import Image

from .synthetic import Example

log = logging.getLogger(__name__)

LAYOUTS: Dict[str, Tuple[str, str, str]] = {
    "virl39k": ("question", "answer", "image"),
    "geo3k": ("problem", "answer", "images"),
}


class DataError(ValueError):
    """The data files cannot be used at all; the message says why."""


#: Source images with more pixels are skipped before decoding (PIL's own decompression-bomb threshold, ~89.5 M
#: pixels: ~270 MB decoded; the model sees at most ``data.max_pixels`` after downscaling anyway).
MAX_SOURCE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageTooLarge(ValueError):
    """A source image over ``MAX_SOURCE_PIXELS``."""


@dataclass
class SkipCounter:
    """Rows skipped per reason; logs the first occurrence of each reason."""

    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str, where: str) -> None:
        if not self.counts[reason]:
            log.warning("skipping rows with %s (first: %s); further ones are only counted", reason, where)
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def data_files(path: str) -> Tuple[str, List[str]]:
    """``(datasets builder name, files)`` for a file or a directory of parquet/jsonl files."""
    p = Path(path)
    if p.is_dir():
        for builder, patterns in (("parquet", ("*.parquet",)), ("json", ("*.jsonl", "*.json"))):
            files = sorted(str(f) for pat in patterns for f in p.glob(pat))
            if files:
                return builder, files
        raise DataError(f"{path}: no .parquet or .jsonl files in this directory")
    if not p.is_file():
        raise DataError(f"{path}: no such file or directory")
    if p.suffix == ".parquet":
        return "parquet", [str(p)]
    if p.suffix in (".jsonl", ".json"):
        return "json", [str(p)]
    raise DataError(f"{path}: unsupported file type {p.suffix!r} (use .parquet or .jsonl)")


def detect_layout(columns: List[str], layout: str = "auto") -> Tuple[str, str, str]:
    """The (question, answer, image) column names for ``layout``; ``auto`` picks by the columns present."""
    if layout != "auto":
        if layout not in LAYOUTS:
            raise DataError(f"unknown layout {layout!r}; valid: auto, {', '.join(LAYOUTS)}")
        names = LAYOUTS[layout]
        missing = [c for c in names if c not in columns]
        if missing:
            raise DataError(f"layout {layout!r} needs columns {list(names)}; missing {missing} (have {columns})")
        return names
    for names in LAYOUTS.values():
        if all(c in columns for c in names):
            return names
    raise DataError(f"cannot detect the layout from columns {columns}; expected one of "
                    + "; ".join(f"{k}: {list(v)}" for k, v in LAYOUTS.items()))


def decode_image(value: Any, base_dir: Path) -> Image.Image:
    """An RGB PIL image from a datasets Image value, bytes, a path, or a one-element list of those."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"expected exactly one image, got {len(value)}")
        value = value[0]
    with warnings.catch_warnings():  # PIL warns about large images at open: MAX_SOURCE_PIXELS decides below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            img = (Image.open(io.BytesIO(value["bytes"])) if value.get("bytes")
                   else Image.open(base_dir / value["path"]))
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value:
            img = Image.open(base_dir / value)
        else:
            raise ValueError("no image")
    if img.width * img.height > MAX_SOURCE_PIXELS:  # the header is read, nothing decoded yet
        raise ImageTooLarge(f"{img.width}x{img.height}")
    img.load()  # decode now, so a corrupt file is caught here and not mid-step
    return img.convert("RGB")


def _without_image_decoding(ds, column: str):
    """Turn off ``datasets``' own image decoding for ``column``: a corrupt image would raise inside iteration,
    where the row cannot be skipped; ``decode_image`` decodes it row by row instead."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image):
        return ds.cast_column(column, type(feature)(datasets.Image(decode=False)))
    return ds


def downscale(image, max_pixels: int):
    """``image`` resized (aspect kept, bicubic) so that width x height <= ``max_pixels``."""
    import math

    scale = math.sqrt(max_pixels / (image.width * image.height))
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, resample=3)


def fit_pixels(image, max_pixels: Optional[int] = None, min_pixels: Optional[int] = None):
    """``image`` resized (aspect kept, bicubic) into ``[min_pixels, max_pixels]`` pixels; unchanged inside."""
    import math

    area = image.width * image.height
    if max_pixels is not None and area > max_pixels:
        return downscale(image, max_pixels)
    if min_pixels is not None and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
        return image.resize((math.ceil(image.width * scale), math.ceil(image.height * scale)), resample=3)
    return image


def load_examples(path: str, layout: str = "auto", prompt_length: Optional[Callable[[Example], int]] = None,
                  max_prompt_length: Optional[int] = None, limit: Optional[int] = None,
                  max_pixels: Optional[int] = None, min_pixels: Optional[int] = None
                  ) -> Tuple[List[Example], SkipCounter]:
    """Usable examples of a local dataset and the count of skipped rows per reason.

    Args:
        path: a .parquet/.jsonl file or a directory of them.
        layout: ``auto``, ``virl39k`` or ``geo3k``.
        prompt_length: tokens of an example's prompt, image tokens included (e.g. from the processor).
        max_prompt_length: rows over it are skipped (needs ``prompt_length``).
        limit: stop after this many usable examples.
        max_pixels: larger images are downscaled (aspect kept) to at most this many pixels.
        min_pixels: smaller images are upscaled (aspect kept) to at least this many pixels.
    """
    import datasets

    builder, files = data_files(path)
    skipped, examples = SkipCounter(), []
    if all(f.endswith(".jsonl") for f in files):  # line by line: one bad line is one skipped row, not a failed load
        rows = json_lines(files, skipped)
        if not rows:
            raise DataError(f"{path}: no usable row ({_reasons(skipped)})")
        ds = datasets.Dataset.from_list(rows)
    else:
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    q_col, a_col, img_col = detect_layout(ds.column_names, layout)
    ds = _without_image_decoding(ds, img_col)
    base_dir = Path(files[0]).parent
    for i, row in enumerate(ds):
        where = f"{Path(path).name} row {i}"
        question, answer = str(row.get(q_col) or "").strip(), str(row.get(a_col) or "").strip()
        if not question:
            skipped.skip("an empty question", where)
            continue
        if not answer:
            skipped.skip("an empty answer", where)
            continue
        try:
            image = decode_image(row.get(img_col), base_dir)
        except (ImageTooLarge, Image.DecompressionBombError):
            skipped.skip(f"an image over {MAX_SOURCE_PIXELS} pixels", where)
            continue
        except Exception as exc:  # corrupt bytes, missing file, several images
            skipped.skip(f"a missing or unreadable image ({type(exc).__name__})", where)
            continue
        image = fit_pixels(image, max_pixels, min_pixels)
        question = question.replace("<image>", "").strip()  # datasets mark the image slot; our template adds it
        example = Example(image=image, question=question, answer=answer, task=Path(path).stem, uid=f"{where}")
        if max_prompt_length is not None and prompt_length is not None and prompt_length(example) > max_prompt_length:
            skipped.skip(f"a prompt longer than {max_prompt_length} tokens", where)
            continue
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no usable row ({_reasons(skipped)})")
    return examples, skipped


def _reasons(skipped: SkipCounter) -> str:
    return ", ".join(f"{n} with {r}" for r, n in skipped.counts.items()) or "the file is empty"


def json_lines(files: List[str], skipped: SkipCounter) -> List[dict]:
    """The JSON objects of .jsonl ``files``; a line that is not UTF-8, not JSON or not an object is skipped and
    counted (blank lines are ignored)."""
    import json

    rows = []
    for name in files:
        with open(name, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{Path(name).name} line {number}"
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    skipped.skip("text that is not UTF-8", where)
                    continue
                except ValueError:
                    skipped.skip("a line that is not JSON", where)
                    continue
                if not isinstance(row, dict):
                    skipped.skip("a line that is not a JSON object", where)
                    continue
                rows.append(row)
    return rows
