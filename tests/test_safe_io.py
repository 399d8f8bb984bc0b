"""Never harm what the user has (issue 28, part A): every writer against every kind of path,
and every input path that used to end in a traceback.

Each writer (sweep --plot, calibrate fit --out, corrections.save, the calibration run
store) is run against a character device, a FIFO, a socket, a folder, a read-only file and
folder, paths under /proc, symbolic links and a locked folder: it must exit 1 with exactly
one `Error:` line, no traceback, and leave the target as it was (same inode, mode, device
numbers, content) with no temporary file beside it. New files get the umask's mode,
replaced files keep theirs. Permissions are tested unprivileged: root bypasses file modes,
so those cases run in a subprocess as uid 65534 (`setpriv`), and are skipped (with the
reason) only where setpriv is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app
from vramcalc.errors import VramcalcError

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "calibration" / "raw" / "h100-run1.jsonl"
SYSTEM_TMP = tempfile.gettempdir()  # before conftest points TMPDIR at a per-test folder
NOBODY = 65534
SETPRIV = shutil.which("setpriv")
IS_ROOT = os.geteuid() == 0
SUBPROCESS_TIMEOUT = 120
BINARY = b"\x7fELF\x02\x01\x01\x00" + bytes(range(128, 256))  # not UTF-8 from byte 8 on


class Outcome(NamedTuple):
    rc: int
    out: str
    err: str


# ---- running things ------------------------------------------------------------------------


def _unprivileged_prefix() -> list[str]:
    """The command prefix that drops root (nothing when not root); skip without setpriv."""
    if not IS_ROOT:
        return []
    if SETPRIV is None:
        pytest.skip("running as root without setpriv: root bypasses file modes, so "
                    "permissions cannot be tested here")
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def _env(area: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HOME": str(area), "VRAMCALC_DATA_DIR": str(area / "user-data"),
        "VRAMCALC_CORRECTIONS": "", "MPLCONFIGDIR": str(area / "mpl"),
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(area / "hf"), "TMPDIR": str(area / "tmp"),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    return env


def run_unprivileged(area: Path, argv: list[str], env: dict[str, str | None] | None = None,
                     umask: int | None = None) -> Outcome:
    """`python ARGV...` as an unprivileged user (uid 65534 under root) in `area`; an `env`
    value None removes that variable."""
    full = {k: v for k, v in (_env(area) | (env or {})).items() if v is not None}
    proc = subprocess.run(
        [*_unprivileged_prefix(), sys.executable, *argv], capture_output=True, text=True,
        cwd=area, env=full, timeout=SUBPROCESS_TIMEOUT,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,  # noqa: PLW1509
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def run_cli(args: list[str], env: dict[str, str] | None = None) -> Outcome:
    """The CLI in this process (privileges as the test runs)."""
    r = CliRunner().invoke(app, args, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback: the test fails showing it
    return Outcome(r.exit_code, r.stdout, r.stderr)


def assert_one_error(o: Outcome, needle: str | None = None, rc: int = 1) -> str:
    """Exit code `rc`, exactly one `Error:` line on stderr, no traceback; the line."""
    assert "Traceback" not in o.out + o.err, o.err
    errors = [ln for ln in o.err.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, o.err
    assert o.rc == rc, (o.rc, o.err)
    if needle is not None:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def area() -> Iterator[Path]:
    """A folder every user can reach and write (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vramcalc-safe-io-", dir=SYSTEM_TMP))
    path.chmod(0o777)
    for sub in ("tmp", "mpl", "user-data"):
        (path / sub).mkdir(mode=0o777)
        (path / sub).chmod(0o777)
    try:
        yield path
    finally:
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                Path(root, d).chmod(0o755, follow_symlinks=False)
        shutil.rmtree(path)


def _give_to_nobody(path: Path) -> None:
    if IS_ROOT:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


def test_unprivileged_runs_really_lack_privileges(area: Path) -> None:
    """The premise of every permission case: the subprocess cannot read a 0000 file."""
    secret = area / "secret"
    secret.write_text("x")
    secret.chmod(0)
    o = run_unprivileged(area, ["-c", "import os, sys; print(os.geteuid());"
                                "open(sys.argv[1]).read()", str(secret)])
    assert o.rc != 0 and "PermissionError" in o.err, o


# ---- the writers -------------------------------------------------------------------------


def _data_folder(area: Path) -> Path:
    """Two measured points (a calibration folder `calibrate fit --data` reads)."""
    data = area / "data"
    (data / "raw").mkdir(parents=True, exist_ok=True)
    (data / "raw" / "a.jsonl").write_text("\n".join(RAW.read_text().splitlines()[:2]) + "\n")
    for p in (data, data / "raw", data / "raw" / "a.jsonl"):
        p.chmod(0o777 if p.is_dir() else 0o666)
    return data


class Writer(NamedTuple):
    suffix: str
    cli: Callable[[Path, Path], list[str]] | None  # (target, area) -> vramcalc args
    api: str | None  # Python code writing PATH


WRITERS = {
    "sweep --plot": Writer(".svg", lambda t, a: [
        "sweep", "-m", "qwen2.5-0.5b", "--over", "batch=1:2", "--plot", str(t)], None),
    "calibrate fit --out": Writer(".json", lambda t, a: [
        "calibrate", "fit", "--data", str(_data_folder(a)), "--out", str(t)], None),
    "corrections.save": Writer(".json", None, (
        "from vramcalc.corrections.factors import Corrections, save\n"
        "save(PATH, [Corrections(gpu_family='H100', stack='torch2.13-transformers5.25')])")),
    "store.write_run": Writer(".json", None, (
        "from vramcalc.calibrate import store\n"
        "store.write_run(PATH, store.new_run(store.Environment(gpu_name='NVIDIA H100')))")),
}
API_MAIN = ("import sys\nfrom pathlib import Path\nfrom vramcalc.errors import VramcalcError\n"
            "PATH = Path(sys.argv[1])\ntry:\n{body}\nexcept VramcalcError as err:\n"
            "    print(f'Error: {{err}}', file=sys.stderr)\n    sys.exit(1)\n")


def write_with(name: str, target: Path, area: Path, unprivileged: bool,
               umask: int | None = None) -> Outcome:
    """Run writer `name` on `target`, in this process or unprivileged in a subprocess."""
    w = WRITERS[name]
    if unprivileged:
        if w.cli is not None:
            return run_unprivileged(area, ["-m", "vramcalc", *w.cli(target, area)], umask=umask)
        assert w.api is not None
        body = "\n".join("    " + ln for ln in w.api.splitlines())
        return run_unprivileged(area, ["-c", API_MAIN.format(body=body), str(target)],
                                umask=umask)
    old = os.umask(umask) if umask is not None else None
    try:
        if w.cli is not None:
            return run_cli(w.cli(target, area))
        assert w.api is not None
        try:
            exec(w.api, {"PATH": target})  # noqa: S102 - the test's own code
        except VramcalcError as err:
            return Outcome(1, "", f"Error: {err}\n")
        return Outcome(0, "", "")
    finally:
        if old is not None:
            os.umask(old)


def needs_plot(name: str) -> None:
    if name == "sweep --plot":
        pytest.importorskip("matplotlib", reason="writing a plot needs the plot extra")


# ---- targets that must be refused ---------------------------------------------------------


def _chardev(area: Path, suffix: str) -> Path:
    if not IS_ROOT:
        pytest.skip("making a device node needs root")
    path = area / f"dev{suffix}"
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    return path


def _fifo(area: Path, suffix: str) -> Path:
    path = area / f"fifo{suffix}"
    os.mkfifo(path, 0o666)
    return path


def _socket(area: Path, suffix: str) -> Path:
    path = area / f"sock{suffix}"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    return path


def _folder(area: Path, suffix: str) -> Path:
    path = area / f"folder{suffix}"
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    path.chmod(0o777)
    return path


def _readonly_file(area: Path, suffix: str) -> Path:
    path = area / f"readonly{suffix}"
    path.write_text('{"mine": true}\n')
    _give_to_nobody(path)
    path.chmod(0o444)
    return path


def _others_file(area: Path, suffix: str) -> Path:
    """A 0644 file of root's: writable by its owner, not by the unprivileged user."""
    if not IS_ROOT:
        pytest.skip("a file of another user needs root to make")
    path = area / f"roots{suffix}"
    path.write_text('{"mine": true}\n')
    path.chmod(0o644)
    return path


def _readonly_folder(area: Path, suffix: str) -> Path:
    folder = area / "readonly-folder"
    folder.mkdir()
    _give_to_nobody(folder)
    folder.chmod(0o555)
    return folder / f"new{suffix}"


def _locked_folder(area: Path, suffix: str) -> Path:
    folder = area / "locked"
    folder.mkdir()
    folder.chmod(0)
    return folder / f"new{suffix}"


def _proc_new(area: Path, suffix: str) -> Path:
    return Path("/proc") / f"vramcalc-test{suffix}"


def _proc_file(area: Path, suffix: str) -> Path:
    """A link with the writer's suffix to /proc/version (a read-only regular file)."""
    path = area / f"proc{suffix}"
    path.symlink_to("/proc/version")
    return path


def _link_to_device(area: Path, suffix: str) -> Path:
    dev = _chardev(area, ".node")
    path = area / f"devlink{suffix}"
    path.symlink_to(dev)
    return path


def _dangling_link(area: Path, suffix: str) -> Path:
    path = area / f"dangling{suffix}"
    path.symlink_to(area / "nothing-here")
    return path


def _under_a_file(area: Path, suffix: str) -> Path:
    parent = area / "plain.txt"
    parent.write_text("mine")
    return parent / f"x{suffix}"


REFUSED: dict[str, tuple[Callable[[Path, str], Path], bool, str]] = {
    # name: (make the target, run unprivileged, words of the error)
    "character device": (_chardev, False, "a character device"),
    "fifo": (_fifo, False, "a FIFO"),
    "socket": (_socket, False, "a socket"),
    "folder": (_folder, False, "a folder"),
    "read-only file": (_readonly_file, True, "read-only file"),
    "read-only file as root": (_readonly_file, False, "read-only file"),
    "another user's file": (_others_file, True, "read-only file for you"),
    "read-only folder": (_readonly_folder, True, "Permission denied"),
    "locked folder": (_locked_folder, True, "Permission denied"),
    "new path under /proc": (_proc_new, False, "/proc"),
    "file under /proc": (_proc_file, False, "read-only file"),
    "link to a device": (_link_to_device, False, "a character device"),
    "dangling link": (_dangling_link, False, "does not exist"),
    "path under a file": (_under_a_file, False, "not a folder"),
}


def _state(path: Path) -> Any:
    """What must not change: the lstat identity, a regular file's bytes, a folder's list."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        return "unreachable"
    content: Any = None
    if stat.S_ISREG(st.st_mode):
        content = path.read_bytes()
    elif stat.S_ISDIR(st.st_mode):
        content = sorted(os.listdir(path))
    elif stat.S_ISLNK(st.st_mode):
        content = (os.readlink(path), _state(path.resolve()))
    return (st.st_mode, st.st_ino, st.st_rdev, st.st_uid, content)


def _temporaries(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))
    except OSError:
        return []


@pytest.mark.parametrize("target_kind", list(REFUSED))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_writer_refuses_and_leaves_the_target_alone(writer: str, target_kind: str,
                                                   area: Path) -> None:
    make, unprivileged, words = REFUSED[target_kind]
    target = make(area, WRITERS[writer].suffix)
    before = _state(target)
    nearby = sorted(os.listdir(area))
    o = write_with(writer, target, area, unprivileged)
    line = assert_one_error(o, words)
    assert str(target) in line or target.name in line
    assert _state(target) == before
    if target.parent != Path("/proc"):
        assert _temporaries(area) == [] and _temporaries(target.parent) == []
    assert sorted(os.listdir(area)) == nearby or writer == "calibrate fit --out"  # + data/


# ---- writes that must happen, with the right mode ----------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_new_file_gets_the_umask_mode(writer: str, umask: int, area: Path) -> None:
    needs_plot(writer)
    target = area / "sub" / f"new{WRITERS[writer].suffix}"  # the folder is created too
    o = write_with(writer, target, area, unprivileged=True, umask=umask)
    assert o.rc == 0, o.err
    assert "Traceback" not in o.err
    st = target.stat()
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o666 & ~umask
    assert target.stat().st_size > 0
    assert _temporaries(target.parent) == []


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o664])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_replaced_file_keeps_its_mode_and_owner(writer: str, mode: int, area: Path) -> None:
    needs_plot(writer)
    target = area / f"mine{WRITERS[writer].suffix}"
    target.write_text("")  # an empty corrections file holds nothing to keep
    _give_to_nobody(target)
    target.chmod(mode)
    owner = target.stat().st_uid
    o = write_with(writer, target, area, unprivileged=False, umask=0o077)
    assert o.rc == 0, o.err
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == mode
    assert st.st_uid == owner  # root writing a user's file leaves it the user's
    assert st.st_size > 0
    assert _temporaries(area) == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_link_to_a_regular_file_is_written_through(writer: str, area: Path) -> None:
    needs_plot(writer)
    real = area / f"real{WRITERS[writer].suffix}"
    real.write_text("")
    real.chmod(0o604)
    link = area / f"link{WRITERS[writer].suffix}"
    link.symlink_to(real.name)
    o = write_with(writer, link, area, unprivileged=False)
    assert o.rc == 0, o.err
    assert link.is_symlink() and os.readlink(link) == real.name  # the link stays a link
    assert real.stat().st_size > 0 and stat.S_IMODE(real.stat().st_mode) == 0o604
    assert _temporaries(area) == []


# ---- folders written into (calibrate run / multi --out) ----------------------------------


FOLDER_WRITERS = {
    "calibrate run --out": ["calibrate", "run", "-m", "qwen2.5-0.5b", "--out"],
    "calibrate multi --out": ["calibrate", "multi", "-m", "qwen2.5-0.5b", "--gpus", "2",
                              "--device", "cpu", "--out"],
}
FOLDER_REFUSED = {
    "character device": (_chardev, False, "a character device"),
    "fifo": (_fifo, False, "a FIFO"),
    "regular file": (_readonly_file, False, "a file, not a folder"),
    "read-only folder": (_readonly_folder, True, "Permission denied"),
    "locked folder": (_locked_folder, True, "Permission denied"),
    "path under a file": (_under_a_file, False, "not a folder"),
}


@pytest.mark.parametrize("target_kind", list(FOLDER_REFUSED))
@pytest.mark.parametrize("writer", list(FOLDER_WRITERS))
def test_output_folder_refused(writer: str, target_kind: str, area: Path) -> None:
    make, unprivileged, words = FOLDER_REFUSED[target_kind]
    target = make(area, "")
    before = _state(target)
    args = [*FOLDER_WRITERS[writer], str(target)]
    o = (run_unprivileged(area, ["-m", "vramcalc", *args]) if unprivileged
         else run_cli(args))
    assert_one_error(o, words)
    assert _state(target) == before


def test_run_checks_its_folder_and_creates_nothing_before_a_gpu(area: Path) -> None:
    """A usable --out passes the check; without a GPU nothing is created in it (exit 4)."""
    out = area / "new-folder"
    o = run_cli([*FOLDER_WRITERS["calibrate run --out"], str(out)])
    assert_one_error(o, "GPU", rc=4)
    assert not out.exists()


def test_matrix_driver_refuses_a_device_as_out(area: Path) -> None:
    dev = _chardev(area, ".jsonl")
    before = _state(dev)
    matrix = area / "m.json"
    matrix.write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "vramcalc.calibrate.matrix", str(matrix),
                           "--out", str(dev), "--weights-cache", str(area / "w"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert_one_error(Outcome(proc.returncode, proc.stdout, proc.stderr), "a character device")
    assert _state(dev) == before and not (area / "w").exists()


# ---- inputs that used to end in a traceback ----------------------------------------------


@pytest.fixture
def binary(area: Path) -> Path:
    path = area / "model.json"
    path.write_bytes(BINARY)
    return path


@pytest.mark.parametrize("args", [
    ["plan", "-m", "{f}"],
    ["check", "-m", "{f}", "--gpu", "rtx-4090"],
    ["sweep", "-m", "{f}", "--over", "batch=1:2"],
    ["compare", "-m", "{f}"],
    ["plan", "-m", "llama-7b", "--from-config", "{f}"],
    ["sweep", "-m", "llama-7b", "--from-config", "{f}", "--over", "batch=1:2"],
    ["check", "-m", "llama-7b", "--from-config", "{f}", "--gpu", "rtx-4090"],
    ["calibrate", "run", "-m", "llama-7b", "--matrix", "{f}"],
    ["plan", "-m", "llama-7b", "--lengths", "{f}"],
])
def test_binary_file_is_one_error_line(args: list[str], binary: Path) -> None:
    o = run_cli([a.format(f=binary) for a in args])
    assert_one_error(o, "not UTF-8")


def _yaml_binary(area: Path) -> Path:
    path = area / "spec.yaml"
    path.write_bytes(BINARY)
    return path


def test_binary_spec_yaml_is_one_error_line(area: Path) -> None:
    assert_one_error(run_cli(["plan", "-m", str(_yaml_binary(area))]), "not UTF-8")


@pytest.mark.parametrize("args", [
    ["plan", "-m", "{d}"],
    ["plan", "-m", "{d}/config.json"],
    ["check", "-m", "{d}", "--gpu", "rtx-4090"],
    ["plan", "-m", "llama-7b", "--from-config", "{d}/config.yaml"],
])
def test_locked_folder_as_input_is_one_error_line(args: list[str], area: Path) -> None:
    locked = area / "locked-model"
    locked.mkdir()
    (locked / "config.json").write_text("{}")
    locked.chmod(0)
    o = run_unprivileged(area, ["-m", "vramcalc", *[a.format(d=locked) for a in args]])
    assert_one_error(o, "Permission denied")


@pytest.mark.parametrize("command", [["calibrate", "report"], ["calibrate", "fit"]])
def test_locked_data_dir_is_one_error_line(command: list[str], area: Path) -> None:
    locked = area / "locked-data"
    locked.mkdir()
    locked.chmod(0)
    o = run_unprivileged(area, ["-m", "vramcalc", *command],
                         env={"VRAMCALC_DATA_DIR": str(locked)})
    assert_one_error(o, "Permission denied")


def test_locked_data_dir_warns_on_check(area: Path) -> None:
    """`check` reads the user's corrections file there: a warning, the raw estimate."""
    locked = area / "locked-data"
    locked.mkdir()
    locked.chmod(0)
    o = run_unprivileged(area, ["-m", "vramcalc", "check", "-m", "qwen2.5-0.5b", "--gpu",
                                "h100"],
                         env={"VRAMCALC_DATA_DIR": str(locked), "VRAMCALC_CORRECTIONS": None})
    assert o.rc == 0, o.err
    assert "cannot read" in o.err and "Permission denied" in o.err
    assert "Traceback" not in o.err


@pytest.mark.parametrize("args", [
    ["plan", "-m", "llama-7b", "--from-config", "{p}.yaml"],
    ["plan", "-m", "{p}.yaml"],
    ["plan", "-m", "{p}.json"],
    ["calibrate", "run", "-m", "llama-7b", "--matrix", "{p}.json"],
    ["plan", "-m", "llama-7b", "--lengths", "{p}.yaml"],
])
@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_special_file_as_input_is_refused_without_hanging(args: list[str], kind: str,
                                                          area: Path) -> None:
    """A FIFO would block a read, /dev/zero never ends: refused before reading (the
    subprocess timeout catches a hang)."""
    stem = area / "input"
    for suffix in (".yaml", ".json"):
        path = stem.with_suffix(suffix)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "device":
            if not IS_ROOT:
                pytest.skip("making a device node needs root")
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))  # a /dev/zero
        else:
            path.mkdir()
    argv = [a.format(p=stem) for a in args]
    o = run_unprivileged(area, ["-m", "vramcalc", *argv])
    usage = kind == "folder" and "--from-config" in args  # typer's own check: a usage error
    line = assert_one_error(o, rc=2 if usage else 1)
    assert "input" in line


def test_unreadable_file_as_input(area: Path) -> None:
    path = area / "config.yaml"
    path.write_text("base_model: llama-7b\n")
    path.chmod(0)
    o = run_unprivileged(area, ["-m", "vramcalc", "plan", "--from-config", str(path)])
    assert_one_error(o, "not readable", rc=2)  # typer's own check of --from-config
    o = run_unprivileged(area, ["-m", "vramcalc", "plan", "-m", str(path)])
    assert_one_error(o, "Permission denied")


# ---- corrections that are not there ------------------------------------------------------


@pytest.mark.parametrize(("make", "words"), [
    (lambda a: a / "nonexistent.json", "no such file"),
    (lambda a: a, "not a regular file"),
    (lambda a: (a / "bin.json").write_bytes(BINARY) and a / "bin.json", "not UTF-8"),
    (lambda a: (a / "x.json").write_text("{}") and a / "x.json", "no usable corrections"),
])
def test_corrections_env_names_what_is_wrong(make: Callable[[Path], Path], words: str,
                                             area: Path) -> None:
    path = make(area)
    o = run_cli(["check", "-m", "qwen2.5-0.5b", "--gpu", "h100"],
                env={"VRAMCALC_CORRECTIONS": str(path)})
    assert o.rc == 0 and words in o.err, o.err
    assert "no corrections installed" not in o.err
    o = run_cli(["calibrate", "report"], env={"VRAMCALC_CORRECTIONS": str(path)})
    assert o.rc == 0 and f"corrections: none (VRAMCALC_CORRECTIONS={path}" in o.out


# ---- measurements that are left out ------------------------------------------------------


def _damaged_data(area: Path, good: int) -> Path:
    """raw/a.jsonl: `good` readable lines, then one line of each kind of damage."""
    lines = RAW.read_text().splitlines()[:good]
    rec = json.loads(lines[0])
    nan = dict(rec, nvml_peak_used_minus_baseline=float("nan"))
    neg = json.loads(lines[0])
    neg["steps"][0]["fwd_bwd_peak"] = -5
    damaged = [json.dumps(nan).encode(), json.dumps(neg).encode(), lines[0][:200].encode(),
               b"hello", b"[1, 2]", BINARY]
    data = area / "damaged"
    (data / "raw").mkdir(parents=True)
    (data / "raw" / "a.jsonl").write_bytes(b"\n".join([ln.encode() for ln in lines]
                                                      + damaged) + b"\n")
    return data


REASONS = ["2 NaN, infinite, negative or non-numeric peak", "1 truncated JSON", "1 not JSON",
           "1 not a JSON object", "1 not UTF-8 text"]


@pytest.mark.parametrize("reason", REASONS)
def test_report_says_what_was_skipped(reason: str, area: Path) -> None:
    data = _damaged_data(area, good=3)
    o = run_cli(["calibrate", "report", "--data", str(data)])
    assert o.rc == 0, o.err
    warning = [ln for ln in o.err.splitlines() if ln.startswith("warning: skipped")]
    assert len(warning) == 1 and "skipped 6 of 9" in warning[0]
    assert reason in warning[0]
    assert "raw/a.jsonl:4" in warning[0]  # the first damaged line, named


def test_report_json_lists_skipped_lines(area: Path) -> None:
    o = run_cli(["calibrate", "report", "--data", str(_damaged_data(area, good=3)), "--json"])
    skipped = json.loads(o.out)["summary"]["skipped"]
    assert skipped["not JSON"] == ["raw/a.jsonl:7"]
    assert sum(len(v) for v in skipped.values()) == 6


def test_fit_refuses_mostly_damaged_data(area: Path) -> None:
    out = area / "c.json"
    o = run_cli(["calibrate", "fit", "--data", str(_damaged_data(area, good=3)), "--out",
                 str(out)])
    assert_one_error(o, "cannot be used, nothing fitted")
    assert not out.exists()


def test_fit_on_mostly_good_data_says_what_it_skipped(area: Path) -> None:
    out = area / "c.json"
    o = run_cli(["calibrate", "fit", "--data", str(_damaged_data(area, good=8)), "--out",
                 str(out)])
    assert o.rc == 0, o.err
    assert "skipped 6 of 14" in o.err
    assert json.loads(out.read_text())["entries"][0]["n_points"] == 8


@pytest.mark.parametrize("content", [b'{"name": "another tool"}', b"[]", BINARY])
def test_fit_does_not_replace_a_file_that_is_not_corrections(content: bytes,
                                                             area: Path) -> None:
    out = area / "other.json"
    out.write_bytes(content)
    o = run_cli(["calibrate", "fit", "--data", str(_data_folder(area)), "--out", str(out)])
    assert_one_error(o)
    assert out.read_bytes() == content


def test_fit_keeps_other_entries_of_its_out_file(area: Path) -> None:
    from vramcalc.corrections import factors as corr

    out = area / "c.json"
    other = corr.Corrections(gpu_family="A100", stack="torch2.11-transformers5.17")
    corr.save(out, [other])
    o = run_cli(["calibrate", "fit", "--data", str(_data_folder(area)), "--out", str(out)])
    assert o.rc == 0, o.err
    assert [e.gpu_family for e in corr.load(out)] == ["A100", "H100"]


def test_binary_cached_hub_config_is_one_error_line(area: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from vramcalc.errors import SpecError
    from vramcalc.models import hub

    cached = area / "config.json"
    cached.write_bytes(BINARY)
    monkeypatch.setattr(hub, "fetch_files", lambda repo, revision=None: hub.HubFiles(cached,
                                                                                     None))
    with pytest.raises(SpecError, match="not UTF-8") as err:
        hub.resolve_hub_model("someone/some-model")
    assert "\n" not in str(err.value) and "someone/some-model" in str(err.value)
