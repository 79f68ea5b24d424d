"""Instruction data: loaders for Alpaca, ShareGPT, chat `messages` and the Phased IFT scored format,
into one canonical record. Malformed input raises a HarnessError naming the file, record and field."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, user_path

SHIPPED_DIR = Path(__file__).parent / "shipped_data"  # not "data": that is this module's name
SHIPPED_DATA = {
    "alpaca-sample": (SHIPPED_DIR / "alpaca_sample.jsonl", "1,500 real Alpaca records (CC BY-NC 4.0), the default"),
}


@dataclass(frozen=True)
class InstructionRecord:
    """One training example. `history` holds earlier (user, assistant) turns of a conversation."""

    instruction: str
    output: str
    input: str = ""
    history: tuple[tuple[str, str], ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        """A content id: equal (history, instruction, input, output) give equal ids."""
        text = json.dumps([self.history, self.instruction, self.input, self.output], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class LoadedData:
    records: list[InstructionRecord]
    source: str
    format: str
    raw_count: int
    duplicates_dropped: int = 0
    empty_dropped: int = 0

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(record.id.encode())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "raw_records": self.raw_count,
            "records": len(self.records),
            "duplicates_dropped": self.duplicates_dropped,
            "empty_dropped": self.empty_dropped,
            "sha256": self.content_hash(),
        }


# ----------------------------------------------------------------------------- reading rows


def _open_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:  # a directory, no permission, ...
        raise HarnessError(f"data file {path}: cannot read it ({error.strerror or error})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise HarnessError(f"data file {path}: not a valid gzip file ({error})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HarnessError(f"data file {path}: not UTF-8 text (bad byte at offset {error.start}); re-save it as UTF-8") from None


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) for a .json list or a .jsonl file (optionally .gz); `where` names the line or index."""
    if not path.exists():
        raise HarnessError(f"data file not found: {path}")
    if path.is_dir():
        raise HarnessError(f"data file {path}: is a directory; give a .json or .jsonl file")
    text = _open_text(path)
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if stem_suffix == ".jsonl" or (stem_suffix != ".json" and not text.lstrip().startswith("[")):
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {line_number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise HarnessError(f"data file {path}: line {line_number}: invalid JSON ({error.msg} at column {error.colno})") from None
            except RecursionError:
                raise HarnessError(f"data file {path}: line {line_number}: JSON nested too deeply to be a record") from None
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise HarnessError(f"data file {path}: line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise HarnessError(f"data file {path}: JSON nested too deeply to be a list of records") from None
    if isinstance(rows, dict):
        rows = next((value for value in rows.values() if isinstance(value, list)), None)
        if rows is None:
            raise HarnessError(f"data file {path}: expected a JSON list of records (or JSONL), got an object")
    if not isinstance(rows, list):
        raise HarnessError(f"data file {path}: expected a JSON list of records, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield f"record {index}", row


# ----------------------------------------------------------------------------- formats


def _string(row: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise HarnessError(f"{where}: missing field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise HarnessError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def parse_alpaca(row: dict[str, Any], where: str) -> InstructionRecord:
    return InstructionRecord(
        instruction=_string(row, "instruction", where),
        input=_string(row, "input", where, required=False),
        output=_string(row, "output", where),
    )


def parse_phased_scored(row: dict[str, Any], where: str) -> InstructionRecord:
    """Phased IFT format: {"id", "score": "4.125", "data": [instruction + "\\n" + input, output]}."""
    pair = row.get("data")
    if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
        raise HarnessError(f"{where}: field 'data' must be a list of two strings [prompt, output]")
    try:
        score = float(row.get("score"))
    except (TypeError, ValueError):
        raise HarnessError(f"{where}: field 'score' must be a number (got {row.get('score')!r})") from None
    return InstructionRecord(
        instruction=pair[0], output=pair[1], metadata={"difficulty": score, "source_id": str(row.get("id", ""))}
    )


def _turns_to_record(turns: list[tuple[str, str]], where: str, field_name: str) -> InstructionRecord:
    """Conversation -> record: the last assistant turn is the output, earlier turns become history."""
    turns = [(role, text) for role, text in turns if role != "system"]
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise HarnessError(f"{where}: field '{field_name}' must end with a user turn followed by an assistant turn")
    history = []
    pending_user: str | None = None
    for role, text in turns[:-2]:
        if role == "user":
            pending_user = text
        elif role == "assistant" and pending_user is not None:
            history.append((pending_user, text))
            pending_user = None
    return InstructionRecord(instruction=turns[-2][1], output=turns[-1][1], history=tuple(history))


def parse_sharegpt(row: dict[str, Any], where: str) -> InstructionRecord:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise HarnessError(f"{where}: field 'conversations' must be a list")
    parsed = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in roles or not isinstance(turn.get("value"), str):
            raise HarnessError(f"{where}: field 'conversations[{index}]' must be {{from: human|gpt|system, value: str}}")
        parsed.append((roles[turn["from"]], turn["value"]))
    return _turns_to_record(parsed, where, "conversations")


def parse_messages(row: dict[str, Any], where: str) -> InstructionRecord:
    turns = row.get("messages")
    if not isinstance(turns, list):
        raise HarnessError(f"{where}: field 'messages' must be a list")
    parsed = []
    for index, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in ("user", "assistant", "system")
            or not isinstance(turn.get("content"), str)
        ):
            raise HarnessError(f"{where}: field 'messages[{index}]' must be {{role: user|assistant|system, content: str}}")
        parsed.append((turn["role"], turn["content"]))
    return _turns_to_record(parsed, where, "messages")


FORMATS = {
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "messages": parse_messages,
    "phased-scored": parse_phased_scored,
}


def detect_format(row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise HarnessError(f"{where}: each record must be a JSON object, got {type(row).__name__}")
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "data" in row and "score" in row:
        return "phased-scored"
    if "instruction" in row or "output" in row:
        return "alpaca"
    raise HarnessError(
        f"{where}: unrecognised record with fields {sorted(row)}; expected Alpaca (instruction/input/output), "
        "ShareGPT (conversations), chat (messages) or Phased IFT scored (id/score/data)"
    )


def parse_rows(rows: Iterator[tuple[str, Any]], label: str) -> tuple[list[InstructionRecord], str, int]:
    records: list[InstructionRecord] = []
    data_format = ""
    count = 0
    for where, row in rows:
        count += 1
        location = f"{label}: {where}"
        if not data_format:
            data_format = detect_format(row, location)
        if not isinstance(row, dict):
            raise HarnessError(f"{location}: each record must be a JSON object, got {type(row).__name__}")
        records.append(FORMATS[data_format](row, location))
    if count == 0:
        raise HarnessError(f"{label}: no records")
    return records, data_format, count


def _load_hub_dataset(dataset_id: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split="train")
    except Exception as error:  # noqa: BLE001 - any hub/network failure becomes one line
        raise HarnessError(
            f"data '{dataset_id}': not a shipped name or a local file, and loading it from the hub failed "
            f"({type(error).__name__}); shipped: {', '.join(SHIPPED_DATA)}"
        ) from None
    for index, row in enumerate(dataset):
        yield f"record {index}", row


def load_instruction_data(name: str, *, limit: int | None = None, dedupe: bool = True) -> LoadedData:
    """Load a shipped name, a local file (.json/.jsonl[.gz]) or a hub dataset id into canonical records."""
    if name in SHIPPED_DATA:
        path = SHIPPED_DATA[name][0]
        records, data_format, raw_count = parse_rows(read_rows(path), f"data file {path}")
        source = f"shipped:{name}"
    elif user_path(name).exists() or name.endswith((".json", ".jsonl", ".gz")) or name.startswith((".", "/")):
        path = user_path(name)
        records, data_format, raw_count = parse_rows(read_rows(path), f"data file {path}")
        source = str(path)
    elif "/" in name:
        records, data_format, raw_count = parse_rows(_load_hub_dataset(name), f"hub dataset {name}")
        source = f"hub:{name}"
    else:
        from harness.errors import unknown_name

        raise unknown_name("data", name, SHIPPED_DATA)

    loaded = LoadedData(records=[], source=source, format=data_format, raw_count=raw_count)
    seen: set[str] = set()
    for record in records:
        if not record.output.strip():
            loaded.empty_dropped += 1
            continue
        if dedupe:
            if record.id in seen:
                loaded.duplicates_dropped += 1
                continue
            seen.add(record.id)
        loaded.records.append(record)
    if limit is not None:
        loaded.records = loaded.records[:limit]
    if not loaded.records:
        raise HarnessError(f"data '{name}': no usable records (all {raw_count} were empty or duplicates)")
    return loaded
