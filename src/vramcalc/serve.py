"""`vramcalc serve`: a local page and its JSON API, on the standard library's http.server.

Each API endpoint runs the command of the same name in this process, with `--json`, the
query string turned into its command-line options (`?model=llama-3.1-8b&batch=4&seq-len=
2048` is `vramcalc plan --json --model=llama-3.1-8b --batch=4 --seq-len=2048`), and
answers with what the command printed on stdout: the page's JSON is `plan --json`'s to the
byte, its limits on numbers are the command line's (`commands/options.py build_plan`), and
a bad value is the command's own `Error: ...` line, returned as a 400 with `{"error": ...}`.
What the command printed on stderr (notes, the calibration line) comes in the
`X-Vramcalc-Notes` header as a JSON list. Each command's output is captured per thread
(`_ThreadStream`); one command runs at a time (`_COMMAND_LOCK`); static files are served in
parallel. Answers are kept (`AnswerCache`): the same command line in the same environment
is answered again from memory.

What the server refuses, because a page in the user's browser is not the user at a shell:
options that read or write files (`--from-config`, `--plot`), models given as paths (an
uploaded config.json is `upload:ID`, from `POST /api/config`), a Host header other than the
address it is bound to when that is a loopback address (DNS rebinding), a query longer than
`MAX_QUERY_BYTES` and a body longer than `MAX_BODY_BYTES`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import os
import socket
import sys
import tempfile
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

DEFAULT_PORT = 8765
MAX_QUERY_BYTES = 8 * 1024  # a page's state is ~300 bytes; 8 KiB is far past any real one
MAX_BODY_BYTES = 1024 * 1024  # a config.json is a few KiB; the largest multimodal ~100 KiB
MAX_REPEATS = 16  # a repeatable option (--gpu) given more often than this is refused
MAX_MODEL_RESULTS = 50  # /api/models answers at most this many matches
MAX_NOTES_HEADER = 4096  # bytes of X-Vramcalc-Notes (the last notes are dropped past it)

# endpoint -> the command it runs (cli.COMMANDS)
API_COMMANDS = {"plan": "plan", "check": "check", "compare": "compare", "fit": "fit",
                "sweep": "sweep"}
# Options the page may not pass: they read or write the user's files, or change the output
# format the API promises (it always adds --json).
REFUSED_OPTIONS = {"from-config": "reads a file", "lengths": "reads a file",
                   "plot": "writes a file",
                   "csv": "the API answers JSON", "json": "the API always answers JSON",
                   "help": "not an API option"}
UPLOAD_PREFIX = "upload:"
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

_COMMAND_LOCK = threading.Lock()
_STREAMS_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()
_commands: dict[str, Any] = {}

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


class RequestError(Exception):
    """A bad request: its message goes back as `{"error": message}` with `status`."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def _command(name: str) -> Any:
    """The click command behind `vramcalc NAME` (cli.load_command), loaded once."""
    with _LOAD_LOCK:
        if name not in _commands:
            from vramcalc.cli import load_command

            _commands[name] = load_command(name)
        return _commands[name]


def _options(command: Any) -> dict[str, Any]:
    """The command's options by long name without dashes: 'seq-len' -> its click Option."""
    out = {}
    for param in command.params:
        for opt in (*param.opts, *getattr(param, "secondary_opts", ())):
            if opt.startswith("--") and not opt.startswith("--no-"):
                out[opt[2:]] = param
        for opt in param.opts:  # an option whose own name starts with --no- (--no-calibration)
            if opt.startswith("--no-"):
                out[opt[2:]] = param
    return out


def _truth(key: str, value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise RequestError(f"'{key}' takes true or false, got '{value}'")


def query_to_argv(command_name: str, pairs: list[tuple[str, str]],
                  uploads: UploadStore | None = None) -> list[str]:
    """The command-line options `vramcalc COMMAND_NAME --json` gets for a query string.

    `key=value` -> `--key=value`; a switch (`dora=true|false`) -> `--dora` / `--no-dora`; a
    flag (`merged=true`) -> `--merged` or nothing; a repeatable option may repeat its key.
    Unknown keys, refused options and path models are RequestErrors.
    """
    command = _command(command_name)
    options = _options(command)
    argv = ["--json"]
    seen: dict[str, int] = {}
    for key, value in pairs:
        if key in REFUSED_OPTIONS:
            raise RequestError(f"'{key}' is not accepted by the page's API "
                               f"({REFUSED_OPTIONS[key]})")
        param = options.get(key)
        if param is None:
            valid = ", ".join(sorted(k for k in options if k not in REFUSED_OPTIONS))
            raise RequestError(f"unknown parameter '{key}' for /api/{command_name}; valid: "
                               f"{valid}")
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > (MAX_REPEATS if param.multiple else 1):
            raise RequestError(f"'{key}' given {seen[key]} times" + (
                f"; at most {MAX_REPEATS}" if param.multiple else "; give it once"))
        if param.is_flag:
            on = _truth(key, value)
            secondary = [o for o in getattr(param, "secondary_opts", ()) if o.startswith("--")]
            if secondary:
                argv.append(param.opts[0] if on else secondary[0])
            elif on:
                argv.append(f"--{key}")
            continue
        if key == "model":
            value = _model_value(value, uploads)
        argv.append(f"--{key}={value}")
    return argv


def _model_value(value: str, uploads: UploadStore | None) -> str:
    """A catalog name, alias or hub id as is; `upload:ID` -> the uploaded file; a path refused."""
    if value.startswith(UPLOAD_PREFIX):
        if uploads is None:
            raise RequestError("uploads are not available here")
        return str(uploads.path(value.removeprefix(UPLOAD_PREFIX)))
    path = Path(value).expanduser()
    if value.startswith((".", "/", "~", "\\")) or path.suffix in {".json", ".yaml", ".yml"}:
        raise RequestError(f"model '{value}': the page's server takes catalog names, aliases "
                           "and hub ids, not paths; upload a config.json instead")
    if value.strip() and path.exists():  # the command would read it (commands/common.py)
        raise RequestError(f"model '{value}' is also a file or folder where the server runs, "
                           "which the command would read; start the server in another folder "
                           "or upload the config.json")
    return value


class CommandAnswer:
    """What one in-process run of a command gave: exit code, stdout, stderr."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    @property
    def error(self) -> str | None:
        """The command's `Error: ...` line without its prefix (None on exit 0 and 3)."""
        if self.code in (0, 3):
            return None
        lines = [ln for ln in self.stderr.splitlines() if ln.startswith("Error:")]
        if lines:
            return lines[-1].removeprefix("Error:").strip()
        return self.stderr.strip().splitlines()[-1] if self.stderr.strip() else (
            f"the command ended with exit code {self.code}")

    @property
    def notes(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


class _ThreadStream(io.TextIOBase):
    """sys.stdout / sys.stderr while the server runs: a thread that runs a command writes to
    its own buffer, every other thread to the stream this one replaced. (contextlib's
    redirect_stdout swaps the stream for the whole process: a line another thread printed
    meanwhile would land in the command's answer.)"""

    def __init__(self, real: Any) -> None:
        self.real = real
        self._local = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def _target(self) -> Any:
        buf = getattr(self._local, "buf", None)
        return self.real if buf is None else buf

    def capture(self, buf: io.StringIO | None) -> None:
        self._local.buf = buf

    def write(self, text: str) -> int:
        return int(self._target().write(text))

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return bool(self._target().isatty())

    def writable(self) -> bool:
        return True


def _thread_streams() -> tuple[_ThreadStream, _ThreadStream]:
    """sys.stdout and sys.stderr as _ThreadStreams (installed once; again if replaced)."""
    with _STREAMS_LOCK:
        if not isinstance(sys.stdout, _ThreadStream):
            sys.stdout = _ThreadStream(sys.stdout)
        if not isinstance(sys.stderr, _ThreadStream):
            sys.stderr = _ThreadStream(sys.stderr)
        return sys.stdout, sys.stderr


def run_command(name: str, argv: list[str]) -> CommandAnswer:
    """Run `vramcalc NAME ARGV...` in this process, its stdout and stderr captured.

    Exit codes are the command line's (0 ok, 1 error, 2 usage error, 3 does not fit, 4 no
    GPU). One command at a time (the catalog and corrections caches are filled on first
    use). An exception that is not a SystemExit is a bug and propagates.
    """
    command = _command(name)
    out, err = io.StringIO(), io.StringIO()
    with _COMMAND_LOCK:
        stdout, stderr = _thread_streams()
        stdout.capture(out)
        stderr.capture(err)
        try:
            command.main(args=argv, prog_name=f"vramcalc {name}", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            stdout.capture(None)
            stderr.capture(None)
    return CommandAnswer(code, out.getvalue(), err.getvalue())


# What an answer depends on besides the command line: the environment the command reads
# (commands/options.py expandable_from_env, corrections.available, hub.py through
# huggingface_hub). The corrections files themselves are read once per process
# (corrections._load_cached), so a process already answers with the ones it started with.
ANSWER_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "VRAMCALC_CORRECTIONS", "VRAMCALC_DATA_DIR",
              "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")
MAX_CACHED_ANSWERS = 512  # a few KiB each


class AnswerCache:
    """The answers of the commands already run, by command line and environment (LRU).

    A slider that goes back, and the memory curve (the same points while only the sequence
    length moves), ask the same questions again; the answer is the same bytes, as the
    command is deterministic for a command line and environment."""

    def __init__(self, size: int = MAX_CACHED_ANSWERS) -> None:
        self.size = size
        self._answers: OrderedDict[tuple[Any, ...], CommandAnswer] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    @staticmethod
    def key(name: str, argv: list[str]) -> tuple[Any, ...]:
        return (name, tuple(argv), tuple(os.environ.get(k) for k in ANSWER_ENV))

    @staticmethod
    def cacheable(name: str, argv: list[str]) -> bool:
        """Not `check` of this machine's GPUs: NVML's free memory changes as it runs."""
        return name != "check" or any(a.startswith(("--gpu=", "--gpu-memory=")) for a in argv)

    def run(self, name: str, argv: list[str]) -> CommandAnswer:
        if not self.cacheable(name, argv):
            return run_command(name, argv)
        key = self.key(name, argv)
        with self._lock:
            found = self._answers.get(key)
            if found is not None:
                self._answers.move_to_end(key)
                self.hits += 1
                return found
        answer = run_command(name, argv)
        with self._lock:
            self._answers[key] = answer
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)
        return answer

    def __len__(self) -> int:
        return len(self._answers)


class UploadStore:
    """Uploaded config.json files, kept in a temporary folder while the server runs.

    ID is the first 16 hex digits of the file's sha256, so the same file is the same ID
    (a shared link names it; the receiving server needs the file uploaded too)."""

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="vramcalc-serve-")
            root = Path(self._tmp.name)
        else:
            self._tmp = None
        self.root = root

    def add(self, body: bytes) -> tuple[str, Any]:
        """Check `body` is a config.json vramcalc can plan, store it; (ID, its spec)."""
        from vramcalc.errors import VramcalcError
        from vramcalc.models.hf_config import spec_from_hf_config
        from vramcalc.models.spec import parse_json_text

        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the uploaded config.json is not UTF-8 text") from None
        upload_id = hashlib.sha256(body).hexdigest()[:16]
        try:
            spec = spec_from_hf_config(parse_json_text(text, "config.json"), "config.json")
        except VramcalcError as err:
            raise RequestError(str(err)) from None
        folder = self.root / upload_id
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_bytes(body)
        return upload_id, spec

    def path(self, upload_id: str) -> Path:
        if not (len(upload_id) == 16 and all(c in "0123456789abcdef" for c in upload_id)):
            raise RequestError(f"'{upload_id}' is not an upload id (16 hex digits)")
        path = self.root / upload_id / "config.json"
        if not path.is_file():
            raise RequestError(f"no uploaded config '{upload_id}' on this server (it keeps "
                               "uploads while it runs): upload the config.json again",
                               HTTPStatus.NOT_FOUND)
        return path

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def search_models(query: str, limit: int = MAX_MODEL_RESULTS) -> list[dict[str, Any]]:
    """Catalog models whose name or an alias contains every word of `query` (any case),
    as `vramcalc models --json` describes them (commands/models.py spec_summary)."""
    from vramcalc.commands.models import _natural_key, spec_summary
    from vramcalc.models.spec import catalog

    words = query.lower().split()
    found = []
    for spec in sorted(catalog(), key=lambda s: _natural_key(s.name)):
        text = " ".join((spec.name, *spec.aliases)).lower()
        if all(w in text for w in words):
            found.append(spec_summary(spec))
    return found[:limit]


def gpu_catalog() -> list[dict[str, Any]]:
    """The catalog GPUs for the page's GPU list: name, memory, bf16."""
    from vramcalc.hardware.catalog import catalog

    return [{"name": g.name, "memory_bytes": g.memory_bytes, "usable_bytes": g.usable_bytes,
             "bf16_supported": g.bf16_supported} for g in catalog()]


# TrainPlan options (commands/options.py PLAN_OPTIONS names) -> the page's keys
_PAGE_KEYS = {"batch": "batch", "seq_len": "seq-len", "method": "method", "quant": "quant",
              "rank": "rank", "targets": "targets", "optimizer": "optimizer",
              "gradient_checkpointing": "gradient-checkpointing", "loop": "loop",
              "batch_layout": "batch-layout", "offload_activations": "offload-activations",
              "loss_kernel": "loss-kernel"}


def trainer_presets() -> dict[str, Any]:
    """The trainer presets (trainers.py TRAINERS) for the page: each preset's options the
    page has controls for, by the page's keys (the page sets its controls to them, so what
    it shows is what `--trainer NAME` plans), and the rest as `--flag value` text."""
    from vramcalc.trainers import TRAINERS

    out: dict[str, Any] = {}
    for name, preset in TRAINERS.items():
        controls: dict[str, str] = {}
        other: list[str] = []
        for option, value in preset.options.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            if option in _PAGE_KEYS:
                controls[_PAGE_KEYS[option]] = text
            else:
                other.append(f"--{option.replace('_', '-')} {text}")
        out[name] = {"controls": controls, "other": other, "loss": preset.loss_kernel}
    return out


def static_file(name: str) -> bytes | None:
    """A file of the page (vramcalc/web/, shipped in the wheel); None if there is none."""
    if "/" in name or name.startswith(".") or Path(name).suffix not in STATIC_TYPES:
        return None
    try:
        return (importlib.resources.files("vramcalc.web") / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


class Handler(BaseHTTPRequestHandler):
    """GET / and /static/*, GET /api/<command>?..., GET /api/models, /api/gpus,
    /api/trainers, POST /api/config."""

    server: VramcalcServer
    server_version = "vramcalc"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        if self.server.verbose:
            super().log_message(format, *args)

    # ---- responses ---------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, _json_bytes({"error": message}), "application/json")

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            self._check_host()
            work()
        except RequestError as err:
            self._error(err.status, str(err))
        except ConnectionError:  # the browser went away (a tab closed, a newer request)
            self.close_connection = True
        except Exception as err:  # a bug: the traceback goes to the server's terminal only
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR,
                        f"internal error ({type(err).__name__}); the server's terminal has "
                        "the details")

    def _check_host(self) -> None:
        """Refuse a Host header naming another site when bound to loopback (a page served
        from elsewhere that resolves its own name to 127.0.0.1: DNS rebinding)."""
        if self.server.bound_host not in LOOPBACK_HOSTS:
            return
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        if name not in LOOPBACK_HOSTS:
            raise RequestError(f"Host '{host}' is not this server's address",
                               HTTPStatus.MISDIRECTED_REQUEST)

    # ---- methods -----------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._guarded(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _get(self) -> None:
        if len(self.path.encode()) > MAX_QUERY_BYTES:
            raise RequestError(f"the request line is longer than {MAX_QUERY_BYTES} bytes",
                               HTTPStatus.REQUEST_URI_TOO_LONG)
        url = urlsplit(self.path)
        try:
            pairs = parse_qsl(url.query, keep_blank_values=True, strict_parsing=False,
                              max_num_fields=200)
        except ValueError as err:
            raise RequestError(f"malformed query string: {err}") from None
        route = url.path
        if route in ("/", "/index.html"):
            self._static("index.html")
        elif route.startswith("/static/"):
            self._static(route.removeprefix("/static/"))
        elif route == "/api/models":
            query = " ".join(v for k, v in pairs if k == "q")
            self._send(HTTPStatus.OK, _json_bytes({"models": search_models(query)}),
                       "application/json")
        elif route == "/api/gpus":
            self._send(HTTPStatus.OK, _json_bytes({"gpus": gpu_catalog()}), "application/json")
        elif route == "/api/trainers":
            self._send(HTTPStatus.OK, _json_bytes({"trainers": trainer_presets()}),
                       "application/json")
        elif route.startswith("/api/") and route.removeprefix("/api/") in API_COMMANDS:
            self._api(API_COMMANDS[route.removeprefix("/api/")], pairs)
        else:
            raise RequestError(f"no such page: {url.path}", HTTPStatus.NOT_FOUND)

    def _static(self, name: str) -> None:
        body = static_file(name)
        if body is None:
            raise RequestError(f"no such file: {name}", HTTPStatus.NOT_FOUND)
        self._send(HTTPStatus.OK, body, STATIC_TYPES[Path(name).suffix])

    def _api(self, command: str, pairs: list[tuple[str, str]]) -> None:
        argv = query_to_argv(command, pairs, self.server.uploads)
        answer = self.server.answers.run(command, argv)
        notes_list = answer.notes
        notes = json.dumps(notes_list)  # ASCII: json escapes the rest
        while len(notes) > MAX_NOTES_HEADER and notes_list:
            notes_list = notes_list[:-1]
            notes = json.dumps(notes_list)
        if answer.error is not None:
            status = HTTPStatus.BAD_REQUEST
            self._send(status, _json_bytes({"error": answer.error, "exit_code": answer.code}),
                       "application/json", {"X-Vramcalc-Notes": notes})
            return
        self._send(HTTPStatus.OK, answer.stdout.encode(), "application/json",
                   {"X-Vramcalc-Notes": notes, "X-Vramcalc-Exit-Code": str(answer.code)})

    def _post(self) -> None:
        if urlsplit(self.path).path != "/api/config":
            raise RequestError(f"POST goes to /api/config only, not {self.path}",
                               HTTPStatus.NOT_FOUND)
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            raise RequestError("POST /api/config needs a Content-Length",
                               HTTPStatus.LENGTH_REQUIRED)
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            if length <= 4 * MAX_BODY_BYTES:  # read it (a little), so the client sees the 413
                self.rfile.read(length)  # rather than a reset while it still sends
            raise RequestError(f"the body is {length} bytes; a config.json is at most "
                               f"{MAX_BODY_BYTES} bytes here", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        body = self.rfile.read(length)
        upload_id, spec = self.server.uploads.add(body)
        from vramcalc.commands.models import spec_summary

        self._send(HTTPStatus.OK, _json_bytes({"model": UPLOAD_PREFIX + upload_id,
                                               "spec": spec_summary(spec)}),
                   "application/json")


class VramcalcServer(ThreadingHTTPServer):
    """The page's server: its uploads, its bound host, whether it logs requests."""

    daemon_threads = True

    def __init__(self, host: str, port: int, *, verbose: bool = False) -> None:
        self.bound_host = host
        self.verbose = verbose
        self.uploads = UploadStore()
        self.answers = AnswerCache()
        if ":" in host:  # an IPv6 address ('::1')
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        port = self.server_address[1]
        host = self.bound_host
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.uploads.close()


def make_server(host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                verbose: bool = False) -> VramcalcServer:
    """A server bound to host:port (port 0: a free one); call serve_forever() on it."""
    return VramcalcServer(host, port, verbose=verbose)
