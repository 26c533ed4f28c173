"""The calibration tokens of AWQ and GPTQ: windows of a local text file, never anything fetched.

By default kiln's shipped `kiln/eval/data/calibration.txt` (passages of the training portion of the reference models'
books; never the held-out text perplexity is measured on), or `--calib_dataset FILE` (plain UTF-8 text). The text is
tokenized with the model's own tokenizer and cut into consecutive windows of `length` tokens, of which `sequences`
are drawn at random (seeded). Dummy weights have no tokenizer: they calibrate on seeded random token ids.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.config import ConfigError

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "eval" / "data" / "calibration.txt"
MAX_TEXT_BYTES = 64 << 20  # more text than this is never needed for a few hundred windows


def read_text(dataset: str | None) -> str:
    path = Path(dataset) if dataset else DEFAULT_TEXT
    if not path.is_file():
        raise ConfigError(f"--calib_dataset {dataset} is not a file; give a local UTF-8 text file (kiln never "
                          "downloads a dataset), or leave the flag out for kiln's shipped calibration text")
    with path.open("rb") as f:
        raw = f.read(MAX_TEXT_BYTES)
    try:
        return raw.decode("utf-8", errors="ignore" if len(raw) == MAX_TEXT_BYTES else "strict")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--calib_dataset {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def windows(ids: list[int], sequences: int, length: int, seed: int) -> torch.Tensor:
    """`sequences` random windows (or all there are) of `length` consecutive ids -> [n, length] int64."""
    count = len(ids) // length
    if count == 0:
        raise ConfigError(f"the calibration text has {len(ids)} tokens, fewer than one window of "
                          f"--calib_max_seq_length {length}; give a longer --calib_dataset or a shorter length")
    all_windows = torch.tensor(ids[: count * length], dtype=torch.int64).view(count, length)
    gen = torch.Generator().manual_seed(seed)
    return all_windows[torch.randperm(count, generator=gen)[:sequences]]


def calibration_tokens(model_dir: str | None, vocab_size: int, sequences: int, length: int, seed: int,
                       dataset: str | None = None) -> torch.Tensor:
    """[n <= sequences, length] token ids for calibration."""
    if model_dir is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (sequences, length), generator=gen)
    from kiln.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir)
    except Exception as err:  # noqa: BLE001 - any reason a tokenizer cannot be made is the same message here
        raise ConfigError(f"AWQ/GPTQ calibration reads text through the model's tokenizer, and {model_dir} has none "
                          f"kiln can load ({err})") from err
    return windows(tokenizer.encode(read_text(dataset)), sequences, length, seed)
