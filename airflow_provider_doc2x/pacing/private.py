"""The host-local pacing state's folder and files, private to the user that runs the workers.

A window file that another local user can reach lets that user steer every upload of the host: a
slot dated far ahead stalls them, a symlink makes the worker overwrite any file it can write. So the
folder must be ours (checked with ``lstat``: a symlink to a folder is not ours) and closed to group
and others (mode 0700), and a window file is opened without following a symlink (``O_NOFOLLOW``),
created with mode 0600 and checked on its open descriptor (``fstat``): ours, a regular file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

#: Created with these modes; a folder or file of ours that is more open is closed to them.
FOLDER_MODE = 0o700
FILE_MODE = 0o600


class NotPrivateError(OSError):
    """A pacing folder or window file that this user must not trust; ``reason`` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason


def is_private_dir(path: Path) -> bool:
    """Whether ``path`` is a real folder (not a symlink) of this user, closed to group and others."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077


def open_private_dir(path: Path) -> int:
    """Create ``path`` (mode 0700) if missing and return a descriptor of it, once it is known to be ours.

    Raises:
        NotPrivateError: ``path`` is a symlink, not a folder, or belongs to another user.
        OSError: the folder cannot be created or opened.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, FOLDER_MODE)
    seen = os.lstat(path)
    if stat.S_ISLNK(seen.st_mode):
        raise NotPrivateError(path, "is a symbolic link")
    if not stat.S_ISDIR(seen.st_mode):
        raise NotPrivateError(path, "is not a folder")
    if seen.st_uid != os.geteuid():
        raise NotPrivateError(path, f"belongs to uid {seen.st_uid}, not to this user (uid {os.geteuid()})")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino) or opened.st_uid != os.geteuid():
            raise NotPrivateError(path, "was replaced while it was being opened")
        if opened.st_mode & 0o077:
            os.fchmod(fd, FOLDER_MODE)  # ours, but open to others: close it
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_file(folder: Path, name: str) -> int:
    """Open (creating it with mode 0600) the file ``name`` of a private folder; return its descriptor.

    Raises:
        NotPrivateError: the folder is not ours (see :func:`open_private_dir`), or the file is a
            symlink, not a regular file, or belongs to another user.
        OSError: the folder or file cannot be created or opened.
    """
    dir_fd = open_private_dir(folder)
    try:
        try:
            fd = os.open(
                name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=dir_fd
            )
        except OSError as error:
            if error.errno == errno.ELOOP:  # what O_NOFOLLOW answers for a symlink
                raise NotPrivateError(folder / name, "is a symbolic link") from error
            raise
    finally:
        os.close(dir_fd)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise NotPrivateError(folder / name, "is not a regular file")
        if opened.st_uid != os.geteuid():
            raise NotPrivateError(
                folder / name, f"belongs to uid {opened.st_uid}, not to this user (uid {os.geteuid()})"
            )
        if opened.st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd
