"""Crash-safe `save_pretrained` for PeftModels that hold lorta adapters.

PEFT's `PeftModel.save_pretrained` writes README.md, adapter_config.json and adapter_model.safetensors straight
into the target directory (and into `<target>/<name>/` for every adapter not called "default"). A crash or an
error half-way leaves a directory whose config and weights disagree or whose weights file is truncated: the
adapter that was there before is lost and the new one is unreadable.

For models whose adapters are all lorta types (LORTA, TENSLORA, TLORA, ...) the call is redirected here:

1. a temporary directory is created next to the target (same file system), holding a copy of what the target
   already holds (hard links where possible; the files PEFT rewrites are real copies, so an existing README.md
   is updated the same way and other adapters' subfolders are kept, as PEFT does in place);
2. PEFT's own `save_pretrained` writes into it, unchanged (selected_adapters, subfolders, model card, safetensors
   or torch format, every other argument);
3. the files are flushed to disk, then the new directory takes the target's name: with one atomic exchange
   (Linux renameat2 RENAME_EXCHANGE) where available, otherwise by renaming the old directory away and the new
   one in; the old one is deleted afterwards.

Any exception before step 3 deletes the temporary directory and leaves the target exactly as it was. When the
target is (or contains) the process's working directory it cannot be renamed away, so the files are moved in one
by one instead, each with an atomic os.replace (adapter_config.json last). Models
with other adapter types, non-main processes (`is_main_process=False`) and a `save_directory` that is a file
go straight to PEFT. The redirection is installed once by `import lorta` (lorta.save_hook.install).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Files PEFT (re)writes: never hard-linked into the new directory, so writing them cannot touch the old one.
_PEFT_FILES = frozenset({"README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"})


def atomic_save(save: Any, model: Any, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Run `save(model, <tmp dir>, **kwargs)` (PEFT's save_pretrained) and move the result onto `save_directory`."""
    target = os.path.realpath(os.fspath(save_directory))  # a symlinked target keeps its link; the real dir is swapped
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = _unique_name(parent, base, "tmp")
    os.mkdir(tmp)  # the process umask applies, as for a directory PEFT creates
    try:
        if os.path.isdir(target):
            shutil.copymode(target, tmp)
            _copy_tree(target, tmp)
        save(model, tmp, **kwargs)
        _fsync_tree(tmp)
        if _holds_cwd(target):  # renaming the process's working directory away would strand it
            _replace_files(tmp, target)
        else:
            _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_directory(out_dir: str | os.PathLike[str], write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Create `out_dir` whole or not at all: `write(tmp)` fills a fresh temporary sibling, which then takes the
    name. An existing `out_dir` is refused unless `overwrite`, and then replaced in one step (never merged)."""
    target = os.path.realpath(os.fspath(out_dir))
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output path")
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} already exists; choose another output folder or pass --overwrite "
                "(overwrite=True) to replace it"
            )
        if _holds_cwd(target):
            raise FileExistsError(f"{out_dir} holds the working directory and cannot be replaced; run from elsewhere")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = _unique_name(parent, base, "tmp")
    os.mkdir(tmp)
    try:
        write(tmp)
        _fsync_tree(tmp)
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(target)


def write_file(out: str | os.PathLike[str], write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Create the file `out` whole or not at all: `write(tmp)` writes a temporary sibling, flushed, then renamed
    over `out` (refused when `out` exists, unless `overwrite`)."""
    target = os.path.realpath(os.fspath(out))
    if os.path.lexists(target):
        if os.path.isdir(target):
            raise FileExistsError(f"{out} is a directory; choose a file path")
        if not overwrite:
            raise FileExistsError(f"{out} already exists; choose another path or pass --overwrite (overwrite=True)")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = _unique_name(parent, base, "tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return Path(target)


def write_text(out: str | os.PathLike[str], text: str) -> Path:
    """Replace the text file `out` whole or not at all (UTF-8): `write_file` with overwrite."""
    return write_file(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=True)


def _unique_name(parent: str, base: str, kind: str) -> str:
    return os.path.join(parent, f".{base}.{kind}-{uuid.uuid4().hex[:12]}")


def _holds_cwd(target: str) -> bool:
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        return False
    return cwd == target or cwd.startswith(target + os.sep)


def _copy_tree(src: str, dst: str) -> None:
    """Copy `src` into the existing `dst`: links stay links, PEFT's files are copied, the rest hard-linked."""
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        out = dst if rel == "." else os.path.join(dst, rel)
        for name in list(dirs):
            if os.path.islink(os.path.join(root, name)):
                os.symlink(os.readlink(os.path.join(root, name)), os.path.join(out, name))
                dirs.remove(name)
            else:
                os.mkdir(os.path.join(out, name))
                shutil.copymode(os.path.join(root, name), os.path.join(out, name))
        for name in files:
            source, dest = os.path.join(root, name), os.path.join(out, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), dest)
                continue
            if name not in _PEFT_FILES:
                try:
                    os.link(source, dest)
                    continue
                except OSError:
                    pass
            shutil.copy2(source, dest)


def _replace_files(new: str, target: str) -> None:
    """Fallback when the target cannot be renamed: move each file in with an atomic os.replace."""
    for root, _dirs, files in os.walk(new):
        rel = os.path.relpath(root, new)
        out = target if rel == "." else os.path.join(target, rel)
        os.makedirs(out, exist_ok=True)
        for name in sorted(files, key=lambda n: n == "adapter_config.json"):  # the config last
            os.replace(os.path.join(root, name), os.path.join(out, name))
        _fsync_dir(out)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _swap_into_place(new: str, target: str) -> None:
    parent, base = os.path.split(target)
    if not os.path.lexists(target):
        os.rename(new, target)
        _fsync_dir(parent)
        return
    if not os.path.isdir(target) or os.path.islink(target):
        raise NotADirectoryError(f"cannot save an adapter over {target}: it exists and is not a directory")
    if _exchange(new, target):  # `new` now holds the old content; the caller deletes it
        _fsync_dir(parent)
        return
    old = _unique_name(parent, base, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _renameat2() -> Any:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    func = _renameat2()
    if func is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if func(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {a} and {b} failed: {os.strerror(err)}")
