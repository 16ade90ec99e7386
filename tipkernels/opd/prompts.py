"""Prompt files: JSON Lines with one ``{"prompt": "..."}`` object per line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Union

PROMPT_KEYS = ("prompt", "text")


def load_prompts(path: Union[str, Path], key: str = "prompt") -> List[str]:
    """Read prompts from a JSONL file: each non-blank line a JSON object with a non-empty string under ``key``
    (``"prompt"``; ``"text"`` is accepted when ``key`` is the default), or a bare JSON string.

    Raises FileNotFoundError if the file is missing, ValueError naming the line for malformed JSON, a missing
    key, a non-string or empty prompt, or a file without prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist (expected JSONL: one "
                                f'{{"{key}": "..."}} per line)')
    prompts: List[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); expected one "
                                 f'{{"{key}": "..."}} object per line') from None
            if isinstance(obj, dict):
                keys = (key,) if key != "prompt" else PROMPT_KEYS
                found = next((k for k in keys if k in obj), None)
                if found is None:
                    raise ValueError(f"{path}:{n}: object has no {key!r} field (fields: {sorted(obj)})")
                obj = obj[found]
            if not isinstance(obj, str):
                raise ValueError(f"{path}:{n}: the prompt must be a string, got {type(obj).__name__}")
            if not obj:
                raise ValueError(f"{path}:{n}: empty prompt")
            prompts.append(obj)
    if not prompts:
        raise ValueError(f"prompts file {path} contains no prompts")
    return prompts
