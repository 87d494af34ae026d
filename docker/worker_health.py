"""The worker container's launcher and health probe (copied into the worker image as
/app/worker_health.py; the image's CMD and HEALTHCHECK and the Kubernetes probes run it).

    python /app/worker_health.py run [selfcascade-worker arguments]
    python /app/worker_health.py startup|readiness|liveness

`run` names the worker <WORKER_NAME or the hostname>-<8 hex digits>, writes that name to
NAME_FILE (WORKER_NAME_FILE, default /tmp/selfcascade-worker-name) and replaces itself with
`selfcascade-worker --name <name>` (so the worker stays the container's main process and gets
its SIGTERM). WORKER_NAME is the pod's name in Kubernetes (downward API). The suffix is new at
every container start: RQ refuses to start a worker whose name still has a live RQ worker key
(it outlives a crashed process by up to worker_ttl + 60 s), so a restarted container reusing
its pod's bare name would crash-loop for that long.

The probes read that name and check the worker's presence key (contract.keys
RedisKeys.worker(name)), which the worker re-publishes with a TTL from its heartbeat, while it
waits for jobs and while it runs one (worker/process.py publish_presence): the key exists only
while the worker's loop is alive, after its models loaded. Settings come from
contract.settings.Settings, so SELFCASCADE_REDIS_URL, REDIS_URL and SELFCASCADE_REDIS_PREFIX
mean here what they mean to the worker.

When Redis cannot be reached:
- liveness passes (and says so): restarting workers does not bring Redis back, would restart
  every worker at once and throw away their loaded models; the worker's own loop reconnects
  (RQ backs off up to 60 s) and a worker still silent once Redis answers fails then;
- startup and readiness fail: a worker that cannot reach Redis cannot take jobs.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

NAME_FILE = Path(os.environ.get("WORKER_NAME_FILE", "/tmp/selfcascade-worker-name"))
PROBES = ("startup", "readiness", "liveness")
REDIS_TIMEOUT_S = 3.0  # connect, then the command: well inside the probes' 10 s


def worker_name(argv: Sequence[str], environ: dict[str, str] | None = None) -> str:
    """The name given with --name, or <WORKER_NAME or hostname>-<random>."""
    for i, arg in enumerate(argv):
        if arg == "--name" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--name="):
            return arg.split("=", 1)[1]
    env = os.environ if environ is None else environ
    base = env.get("WORKER_NAME") or socket.gethostname()
    return f"{base}-{secrets.token_hex(4)}"


def launch(argv: Sequence[str], name_file: Path = NAME_FILE) -> list[str]:
    """The worker's command line, after writing its name where the probes read it."""
    name = worker_name(argv)
    name_file.write_text(name + "\n")
    command = ["selfcascade-worker", *argv]
    if not any(arg == "--name" or arg.startswith("--name=") for arg in argv):
        command += ["--name", name]
    return command


def probe(kind: str, name_file: Path = NAME_FILE) -> tuple[bool, str]:
    """(healthy, why) for one probe kind."""
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
    from redis.retry import Retry

    from contract.keys import RedisKeys
    from contract.settings import Settings

    try:
        name = name_file.read_text().strip()
    except OSError as exc:
        return False, f"no worker name in {name_file} (started without `run`?): {exc}"
    settings = Settings()
    if not settings.redis_url:
        return False, "SELFCASCADE_REDIS_URL (or REDIS_URL) is not set"
    key = RedisKeys(settings.redis_prefix).worker(name)
    client = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),  # one try: the probe must answer within its timeoutSeconds
    )
    try:
        present = bool(client.exists(key))
    except RedisError as exc:
        if kind == "liveness":
            return True, f"redis unreachable ({exc}); not the worker's fault, staying alive"
        return False, f"redis unreachable: {exc}"
    finally:
        client.close()
    if present:
        return True, f"worker {name} is heartbeating"
    return False, f"no presence key {key}: worker {name} has not published it within its TTL"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        command = launch(args[1:], NAME_FILE)
        os.execvp(command[0], command)
    if len(args) != 1 or args[0] not in PROBES:
        print(f"usage: worker_health.py run [worker args] | {'|'.join(PROBES)}", file=sys.stderr)
        return 2
    healthy, why = probe(args[0], NAME_FILE)
    print(f"{args[0]}: {why}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
