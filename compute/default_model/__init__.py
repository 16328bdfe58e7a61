"""The embedded default model: a small GPT-2 trained by `train.py` on the generated corpus of
`corpus.py`, shipped in `weights/`, with example prompt files in `prompts/`."""

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
PROMPTS = Path(__file__).parent / "prompts"


def default_prompts(kind: str = "ioi") -> Path:
    """Example prompts shipped for the default model: ioi, induction or successor."""
    return PROMPTS / f"{kind}.jsonl"
