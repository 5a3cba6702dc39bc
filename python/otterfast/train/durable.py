"""Folders that survive a power loss: written aside, fsynced, renamed into place; the last good copy is never
deleted before its replacement is durable. Used by the checkpoints (checkpoint.py) and the export (export.py).

    publish(tmp, final)   tmp (complete) becomes final; an existing final is first renamed to aside(final), then
                          tmp is renamed in, the parent fsynced, and only then the old copy removed
    recover(final)        a leftover aside(final) from a publish cut short: put back if final is missing, removed
                          if final is there (the new copy made it)
    remove(path)          delete a folder by renaming it to a hidden name first, so that a deletion cut short never
                          leaves a half-deleted folder under its real name

Why each fsync: a rename is atomic, but after a power loss it may be on disk while the renamed files' data is not
(a complete-looking folder of truncated files), unless every file was fsynced before; the folder's own entries
(file names) are fsynced too, and the parent after the rename so that the rename itself is durable.
"""

from __future__ import annotations

import os
import shutil

ASIDE = ".old-"  # aside(final): the previous copy while its replacement is renamed in
TRASH = ".del-"  # a folder being deleted


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)  # on Linux an fsync through a read-only descriptor flushes the file's data
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file under `path`, then every folder (deepest first, `path` last). A file fsynced again costs
    microseconds (nothing dirty), so every rank may fsync the whole tree (on a shared file system a rank can only
    flush what it wrote itself)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(root)


def aside(final: str) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, ASIDE + name)


def remove(path: str) -> None:
    """Delete a folder: renamed to a hidden name first (atomic), then removed; `clean_trash` finishes a removal
    that was cut short."""
    if not os.path.exists(path):
        return
    parent, name = os.path.split(os.path.abspath(path))
    trash = os.path.join(parent, TRASH + name)
    if os.path.exists(trash):
        shutil.rmtree(trash)
    os.rename(path, trash)
    fsync_dir(parent)
    shutil.rmtree(trash)


def clean_trash(parent: str) -> None:
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if name.startswith(TRASH):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def recover(final: str) -> None:
    """Finish a publish that was cut short (see the module docstring). Nothing to do in the usual case."""
    old = aside(final)
    if not os.path.exists(old):
        return
    if os.path.exists(final):
        remove(old)  # the new copy was renamed in (and is durable: the parent was fsynced before the removal)
    else:
        os.rename(old, final)  # cut short between the two renames: the old copy is the last good one
        fsync_dir(os.path.dirname(os.path.abspath(final)))


def publish(tmp: str, final: str) -> None:
    """Make the complete folder `tmp` the folder `final`, replacing any previous `final` without a moment in which
    neither a complete old nor a complete new copy is on disk."""
    parent = os.path.dirname(os.path.abspath(final))
    fsync_tree(tmp)
    recover(final)
    replacing = os.path.exists(final)
    if replacing:
        os.rename(final, aside(final))
    os.rename(tmp, final)
    fsync_dir(parent)
    if replacing:
        remove(aside(final))
