"""The SQLite writer process: the only connection that writes, in a process of its own.

Why a process and not a thread: every `execute` releases the GIL while SQLite works and
takes it back afterwards. A writer thread doing a dozen statements per webhook then waits
for the event loop's thread a dozen times per webhook (and the loop waits for it), so
under load both threads spent more time handing the GIL over than working. In its own
process the writer has an interpreter to itself; the parent pays one send and one
receive per batch, not per statement.

Protocol over one duplex socket, each message a length-prefixed pickle (the framing of
multiprocessing.connection):
  child -> parent, once:  ("ready", None) or ("failed", exception)
  parent -> child:        [(fn, args), ...]   one batch: fn(writes, conn, *args) each
  child -> parent:        [(result, error), ...]   after COMMIT returned
  parent -> child:        empty message: stop; the child closes the file, says "closed"
The child applies a batch as one transaction, each op inside its own SAVEPOINT, so one
failing op rolls back alone. A child whose parent vanished (the socket closed) exits.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from hub.timeline.store import StoreError, StoreUnavailable

# fn(writes, conn, *args): a module-level function (pickled by reference), usually one of
# the store's `_Writes` methods.
WriteFn = Callable[..., Any]
Outcome = tuple[Any, Exception | None]

_START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# The writer's page cache: the default 2 MiB holds little of the indexes a busy file has.
WRITER_CACHE_KIB = 65_536
CHECKPOINT_INTERVAL = 0.2  # seconds between background checkpoints
BACKSTOP_CHECKPOINT_PAGES = 20_000  # the writer checkpoints itself past this WAL size
RESTART_BACKOFF = 0.5
_PID = struct.Struct("!q")
_LENGTH = struct.Struct("!i")  # multiprocessing.connection's frame header


class _ForkServer:
    """A clean interpreter, started once per process, that forks each writer.

    Forking the hub itself would copy locks its other threads (readers, the loop's
    helpers) may hold at that instant; starting a fresh interpreter per writer costs a
    third of a second. The fork server imports the store once, then forks in
    milliseconds. It exits when this process closes its end (or dies); the writers exit
    when their own pipes close.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def spawn(self, path: Path) -> tuple[Pipe, int]:
        """A new writer for `path`: the pipe to it and its pid."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                control = self._running()
                try:
                    socket.send_fds(control, [os.fsencode(path)], [theirs.fileno()])
                    reply = control.recv(_PID.size)
                except OSError as exc:
                    self._forget()
                    raise StoreUnavailable(f"cannot start the SQLite writer: {exc}") from exc
                if len(reply) != _PID.size:
                    self._forget()
                    raise StoreUnavailable("the SQLite writer's fork server exited")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return Pipe(ours.detach()), _PID.unpack(reply)[0]

    def _running(self) -> socket.socket:
        if self._control is not None and self._process is not None:
            if self._process.poll() is None:
                return self._control
            self._forget()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The hub package may be run from a checkout rather than installed.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "hub.timeline.sqlite_writer", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            raise StoreUnavailable(f"cannot start the SQLite writer: {exc}") from exc
        finally:
            theirs.close()
        self._control = ours
        return ours

    def _forget(self) -> None:
        if self._control is not None:
            self._control.close()
        if self._process is not None:
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._control = self._process = None


_fork_server = _ForkServer()


def unavailable(exc: sqlite3.Error) -> StoreUnavailable:
    error = StoreUnavailable(f"SQLite error: {exc}")
    error.__cause__ = exc
    return error


def translate(exc: Exception) -> Exception:
    # Constraint violations are bugs or caller errors and keep their type; anything else
    # from SQLite (I/O error, disk full, locked) means the store cannot serve right now.
    if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
        return unavailable(exc)
    return exc


class WriterProcess:
    """One writer child: spawned through the fork server, ready once it opened the file.

    `start` blocks (run it off the event loop); afterwards the store's event loop owns
    the socket and speaks the protocol above over it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket: socket.socket | None = None
        self.pid: int | None = None

    def start(self) -> None:
        """Start the child and wait until it has opened the file."""
        pipe, pid = _fork_server.spawn(self.path)
        try:
            if not pipe.poll(_START_TIMEOUT):
                raise StoreUnavailable("the SQLite writer did not start in time")
            status, error = pickle.loads(pipe.recv_bytes())
        except (EOFError, OSError) as exc:
            pipe.close()
            raise StoreUnavailable("the SQLite writer exited while starting") from exc
        except BaseException:
            pipe.close()
            _kill(pid)
            raise
        if status != "ready":
            pipe.close()
            raise error
        sock = socket.socket(fileno=os.dup(pipe.fileno()))
        pipe.close()
        sock.setblocking(False)
        self.socket, self.pid = sock, pid

    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        if self.pid is not None:
            _kill(self.pid)


def frame(payload: bytes) -> bytes:
    """One message as the child's `Connection.recv_bytes` reads it."""
    return _LENGTH.pack(len(payload)) + payload


def encode_batch(ops: Sequence[tuple[WriteFn, tuple[Any, ...]]]) -> bytes:
    return frame(pickle.dumps(list(ops), pickle.HIGHEST_PROTOCOL))


STOP_FRAME = frame(b"")  # "no more batches": the child closes the file and says "closed"
CLOSED = b"closed"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- the child -------------------------------------------------------------------------


def fork_server(control: socket.socket) -> None:
    """Fork one writer per request until the hub closes the control socket."""
    # Ctrl-C and SIGTERM reach the whole process group; the hub decides when its writers
    # stop (after it has flushed what it accepted).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, _reap)
    import hub.timeline.sqlite  # noqa: F401 - imported once here, inherited by each fork
    from hub.process import quiet_collector

    quiet_collector()  # frozen here, the modules stay shared with every fork as well

    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 4096, 1)
        except InterruptedError:
            continue
        except OSError:
            return
        if not message:
            return  # the hub closed its end or died
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 1
            try:
                serve(os.fsdecode(message), Pipe(fds[0]))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(fds[0])
        control.sendall(_PID.pack(pid))


def _reap(signum: int, frame: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(path: str, pipe: Pipe) -> None:
    """One writer: open, report ready, apply batches until told to stop or orphaned."""
    from hub.timeline.sqlite import open_writes

    try:
        conn, writes = open_writes(Path(path))
    except Exception as exc:
        pipe.send_bytes(pickle.dumps(("failed", _picklable(exc))))
        return
    checkpointer = Checkpointer(Path(path))
    try:
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_CHECKPOINT_PAGES}")
        checkpointer.start()
        pipe.send_bytes(pickle.dumps(("ready", None)))
        while True:
            try:
                frame = pipe.recv_bytes()
            except (EOFError, OSError):
                return  # the hub is gone: nobody to answer
            if not frame:
                break
            outcomes = apply_batch(conn, writes, pickle.loads(frame))
            pipe.send_bytes(_dump_outcomes(outcomes))
    finally:
        checkpointer.stop()
        conn.close()
    try:
        pipe.send_bytes(b"closed")
    except OSError:
        pass


class Checkpointer:
    """Copies the WAL back into the database file from a thread of its own.

    Left to SQLite, the writer's own COMMIT runs the checkpoint whenever the WAL passes
    1,000 pages: at a few thousand messages a second that was dozens of times a second,
    each time holding up the commit the webhooks wait for. A PASSIVE checkpoint on a
    second connection runs beside the writer's commits instead (WAL allows it) and never
    waits for readers; the writer's own auto-checkpoint stays as a backstop should this
    one fall behind.
    """

    def __init__(self, path: Path, interval: float = CHECKPOINT_INTERVAL) -> None:
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub-sqlite-checkpoint")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return  # the backstop checkpoints instead
        try:
            conn.execute("PRAGMA busy_timeout = 1000")
            while not self._stop.wait(self._interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    continue  # disk full, locked: try again next time
        finally:
            conn.close()


def apply_batch(
    conn: sqlite3.Connection, writes: object, ops: Sequence[tuple[WriteFn, tuple[Any, ...]]]
) -> list[Outcome]:
    """One transaction for the whole batch, one SAVEPOINT per op."""
    outcomes: list[Outcome] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for fn, args in ops:
            outcomes.append(_apply(conn, writes, fn, args))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        # The transaction as a whole is lost, including ops that had succeeded in it.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        failure = unavailable(exc)
        return [(None, failure) for _ in ops]
    return outcomes


def _apply(conn: sqlite3.Connection, writes: object, fn: WriteFn, args: tuple[Any, ...]) -> Outcome:
    conn.execute("SAVEPOINT op")
    outcome: Outcome
    try:
        outcome = (fn(writes, conn, *args), None)
    except Exception as exc:
        if not conn.in_transaction:
            # SQLite already rolled back the whole transaction (e.g. disk full).
            raise sqlite3.OperationalError(f"transaction aborted: {exc}") from exc
        conn.execute("ROLLBACK TO op")
        outcome = (None, _picklable(translate(exc)))
    conn.execute("RELEASE op")
    return outcome


def _dump_outcomes(outcomes: list[Outcome]) -> bytes:
    try:
        return pickle.dumps(outcomes, pickle.HIGHEST_PROTOCOL)
    except Exception:
        # One result or error would not cross the pipe: the others must still arrive.
        return pickle.dumps([_picklable_outcome(o) for o in outcomes], pickle.HIGHEST_PROTOCOL)


def _picklable(error: Exception | None) -> Exception | None:
    """The error if it survives the trip to the parent (both ways: an exception whose
    constructor takes other arguments than its message pickles but does not unpickle),
    else a StoreError naming it."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return StoreError(f"{type(error).__name__}: {error}")
    return error


def _picklable_outcome(outcome: Outcome) -> Outcome:
    try:
        pickle.dumps(outcome)
    except Exception as exc:
        return (None, StoreError(f"a write's result could not reach the hub: {exc}"))
    return outcome


if __name__ == "__main__":
    fork_server(socket.socket(fileno=int(sys.argv[1])))
