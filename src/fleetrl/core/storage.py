"""Where a run's outputs live, and how a checkpoint becomes durable there.

A location is a local path (a node's disk or a shared mount such as NFS/EFS/Filestore) or an
fsspec URI (``s3://bucket/prefix``; S3 and compatible stores through s3fs, credentials and endpoint
from the usual AWS environment variables or ``run.storage_options``). Learner ranks, the driver and
the CLI all use this one module, so every node writes the same way.

The durability protocol (checkpoints and final models alike):
  1. ``begin``: clear what a crashed writer left at the staging location (``<name>.tmp`` on a file
     system; the final name itself on an object store, which has no rename).
  2. Each writer (a learner rank) writes into a local scratch dir, checks free space first, then
     ``commit_rank_files`` moves/uploads its files (fsynced on a file system) and writes
     ``.manifest-rank-<i>.json`` (name -> size) last.
  3. ``verify_complete`` (the driver): every rank's manifest present and every file listed there
     present with its size, wherever the ranks ran.
  4. ``publish``: rename staging -> final (file system) and write ``COMPLETE`` last. Readers trust
     only directories with ``COMPLETE``; ``prune`` deletes older complete ones after a newer is done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
STAGING_SUFFIX = ".tmp"
_MANIFEST = ".manifest-rank-{}.json"
_MANIFEST_RE = re.compile(r"^\.manifest-rank-(\d+)\.json$")
# Leave this fraction on top of an estimate: file system metadata, the estimate's own error.
FREE_SPACE_MARGIN = 10  # percent


class StorageError(RuntimeError):
    """An output location that cannot be written or read as needed; the message says where and why."""


def is_remote(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` URIs other than file://."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


class Storage:
    """File operations on local paths or fsspec URIs. ``options``: fsspec/s3fs keyword arguments
    (``endpoint_url``, ``key``, ``secret``, ``client_kwargs``...); empty = the environment's."""

    def __init__(self, options: dict[str, Any] | None = None):
        # As configured (``${env:NAME}`` references kept: what is handed to other processes); each
        # process resolves them from its own environment when it first opens the store.
        self.options = dict(options or {})
        self._resolved: dict[str, Any] | None = None

    # ------------------------------------------------------------------ basics

    def _fs(self, location: str):
        import fsspec

        try:
            if self._resolved is None:
                from fleetrl.core.secrets import resolve_env_refs

                self._resolved = resolve_env_refs(self.options, "run.storage_options")
            fs, path = fsspec.core.url_to_fs(location, **self._resolved)
        except ImportError as e:
            raise StorageError(f"{location}: this storage needs an extra package ({e}); for s3:// install "
                               "fleetrl[s3] (s3fs)") from None
        return fs, path

    def join(self, base: str | os.PathLike, *parts: str) -> str:
        if is_remote(base):
            return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
        return os.path.join(str(base), *parts)

    @staticmethod
    def name(location: str | os.PathLike) -> str:
        return str(location).rstrip("/").rsplit("/", 1)[-1]

    @staticmethod
    def parent(location: str | os.PathLike) -> str:
        text = str(location).rstrip("/")
        return text.rsplit("/", 1)[0] if is_remote(text) else str(Path(text).parent)

    def exists(self, location: str) -> bool:
        if not is_remote(location):
            return os.path.exists(location)
        fs, path = self._fs(location)
        fs.invalidate_cache(path)
        return fs.exists(path)

    def listdir(self, location: str) -> list[str]:
        """Names directly under ``location`` ([] if it does not exist)."""
        if not is_remote(location):
            return sorted(os.listdir(location)) if os.path.isdir(location) else []
        fs, path = self._fs(location)
        fs.invalidate_cache(path)
        try:
            return sorted(self.name(p) for p in fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            return []

    def makedirs(self, location: str) -> None:
        if not is_remote(location):
            os.makedirs(location, exist_ok=True)  # an object store has no directories to make

    def read_text(self, location: str) -> str:
        if not is_remote(location):
            return Path(location).read_text()
        fs, path = self._fs(location)
        return fs.cat_file(path).decode()

    def write_text(self, location: str, text: str) -> None:
        """Whole-file write that a reader never sees half done (temp file + fsync + rename locally;
        one PUT on an object store)."""
        if is_remote(location):
            fs, path = self._fs(location)
            fs.pipe_file(path, text.encode())
            return
        os.makedirs(os.path.dirname(location) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(location) or ".", prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, location)
        _fsync_dir(os.path.dirname(location) or ".")

    def remove(self, location: str) -> None:
        """Delete a file or a whole tree; nothing there is fine."""
        if not is_remote(location):
            if os.path.isdir(location):
                shutil.rmtree(location)
            elif os.path.exists(location):
                os.remove(location)
            return
        fs, path = self._fs(location)
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def file_sizes(self, location: str) -> dict[str, int]:
        """{path relative to ``location``: size} of every file below it."""
        if not is_remote(location):
            out = {}
            for root, _, files in os.walk(location):
                for f in files:
                    full = os.path.join(root, f)
                    out[os.path.relpath(full, location).replace(os.sep, "/")] = os.path.getsize(full)
            return out
        fs, path = self._fs(location)
        fs.invalidate_cache(path)
        path = path.rstrip("/")
        found = fs.find(path, detail=True, withdirs=False)
        return {k[len(path) + 1:]: int(v.get("size") or 0) for k, v in found.items() if k.startswith(path + "/")}

    def upload_file(self, local_file: str, location: str, move: bool = False) -> None:
        """Copy (or, on the same file system, move) a local file to ``location``, durably."""
        if is_remote(location):
            fs, path = self._fs(location)
            fs.put_file(local_file, path)
            return
        os.makedirs(os.path.dirname(location), exist_ok=True)
        if move:
            os.replace(local_file, location)
        else:
            shutil.copyfile(local_file, location)
        with open(location, "rb+") as f:
            os.fsync(f.fileno())

    def download_tree(self, location: str, local_dir: str) -> None:
        """Every file below ``location`` into ``local_dir`` (same relative paths)."""
        if not is_remote(location):
            shutil.copytree(location, local_dir, dirs_exist_ok=True)
            return
        fs, path = self._fs(location)
        for rel in self.file_sizes(location):
            dest = os.path.join(local_dir, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get_file(f"{path.rstrip('/')}/{rel}", dest)

    def free_bytes(self, location: str) -> int | None:
        """Free bytes on the file system holding ``location`` (None for object stores: no such limit)."""
        if is_remote(location):
            return None
        probe = Path(location).absolute()
        while not probe.exists():
            probe = probe.parent
        return shutil.disk_usage(probe).free


def _fsync_dir(path: str) -> None:
    """Make a rename or a new file in ``path`` survive a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- the durability protocol


def check_free_space(storage: Storage, location: str, needed_bytes: int, what: str) -> None:
    """Raise StorageError if the file system of ``location`` has less than ``needed_bytes`` (x margin) free."""
    free = storage.free_bytes(location)
    needed = needed_bytes + needed_bytes * FREE_SPACE_MARGIN // 100
    if free is not None and free < needed:
        raise StorageError(
            f"not enough free space for {what} at {location}: needs about {needed:,} bytes, "
            f"{free:,} free; free some space, lower run.keep_last, or point run.output_dir (or "
            "FLEETRL_SCRATCH for learner scratch files) at a larger disk")


def staging_location(final: str) -> str:
    """Where a checkpoint is written before it is published (an object store writes in place)."""
    return final if is_remote(final) else final.rstrip("/") + STAGING_SUFFIX


def begin(storage: Storage, final: str) -> str:
    """Clear leftovers of an interrupted write of ``final``; return the staging location to write to."""
    staging = staging_location(final)
    storage.remove(staging)
    if staging != final:
        storage.makedirs(staging)
    return staging


def private_dir(parent: str | os.PathLike) -> Path:
    """``parent/fleetrl-<uid>``: this user's own directory under a shared one (/tmp, /dev/shm), made
    0700. Refused unless it is a real directory (not a symlink) owned by this user that nobody else
    can write: in a shared directory another user could otherwise plant a link or files there first."""
    path = Path(parent) / f"fleetrl-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    _refuse_unsafe(path, f"the scratch directory {path}")
    return path


def _refuse_unsafe(path: Path, what: str) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{what} is not a plain directory (a symlink or a file): remove it, or set "
                           "FLEETRL_SCRATCH to a private directory")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise StorageError(f"{what} belongs to another user or others can write into it (owner uid {st.st_uid}, "
                           f"mode {stat.S_IMODE(st.st_mode):o}): remove it, or set FLEETRL_SCRATCH to a "
                           "directory only you can write")


def scratch_root() -> Path:
    """Where this process writes local scratch (the driver's log mirror, ranks' files before upload):
    ``FLEETRL_SCRATCH`` when set (it must be a directory only this user can write), else this user's
    own directory in the system's temp dir (``private_dir``)."""
    env = os.environ.get("FLEETRL_SCRATCH")
    if not env:
        return private_dir(tempfile.gettempdir())
    path = Path(env).expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _refuse_unsafe(path.resolve(), f"FLEETRL_SCRATCH={env}")
    return path


def scratch_dir(storage: Storage, staging: str, rank: int) -> str:
    """A local directory where rank ``rank`` writes before committing: inside the staging dir on a
    file system (moving out is then a rename), else a temp dir (``FLEETRL_SCRATCH``, or the system's)."""
    if not is_remote(staging):
        path = os.path.join(staging, f".scratch-rank-{rank}")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path
    return tempfile.mkdtemp(prefix=f"fleetrl-rank{rank}-", dir=scratch_root())


def commit_rank_files(storage: Storage, scratch: str, staging: str, rank: int) -> dict[str, int]:
    """Move/upload every file of ``scratch`` into ``staging`` and write this rank's manifest last.
    Returns the manifest ({relative path: size}); ``scratch`` is removed."""
    files: dict[str, int] = {}
    move = not is_remote(staging)
    for root, _, names in os.walk(scratch):
        for n in names:
            full = os.path.join(root, n)
            rel = os.path.relpath(full, scratch).replace(os.sep, "/")
            files[rel] = os.path.getsize(full)
            storage.upload_file(full, storage.join(staging, *rel.split("/")), move=move)
    if move:
        _fsync_tree_dirs(staging)
    shutil.rmtree(scratch, ignore_errors=True)
    storage.write_text(storage.join(staging, _MANIFEST.format(rank)), json.dumps(files, indent=0) + "\n")
    return files


def _fsync_tree_dirs(root: str) -> None:
    for d, _, _ in os.walk(root):
        _fsync_dir(d)


def verify_complete(storage: Storage, staging: str, num_ranks: int, what: str) -> int:
    """Check that ranks 0..num_ranks-1 all committed, and that every file they listed is there with
    its size. Returns the bytes written; raises StorageError naming what is missing."""
    present = storage.file_sizes(staging)
    missing_ranks = [r for r in range(num_ranks) if _MANIFEST.format(r) not in present]
    if missing_ranks:
        raise StorageError(f"{what} at {staging} is incomplete: rank(s) {missing_ranks} of {num_ranks} did not "
                           "commit their files (no manifest); it will not be used")
    bad, total = [], 0
    for r in range(num_ranks):
        listed = json.loads(storage.read_text(storage.join(staging, _MANIFEST.format(r))))
        for rel, size in listed.items():
            if present.get(rel) != size:
                bad.append(f"{rel} (rank {r}: expected {size} bytes, found {present.get(rel)})")
            total += size
    if bad:
        raise StorageError(f"{what} at {staging} is incomplete: {', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}; it will not be used")
    return total


def publish(storage: Storage, staging: str, final: str, note: str) -> None:
    """Make a verified ``staging`` the ``final`` directory: rename (file system), then COMPLETE last."""
    if staging != final:
        storage.remove(final)  # an older, incomplete write of the same name (never a complete one we keep)
        os.replace(staging, final)
        _fsync_dir(os.path.dirname(final.rstrip("/")) or ".")
    storage.write_text(storage.join(final, COMPLETE), note)


def is_complete(storage: Storage, location: str) -> bool:
    return storage.exists(storage.join(location, COMPLETE))


_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_checkpoints(storage: Storage, root: str) -> list[str]:
    """Complete ``step-N`` directories under ``root``, oldest first."""
    names = [n for n in storage.listdir(root) if _STEP_DIR.match(n)]
    names.sort(key=lambda n: int(_STEP_DIR.match(n).group(1)))
    return [loc for n in names if is_complete(storage, loc := storage.join(root, n))]


def prune(storage: Storage, root: str, keep_last: int) -> list[str]:
    """Keep the newest ``keep_last`` complete checkpoints (0 = all); delete older complete ones and any
    incomplete leftovers. Call only after a newer checkpoint is complete. Returns what was deleted."""
    complete = complete_checkpoints(storage, root)
    if not complete:
        return []
    keep = set(complete if keep_last <= 0 else complete[-keep_last:])
    gone = []
    for n in storage.listdir(root):
        loc = storage.join(root, n)
        torn = (_STEP_DIR.match(n) or n.endswith(STAGING_SUFFIX)) and loc not in complete
        if (loc in complete and loc not in keep) or torn:
            storage.remove(loc)
            gone.append(loc)
    return gone
