"""Per-token sample records: what each response's tokens scored, for `megatron-pgpo visualize`.

Every ``logging.samples_every`` steps the loop writes the step's responses to
``RUN_DIR/samples/step_{step:08d}.jsonl``, one JSON object per response:

======================  =================  =====================================================================
key                     type               meaning
======================  =================  =====================================================================
``step``                int                the training step
``prompt_index``        int                which prompt of the step's batch (responses of one group share it)
``group_advantage``     float              the response's GRPO/DAPO advantage ``A_i`` (group-normalised reward)
``reward``              float              its reward (``accuracy_weight * accuracy + format_weight * format``)
``accuracy``            float              1.0 when the boxed answer is correct, else 0.0
``format``              float              1.0 when ``<think>...</think>`` is followed by a boxed answer
``question``            str or null        the prompt's text query
``answer``              str                the gold answer
``tokens``              list[str]          the response decoded one token at a time, ``[T]``
``token_ids``           list[int]          the response's token ids, ``[T]``
``scores``              list[float]        visual dependency ``S_t`` (>= 0) of each token, ``[T]``
``weights``             list[float]        PGPO weight ``w~_t`` of each token (sum = T; all 1.0 for GRPO), ``[T]``
======================  =================  =====================================================================

``tokens``, ``token_ids``, ``scores`` and ``weights`` cover the response's valid tokens only (no padding) and
have equal lengths. A token's advantage in the loss is ``weights[t] * group_advantage``. Non-finite floats are
written as ``null`` (JSON has no NaN). Other keys may be added by the writer and are kept as they are.

A step's file is written to a temporary name and renamed into place, so a reader never sees half a file and a
crash leaves either the previous file or the new one. Writing a step again (a resumed run repeating it) replaces
its file unless ``append=True``.
"""
from __future__ import annotations

import json
import math
import operator
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

#: The keys every record has, in the order they are written, with their meaning.
SAMPLE_RECORD_KEYS: Dict[str, str] = {
    "step": "the training step (int)",
    "prompt_index": "which prompt of the step's batch; responses of one group share it (int)",
    "group_advantage": "the response's GRPO/DAPO advantage A_i (float)",
    "reward": "the response's reward (float)",
    "accuracy": "1.0 when the boxed answer is correct (float)",
    "format": "1.0 when the answer format is right (float)",
    "question": "the prompt's text query (str or null)",
    "answer": "the gold answer (str)",
    "tokens": "the response decoded one token at a time (list of str)",
    "token_ids": "the response's token ids (list of int)",
    "scores": "visual dependency S_t of each token (list of float, >= 0)",
    "weights": "PGPO weight of each token, summing to the length; all 1.0 for GRPO (list of float)",
}

PER_TOKEN_KEYS = ("tokens", "token_ids", "scores", "weights")
_SCALAR_FLOAT_KEYS = ("group_advantage", "reward", "accuracy", "format")
_STEP_FILE = re.compile(r"^step_(\d{8})\.jsonl$")


def samples_dir(run_dir: str) -> Path:
    return Path(run_dir) / "samples"


def samples_path(run_dir: str, step: int) -> Path:
    return samples_dir(run_dir) / f"step_{int(step):08d}.jsonl"


def sample_steps(run_dir: str) -> List[int]:
    """Steps that have a samples file, ascending (temporary files of an interrupted write are ignored)."""
    root = samples_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, os.listdir(root)) if m)


def _as_list(value: Any) -> list:
    """Lists, tuples, numpy arrays and torch tensors (anything with ``tolist``) -> a Python list."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return list(value)


def _float_or_none(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _normalize(record: Mapping[str, Any], step: int, index: int) -> Dict[str, Any]:
    """Check one record and convert its values to plain JSON types; raise ValueError naming what is wrong."""
    where = f"sample record {index}" + (f" (prompt_index {record['prompt_index']})" if "prompt_index" in record
                                         else "")
    record = dict(record)
    record.setdefault("step", step)
    missing = [key for key in SAMPLE_RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"{where} lacks {missing}; every record needs {list(SAMPLE_RECORD_KEYS)}")
    if record["step"] != step:
        raise ValueError(f"{where} has step {record['step']!r} but is written for step {step}")
    try:
        out: Dict[str, Any] = {"step": operator.index(step), "prompt_index": operator.index(record["prompt_index"])}
        for key in _SCALAR_FLOAT_KEYS:
            out[key] = _float_or_none(record[key])
        out["question"] = None if record["question"] is None else str(record["question"])
        out["answer"] = str(record["answer"])
        tokens = _as_list(record["tokens"])
        if not all(isinstance(tok, str) for tok in tokens):
            raise TypeError("tokens must be strings (the decoded text of each token)")
        out["tokens"] = tokens
        out["token_ids"] = [operator.index(tid) for tid in _as_list(record["token_ids"])]
        out["scores"] = [_float_or_none(s) for s in _as_list(record["scores"])]
        out["weights"] = [_float_or_none(w) for w in _as_list(record["weights"])]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    lengths = {key: len(out[key]) for key in PER_TOKEN_KEYS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: tokens, token_ids, scores and weights must have equal lengths (one entry per "
                         f"response token), got " + ", ".join(f"{k}={n}" for k, n in lengths.items()))
    for key, value in record.items():  # extra keys are kept, after the documented ones
        if key not in out:
            out[key] = value
    return out


def write_sample_records(run_dir: str, step: int, records: Iterable[Mapping[str, Any]],
                         append: bool = False) -> Path:
    """Write ``records`` (one mapping per response, keys in ``SAMPLE_RECORD_KEYS``) as the samples of ``step``.

    Per-token values may be lists, numpy arrays or torch tensors; ``step`` may be left out of a record (it is
    filled in). Every record is checked before anything is written: a missing key, a wrong type or per-token
    lists of unequal length raise ``ValueError`` naming the record. The file is replaced atomically (temporary
    file, fsync, rename); with ``append=True`` the step's existing records are kept and these added after them.

    Returns the path of ``RUN_DIR/samples/step_{step:08d}.jsonl``.
    """
    lines = [json.dumps(_normalize(record, step, i), ensure_ascii=False, allow_nan=False)
             for i, record in enumerate(records)]
    path = samples_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text(encoding="utf-8") if append and path.exists() else ""
    if previous and not previous.endswith("\n"):
        previous += "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(previous + "".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_sample_records(run_dir: str, step: Optional[int] = None) -> List[Dict[str, Any]]:
    """The records of one ``step``, or of every step (ascending) when ``step`` is None.

    Raises ``FileNotFoundError`` when ``step`` is given and has no samples file (the message lists the steps that
    have one). With ``step=None`` and no samples at all, returns ``[]``.
    """
    if step is None:
        steps = sample_steps(run_dir)
    else:
        if not samples_path(run_dir, step).exists():
            available = sample_steps(run_dir)
            raise FileNotFoundError(
                f"no samples for step {step} in {samples_dir(run_dir)}; steps with samples: "
                + (", ".join(map(str, available)) if available else "none"))
        steps = [step]
    records: List[Dict[str, Any]] = []
    for s in steps:
        path = samples_path(run_dir, s)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON sample record ({exc})") from None
    return records
