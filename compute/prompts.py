"""Prompt files: `.txt` (one prompt per line) or `.jsonl` (`text` and optional `target`,
`distractor`, `corrupt`, `position`, and `meta`: a JSON object describing the prompt, e.g. its
IOI name order, which actwh reads past). `prompt_id` is the prompt's 0-based line in its file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from actwh.errors import PromptError

JSONL_KEYS = {"text", "target", "distractor", "corrupt", "position", "meta"}


@dataclass(frozen=True)
class PromptSpec:
    prompt_id: int
    text: str
    target: str | int | None = None  # a token string (" Mary") or a token id
    distractor: str | int | None = None
    corrupt: str | None = None  # the corrupted counterpart, for edge baselines
    position: int | None = None  # scored position; None = the last token


def read_prompts(path: str | Path) -> list[PromptSpec]:
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PromptError(f"{path} is not UTF-8 text: {e}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise PromptError(f"{path}: a .json file is not read; give .jsonl (one JSON object per "
                          "line) or .txt (one prompt per line)")
    if suffix == ".jsonl":
        prompts = [_jsonl_line(path, i, line) for i, line in enumerate(lines) if line.strip()]
    else:
        prompts = [PromptSpec(i, line) for i, line in enumerate(lines) if line.strip()]
    if not prompts:
        raise PromptError(f"{path} holds no prompts")
    return prompts


def _jsonl_line(path: Path, i: int, line: str) -> PromptSpec:
    where = f"{path}:{i + 1}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptError(f"{where}: malformed JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise PromptError(f"{where}: each line needs a JSON object with a string \"text\"")
    unknown = set(row) - JSONL_KEYS
    if unknown:
        raise PromptError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(JSONL_KEYS)}")
    if not row["text"].strip():
        raise PromptError(f"{where}: \"text\" is empty")
    for key in ("target", "distractor"):
        value = row.get(key)
        if key in row and (isinstance(value, bool) or not isinstance(value, (str, int))
                           or value == ""):
            raise PromptError(f"{where}: {key} must be a token string or a token id, not "
                              f"{json.dumps(value)}")
    if "position" in row and (isinstance(row["position"], bool)
                              or not isinstance(row["position"], int)):
        raise PromptError(f"{where}: position must be an integer, not {json.dumps(row['position'])}")
    if "corrupt" in row and not isinstance(row["corrupt"], str):
        raise PromptError(f"{where}: corrupt must be a text, not {json.dumps(row['corrupt'])}")
    if "meta" in row and not isinstance(row["meta"], dict):
        raise PromptError(f"{where}: meta must be a JSON object, not {json.dumps(row['meta'])}")
    return PromptSpec(i, row["text"], row.get("target"), row.get("distractor"), row.get("corrupt"),
                      row.get("position"))


def token_id(tokenizer, value: str | int, what: str, prompt_id: int) -> int:
    """A target given as a token string or id, as one token id (refusing multi-token strings)."""
    if isinstance(value, int):
        if not 0 <= value < len(tokenizer):
            raise PromptError(f"prompt {prompt_id}: {what} id {value} is outside the vocabulary")
        return value
    ids = tokenizer(value, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise PromptError(f"prompt {prompt_id}: {what} {value!r} is {len(ids)} tokens, not one")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and value.strip() != tokenizer.unk_token:
        raise PromptError(f"prompt {prompt_id}: {what} {value!r} is not in the vocabulary "
                          f"(it would become {tokenizer.unk_token})")
    return ids[0]
