"""A warm pytest for mutation testing (``make mutate``, ``bench/mutate/run.py``).

cosmic-ray runs its test command once per mutant; a fresh ``python -m pytest`` spends 4-10 s here importing
torch, torchvision, zarr, cv2 and HQ-SAM before the first test. ``serve`` imports those third-party
packages once and then, per request, forks a child that runs ``pytest.main(args)``: the child imports
boxrefine itself from the files on disk (as cosmic-ray mutated them), so every mutant is tested by
code read afresh, and the server never imports boxrefine. ``client`` (the test command cosmic-ray
runs) sends its arguments and exits with pytest's exit code; when cosmic-ray kills it (its timeout),
the server kills the child's process group.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import sys
import tempfile

# imported once by the server (third-party only: boxrefine must be read from disk by each child)
PRELOAD = ("numpy", "torch", "torchvision", "torchvision.ops", "torch.nn.functional", "zarr", "zarr.codecs",
           "numcodecs", "google_crc32c", "pydantic", "yaml", "typer", "typer.testing", "rich", "rich.console",
           "cv2", "PIL.Image", "pycocotools.coco", "pycocotools.cocoeval", "pycocotools.mask", "segment_anything_hq",
           "timm", "fsspec", "obstore", "pytest")
OUTPUT_TAIL = 4000  # characters of a child's pytest output sent back (cosmic-ray keeps it per mutant)


def _recv_all(conn: socket.socket) -> bytes:
    parts = []
    while True:
        b = conn.recv(65536)
        if not b:
            return b"".join(parts)
        parts.append(b)


def _run_child(req: dict, log_path: str) -> None:
    """In the forked child: pytest with the request's arguments, output to ``log_path``; never returns."""
    code = 3
    try:
        os.setpgid(0, 0)
        os.chdir(req["cwd"])
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(req.get("env", {}))
        os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # no scan of every installed package for plugins
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the -p mutate_fast plugin
        import pytest

        code = int(pytest.main(list(req["args"])))
    except BaseException as e:  # noqa: BLE001 - reported through the exit code
        print(f"forkserver child: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve_one(conn: socket.socket, req: dict) -> None:
    fd, log_path = tempfile.mkstemp(prefix="mutate-", suffix=".log")
    os.close(fd)
    try:
        pid = os.fork()
        if pid == 0:
            _run_child(req, log_path)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            ready, _, _ = select.select([conn], [], [], 0.05)
            if ready and conn.recv(1) == b"":  # the client was killed (cosmic-ray's timeout)
                for sig_target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                    try:
                        sig_target()
                    except OSError:
                        pass
                os.waitpid(pid, 0)
                return
        with open(log_path, errors="replace") as f:
            out = f.read()[-OUTPUT_TAIL:]
        conn.sendall(f"{code}\n".encode() + out.encode())
    finally:
        os.unlink(log_path)


def serve(path: str) -> None:
    sys.dont_write_bytecode = True  # a mutant's .pyc must never outlive it
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - an optional package: the child imports it if it can
            pass
    assert not [m for m in sys.modules if m.startswith("boxrefine")], "the server must not import boxrefine"
    # pytest's unraisableexception plugin runs gc.collect() at exit: over torch's heap that took ~1 s per
    # child and copied every page of it; frozen objects are never traversed (the use gc.freeze is for)
    gc.collect()
    gc.freeze()
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            line = b""
            while not line.endswith(b"\n"):
                b = conn.recv(65536)
                if not b:
                    break
                line += b
            if not line.strip():
                continue
            req = json.loads(line)
            if req.get("stop"):
                break
            _serve_one(conn, req)
    srv.close()
    os.unlink(path)


def client(path: str, args: list[str]) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    env = {k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "OMP_", "MKL_", "BOXREFINE"))}
    conn.sendall(json.dumps({"cwd": os.getcwd(), "args": args, "env": env}).encode() + b"\n")
    data = _recv_all(conn)
    code, _, out = data.partition(b"\n")
    sys.stdout.write(out.decode(errors="replace"))
    return int(code) if code.strip() else 4


def stop(path: str) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    conn.sendall(b'{"stop": true}\n')
    conn.close()


def main() -> None:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="client: pytest's arguments follow --")
    ap.add_argument("mode", choices=("serve", "client", "stop"))
    ap.add_argument("--socket", required=True)
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if a.mode == "serve":
        serve(a.socket)
    elif a.mode == "stop":
        stop(a.socket)
    else:
        sys.exit(client(a.socket, rest))


if __name__ == "__main__":
    main()
