"""File names as the file system compares them: Windows' NTFS and macOS's APFS (by default) ignore case, so
Cat.png and cat.png name one file there, and two outputs that differ only in case would overwrite each other;
and the one wording of why a path is no folder."""
import os
import sys


def case_insensitive():
    return sys.platform in ("win32", "darwin")


def path_key(path):
    """Equal for two names of one file (symlinks resolved; case folded where the file system ignores it)."""
    path = os.path.realpath(path)
    return os.path.normcase(path).casefold() if case_insensitive() else path


def folder_problem(path):
    """Why `path` cannot be read as a folder ("no such folder", "not a folder"), or None."""
    if os.path.isdir(path):
        return None
    return "not a folder" if os.path.exists(path) else "no such folder"
