"""A gRPC client for forkd: seeds, spawns and their events, instances, the node.

    from remotefork.client import Client

    with Client() as forkd:                  # FORKD_ADDR, or the default socket
        seed = forkd.create_seed(command=["python3", "fn.py"], ready_line="ready")
        for child in forkd.run(seed.id, count=3, stdin=b"request\\n"):
            print(child.index, child.pid, child.exit_code, child.stdout)
        for event in forkd.spawn(seed.id, count=2):   # events as they happen
            print(event.kind, event.index, event.pid)

Built on the stubs ``python3 -m remotefork.generate`` writes (needs
``grpcio`` and ``protobuf`` at run time, ``grpcio-tools`` to generate).
Addresses are those of ``forkctl``: ``unix:PATH`` or ``HOST:PORT``; over
TCP every call carries the bearer token (``token=``, ``token_file=`` or
``FORKD_TOKEN_FILE``). Channels are made with gRPC's default options.
Errors are :class:`ForkdError` subclasses named after the gRPC status.
"""

import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Sequence

try:
    import grpc
except ImportError as e:  # pragma: no cover - depends on the machine
    raise ImportError("remotefork.client needs grpcio: pip install grpcio protobuf") from e
try:
    from remotefork._pb import forkd_pb2 as pb
    from remotefork._pb import forkd_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "remotefork.client needs the generated stubs: run `python3 -m remotefork.generate` "
        "(pip install grpcio-tools)"
    ) from e

__all__ = [
    "Client", "Seed", "Event", "Child", "Instance", "NodeInfo", "Transport",
    "ForkdError", "NotFound", "PermissionDenied", "FailedPrecondition", "DeadlineExceeded",
    "Unauthenticated", "InvalidArgument", "Unavailable", "DEFAULT_ADDR",
]

DEFAULT_ADDR = "unix:/run/forkd/forkd.sock"


class ForkdError(Exception):
    """A call forkd refused or that failed; ``code`` is the ``grpc.StatusCode``."""

    def __init__(self, code, message):
        super().__init__(f"{message} ({code.name})")
        self.code = code
        self.message = message


class NotFound(ForkdError):
    """Unknown seed, pid or instance."""


class PermissionDenied(ForkdError):
    """Wrong seed key, or no ptrace rights over the process."""


class FailedPrecondition(ForkdError):
    """The process cannot be captured (threads, zombie) or exited before it was ready."""


class DeadlineExceeded(ForkdError):
    """The command did not print its ready line in time."""


class Unauthenticated(ForkdError):
    """TCP without the right bearer token."""


class InvalidArgument(ForkdError):
    """A malformed request."""


class Unavailable(ForkdError):
    """forkd is not reachable, or is shutting down and takes no new work."""


_ERRORS = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def _error(e):
    code = e.code()
    return _ERRORS.get(code, ForkdError)(code, e.details() or str(e))


@dataclasses.dataclass(frozen=True)
class Seed:
    """A seed: a captured process children start from."""

    id: str
    key: str
    name: str
    created_unix_ms: int
    source_pid: int
    image_bytes: int
    vmas: int
    pause_us: int
    capture_us: int
    node: str
    children_spawned: int

    @property
    def ref(self):
        """``ID#KEY``: what another node's spawn needs (with ``origin=``)."""
        return f"{self.id}#{self.key}"


@dataclasses.dataclass(frozen=True)
class Event:
    """One event of a child. ``kind`` is ``started``, ``running``,
    ``output`` (its first output), ``exited`` or ``failed`` (it could not
    be started); the fields of other kinds keep their defaults."""

    kind: str
    instance_id: str
    seed_id: str
    pid: int
    index: int
    time_to_running_ms: float = 0.0
    data: bytes = b""
    since_spawn_ms: float = 0.0
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    reason: str = ""
    stdout: bytes = b""
    faults: int = 0
    pages_installed: int = 0


@dataclasses.dataclass
class Child:
    """How one child of :meth:`Client.run` went."""

    index: int
    instance_id: str = ""
    pid: int = 0
    time_to_running_ms: Optional[float] = None
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    reason: str = ""
    stdout: bytes = b""
    faults: int = 0
    pages_installed: int = 0

    @property
    def ok(self):
        return self.exit_code == 0


@dataclasses.dataclass(frozen=True)
class Instance:
    id: str
    seed_id: str
    pid: int
    state: str
    labels: Dict[str, str]
    started_unix_ms: int


@dataclasses.dataclass(frozen=True)
class Transport:
    name: str
    available: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    version: str
    hostname: str
    kernel: str
    vdso_hash: str
    transports: List[Transport]
    cpus: int
    memory_bytes: int
    seeds: int
    instances_running: int
    transport: str
    transport_selected: str
    transport_reason: str
    pss_bytes: int


def _fields(cls, msg, **extra):
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
    return cls(**{n: getattr(msg, n) for n in names}, **extra)


def _event(ev):
    kind = ev.WhichOneof("kind") or ""
    base = dict(kind=kind, instance_id=ev.instance_id, seed_id=ev.seed_id, pid=ev.pid, index=ev.index)
    if kind == "running":
        base.update(time_to_running_ms=ev.running.time_to_running_ms)
    elif kind == "output":
        base.update(data=ev.output.data, since_spawn_ms=ev.output.since_spawn_ms)
    elif kind == "exited":
        x = ev.exited
        killed = x.signal != 0
        base.update(exit_code=None if killed else x.exit_code, signal=x.signal if killed else None,
                    reason=x.reason, stdout=x.stdout, faults=x.faults, pages_installed=x.pages_installed)
    elif kind == "failed":
        base.update(reason=ev.failed.reason)
    return Event(**base)


def parse_ref(ref):
    """``ADDR/ID#KEY``, ``ID#KEY`` or ``ID`` -> (origin, id, key), as forkctl reads them."""
    origin = ""
    if "/" in ref:
        origin, ref = ref.rsplit("/", 1)
    seed_id, _, key = ref.partition("#")
    return origin, seed_id, key


class Client:
    """A connection to one forkd."""

    def __init__(self, addr=None, token=None, token_file=None, timeout=None):
        self.addr = addr or os.environ.get("FORKD_ADDR") or DEFAULT_ADDR
        token_file = token_file or (None if token else os.environ.get("FORKD_TOKEN_FILE"))
        if token is None and token_file:
            with open(token_file) as f:
                token = f.read().strip()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # Unary calls' deadline in seconds (None: none); streams have none.
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.addr)
        self._stub = pb_grpc.ForkdStub(self._channel)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request, timeout=None):
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    def _stream(self, method, request):
        call = getattr(self._stub, method)(request, metadata=self._metadata)
        try:
            for ev in call:
                yield _event(ev)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            # A caller that stops iterating early ends the call.
            call.cancel()

    # Seeds

    def create_seed(self, *, pid: Optional[int] = None, command: Optional[Sequence[str]] = None,
                    ready_line: str = "", ready_timeout_ms: int = 0, cwd: str = "",
                    env: Optional[Dict[str, str]] = None, name: str = "") -> Seed:
        """Capture process ``pid``, or start ``command`` and capture it once
        it prints ``ready_line`` on stdout (``env`` is added to forkd's)."""
        if (pid is None) == (command is None):
            raise ValueError("give pid= or command= (with ready_line=)")
        if pid is not None:
            req = pb.CreateSeedRequest(pid=pid, name=name)
        else:
            req = pb.CreateSeedRequest(
                command=pb.StartCommand(argv=list(command), ready_line=ready_line,
                                        ready_timeout_ms=ready_timeout_ms, cwd=cwd, env=env or {}),
                name=name)
        return _fields(Seed, self._call("CreateSeed", req))

    def get_seed(self, seed_id: str, key: str = "") -> Seed:
        return _fields(Seed, self._call("GetSeed", pb.SeedRef(id=seed_id, key=key)))

    def list_seeds(self) -> List[Seed]:
        return [_fields(Seed, s) for s in self._call("ListSeeds", pb.ListSeedsRequest()).seeds]

    def drop_seed(self, seed_id: str, key: str = "") -> None:
        self._call("DropSeed", pb.SeedRef(id=seed_id, key=key))

    # Children

    def spawn(self, seed: str, count: int = 1, stdin: bytes = b"", *, prefetch: str = "",
              eager: bool = False, labels: Optional[Dict[str, str]] = None, args: str = "",
              origin: str = "", no_template: bool = False, capture_stdout: bool = True) -> Iterator[Event]:
        """Start ``count`` children from ``seed`` (an id, ``ID#KEY`` or a
        reference ``ADDR/ID#KEY``), each given ``stdin`` whole; yields their
        events as they happen, until every child has exited or failed."""
        if count < 1:
            raise ValueError("count must be at least 1")
        ref_origin, seed_id, key = parse_ref(seed)
        req = pb.SpawnRequest(
            seed=pb.SeedRef(id=seed_id, key=key), count=count, stdin=stdin,
            stdout=pb.STDOUT_MODE_CAPTURE if capture_stdout else pb.STDOUT_MODE_NULL,
            labels=labels or {}, prefetch=prefetch, eager=eager, args=args,
            origin=origin or ref_origin, no_template=no_template)
        ended = 0
        for ev in self._stream("Spawn", req):
            yield ev
            if ev.kind in ("exited", "failed"):
                ended += 1
                if ended == count:
                    return

    def prepare(self, seed: str, *, prefetch: str = "", eager: bool = False, origin: str = "",
                no_template: bool = False) -> Dict[str, object]:
        """Make the node ready to start children of ``seed`` (an id or a
        reference) in this mode without starting one: another node's seed
        and container rootfs fetched, the node's template built and its
        spare forked. Returns ``{"seed", "template_built", "ms"}``."""
        ref_origin, seed_id, key = parse_ref(seed)
        req = pb.SpawnRequest(
            seed=pb.SeedRef(id=seed_id, key=key), prefetch=prefetch, eager=eager,
            origin=origin or ref_origin, no_template=no_template)
        r = self._call("PrepareSeed", req)
        return {"seed": r.seed_id, "template_built": r.template_built, "ms": r.ms}

    def run(self, seed: str, count: int = 1, stdin: bytes = b"", **kw) -> List[Child]:
        """:meth:`spawn` and wait for every child: one :class:`Child` each, by index."""
        children = {i: Child(index=i) for i in range(count)}
        for ev in self.spawn(seed, count, stdin, **kw):
            c = children[ev.index]
            c.instance_id = ev.instance_id
            c.pid = ev.pid or c.pid
            if ev.kind == "running":
                c.time_to_running_ms = ev.time_to_running_ms
            elif ev.kind == "exited":
                c.exit_code, c.signal, c.reason = ev.exit_code, ev.signal, ev.reason
                c.stdout, c.faults, c.pages_installed = ev.stdout, ev.faults, ev.pages_installed
            elif ev.kind == "failed":
                c.reason = ev.reason
        return [children[i] for i in range(count)]

    def list_instances(self, seed_id: str = "") -> List[Instance]:
        r = self._call("ListInstances", pb.ListInstancesRequest(seed_id=seed_id))
        return [_fields(Instance, i, labels=dict(i.labels)) for i in r.instances]

    def kill(self, instance_id: str) -> None:
        self._call("KillInstance", pb.KillInstanceRequest(instance_id=instance_id))

    def watch(self) -> Iterator[Event]:
        """Every instance event of this node from now on (stop iterating to end it)."""
        return self._stream("Watch", pb.WatchRequest())

    # The node

    def node_info(self) -> NodeInfo:
        n = self._call("NodeInfo", pb.NodeInfoRequest())
        transports = [Transport(t.name, t.available, t.reason) for t in n.transports]
        return _fields(NodeInfo, n, transports=transports)
