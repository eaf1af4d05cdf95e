"""Where training text comes from: the user's files and folders, or, by default, the
Python standard library's own source files on this machine (no download needed)."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".json", ".toml", ".cfg", ".html",
                 ".tex", ".csv", ".yaml", ".yml", ".sh", ".js", ".ts", ".java", ".go", ".rs"}


def default_corpus_files() -> list[Path]:
    """Every .py file of the running Python's standard library (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given (refused if binary); folders expanded to the text files under them,
    sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {path}")
            files += found
        elif path.is_file():
            with open(path, "rb") as f:             # git's test: text has no NUL bytes
                if b"\0" in f.read(8192):
                    raise ValueError(f"{item}: a binary file (NUL bytes in its first 8 KiB), "
                                     f"not text")
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return files


def read_texts(files: list[Path]) -> list[str]:
    """The documents, decoded as UTF-8 (undecodable bytes replaced)."""
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def cache_dir() -> Path:
    """Where prepared data is cached: $REFGPT_CACHE, else ~/.cache/refgpt."""
    return Path(os.environ.get("REFGPT_CACHE", Path.home() / ".cache" / "refgpt"))
