"""Output paths: one rule for every command and job, applied before any work is done.

Missing parent folders are created. A path is refused, with one line naming the argument and
the path, when one of its folders is a file, when a file is expected and the path is a folder
(or the reverse), or when its folder cannot be written. Commands check their outputs this way
before loading data or calling the model, so a mistake costs nothing; the writers in
``fastddim.images`` then never fail on the path itself.
"""
from __future__ import annotations

import os

__all__ = ["output_file", "output_folder"]


def output_file(path: str | os.PathLike, arg: str) -> str:
    """Check that ``path`` can be written as a file (creating its missing parent folders).

    ``arg`` names the argument in the message (``"-o"``, ``"out"``). Returns the path as a str.
    Raises ValueError.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{arg} {path}: is a folder; a file name is expected here")
    _make_folder(os.path.dirname(path) or ".", path, arg)
    return path


def output_folder(path: str | os.PathLike, arg: str) -> str:
    """Check that ``path`` is, or can be made, a writable folder (creating it and its parents).

    Returns the path as a str. Raises ValueError.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{arg} {path}: is a file; a folder is expected here")
    _make_folder(path, path, arg)
    return path


def _make_folder(folder: str, path: str, arg: str) -> None:
    existing = folder
    while not os.path.exists(existing):  # a file in the way makes every path below it "missing"
        parent = os.path.dirname(existing)
        if not parent or parent == existing:
            break
        existing = parent
    if os.path.exists(existing) and not os.path.isdir(existing):
        raise ValueError(f"{arg} {path}: {existing} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{arg} {path}: cannot create the folder {folder} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{arg} {path}: the folder {folder} is not writable")
