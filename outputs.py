"""Writing results: atomically, all or none, with the user's umask.

Used by the command line and by `tiny/demo.py` (library code never imports the command line).

- `check_target(path, folder)` finds, before any computation, what would make the write fail
  (a folder where a file is wanted, a read-only folder, a name too long) and names the user's path.
- `save_image_atomic(image, path)` writes one PNG beside `path` and renames it into place.
- `Staged(folder, force)` collects a command's files in a hidden folder and moves them into
  `folder` only when the command succeeds; on any failure (an exception, Ctrl-C) nothing new
  remains, overwritten files come back, and no temporary file is left.

New files get mode 0666 minus the umask, as `open()` would give them; an overwritten file keeps its
mode. (`tempfile.mkstemp` creates 0600 files, so a plain mkstemp + rename would turn 0644 into 0600.)
"""
import json
import os
import shutil
import tempfile


def umask():
    mask = os.umask(0o022)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def _existing_ancestor(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_target(path, folder=False):
    """Raise ValueError naming `path` if writing it (a file, or a folder of files) would fail."""
    full = os.path.abspath(path)
    if folder and os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"--out {path} is a file; a folder is wanted")
    if not folder and os.path.isdir(full):
        raise ValueError(f"--out {path} is a folder; a file name is wanted")
    base = _existing_ancestor(full if folder else os.path.dirname(full))
    if not os.path.isdir(base):
        raise ValueError(f"--out {path}: {base} is a file, not a folder")
    limit = os.pathconf(base, "PC_NAME_MAX")
    for part in os.path.relpath(full, base).split(os.sep):
        if len(os.fsencode(part)) > limit:
            raise ValueError(f"--out {path}: the name {part[:20]}... is {len(os.fsencode(part))} bytes, "
                             f"longer than this file system's limit of {limit}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {base} is not writable")


def _write_png(image, path, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    with os.fdopen(fd, "wb") as f:
        image.save(f, format="PNG")
    if mode is not None:
        os.chmod(path, mode)


class Text(str):
    """Text written by `Staged.save` like an image (it calls `.save(file, format=...)`): HTML, CSV."""

    def save(self, f, format=None):
        f.write(self.encode("utf-8"))


def _mode_of(path):
    return os.stat(path).st_mode & 0o7777 if os.path.exists(path) else None


def save_image_atomic(image, path):
    """Write a PNG to a hidden file beside `path`, then rename: a crash never leaves half a PNG."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)[:200]}.{os.urandom(4).hex()}.tmp")
    try:
        _write_png(image, tmp, _mode_of(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Staged:
    """`with Staged(folder, force) as out: out.save(image, "a.png")`: all of the files or none.

    The staging folder lies inside `folder` if it exists, else in its nearest existing parent, so
    that the final moves are renames on one file system."""

    def __init__(self, folder, force=False):
        self.folder, self.force, self.names = os.path.abspath(folder), force, []

    def __enter__(self):
        self.stage = tempfile.mkdtemp(prefix=".sdlens-", dir=_existing_ancestor(self.folder))
        return self

    def save(self, image, name):
        if os.sep in name or name in self.names:
            raise ValueError(f"output name {name!r} is not a new plain file name")
        if os.path.exists(os.path.join(self.folder, name)) and not self.force:
            raise ValueError(f"{os.path.join(self.folder, name)} exists; pass --force or choose another --out")
        _write_png(image, os.path.join(self.stage, name), None)
        self.names.append(name)

    def __exit__(self, kind, value, tb):
        try:
            if kind is None:
                self._commit()
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)

    def _commit(self):
        made, moved = [], []  # folders this created; (target, backup or None, staged file)
        try:
            path = self.folder
            while not os.path.exists(path):
                made.append(path)
                path = os.path.dirname(path)
            os.makedirs(self.folder, exist_ok=True)
            for name in self.names:
                dst, src = os.path.join(self.folder, name), os.path.join(self.stage, name)
                backup = None
                if os.path.lexists(dst):
                    if not self.force:
                        raise ValueError(f"{dst} exists; pass --force or choose another --out")
                    os.chmod(src, _mode_of(dst))
                    backup = src + ".old"
                    os.replace(dst, backup)
                moved.append((dst, backup, src))
                os.replace(src, dst)
        except BaseException:
            undo_moves(moved, made)
            raise


def undo_moves(moved, made):
    """Undo an all-or-none write that failed part way: each (target, backup or None, staged file) in
    `moved` is taken out again and its backup put back, then the folders in `made` (deepest first) go."""
    for dst, backup, src in reversed(moved):
        if not os.path.exists(src) and os.path.lexists(dst):
            os.unlink(dst)
        if backup is not None:
            os.replace(backup, dst)
    for path in made:
        os.rmdir(path)


def read_resume_log(path, settings, valid=lambda record: True) -> list:
    """The records of a JSON-lines resume log whose first line equals `settings`; [] if there is no log.

    A log written with other settings (another model, prediction type, metric model, device, step
    count, method list or changed input files: `settings` holds a `fingerprint` of them) is refused
    with a one-line ValueError that says how to start afresh: reusing it would silently mix results.
    Each record must pass `valid(record)`; a bad one is refused the same way, except the last line,
    which an interruption may have cut short (it is dropped, and its work done again)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    fix = f"delete {path} to start afresh"
    try:
        head = json.loads(lines[0]) if lines else None
    except ValueError:
        head = None
    if head != settings:
        differ = sorted(k for k in set(settings) | set(head or {}) if (head or {}).get(k) != settings.get(k)) \
            if isinstance(head, dict) else ["its first line is not a settings record"]
        raise ValueError(f"{path} is the resume log of a run with other settings ({', '.join(differ)}); rerun with "
                         f"those settings to resume, or {fix}")
    records = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
            ok = valid(record)
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            if i == len(lines):  # the line an interruption cut short: redo its work
                break
            raise ValueError(f"{path}: line {i} is not a record this command writes; {fix}")
        records.append(record)
    return records


def fingerprint(paths) -> str:
    """A SHA-256 of the files' names and bytes: a resume log records it, so a dataset whose files
    changed since the interrupted run is noticed."""
    import hashlib
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class Quiet(Exception):
    """Exit without a message: another process of the same torchrun prints the reason (rank 0 says an
    error the ranks agreed on, and the others exit 0 so that torchrun does not stop it first; a rank whose
    peer failed stops with 2 without repeating the peer's error)."""

    def __init__(self, code=2):
        super().__init__()
        self.code = code


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a command that keeps finished work for a rerun: its message says what was kept, and
    replaces the command line's usual "nothing was written"."""


def csv_text(rows, cols=None, cell=str) -> str:
    """Dict rows as CSV text through the csv module, so a value with a comma, a quote or a newline (an
    item key, a category) stays one cell. `cols`: the columns (default: every key, in first-seen order;
    a missing value is an empty cell); `cell(value)`: how a value is written."""
    import csv
    import io
    if cols is None:
        cols = []
        for r in rows:
            cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows([["" if c not in r else cell(r[c]) for c in cols] for r in rows])
    return buf.getvalue()
