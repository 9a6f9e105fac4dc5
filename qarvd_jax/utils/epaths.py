"""Output paths that may be URLs (``gs://bucket/run``), through ``etils.epath`` as Orbax does.

A URL must never silently become a local folder (``os.makedirs("gs://b/x")`` creates ``./gs:/b/x``),
so every output path of a run goes through :func:`out_path` first: local paths become absolute
``epath.Path``s, URLs of a scheme ``etils.epath`` handles stay URLs, any other scheme is refused.
"""

from __future__ import annotations

import os
import shutil

from etils import epath

__all__ = ["URL_SCHEMES", "is_url", "out_path", "check_url_backend", "copy_tree"]

URL_SCHEMES = ("gs", "s3", "az", "hf")  # the URL schemes etils.epath (and so Orbax) reads and writes


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def out_path(path: str | os.PathLike) -> epath.Path:
    """``epath.Path`` of an output: local paths absolute, supported URLs untouched, others refused."""
    s = os.fspath(path)
    if not is_url(s):
        return epath.Path(os.path.abspath(s))
    scheme = s.split("://", 1)[0]
    if scheme not in URL_SCHEMES:
        raise ValueError(f"{s}: URL scheme {scheme}:// is not supported (etils.epath handles "
                         f"{', '.join(f'{x}://' for x in URL_SCHEMES)}); use one of those or a mounted path")
    return epath.Path(s)


def check_url_backend(path: epath.Path) -> None:
    """Touch ``path`` (create the folder) so a missing file-system client fails before any heavy work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except ImportError as e:  # fsspec without gcsfs / s3fs / adlfs, and no tensorflow
        raise ValueError(f"{path}: writing to this URL needs a file-system client etils.epath can use "
                         f"({e}; e.g. `pip install gcsfs` for gs://)") from e


def copy_tree(src: str | os.PathLike, dst: epath.Path, chunk: int = 16 << 20) -> None:
    """Copy the local folder ``src`` into ``dst`` (local or URL), file by file, streamed."""
    src = os.fspath(src)
    for root, _dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else dst.joinpath(*rel.split(os.sep))
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            with open(os.path.join(root, name), "rb") as fi, target.joinpath(name).open("wb") as fo:
                shutil.copyfileobj(fi, fo, chunk)
