"""`make mlflow-server`: an MLflow tracking server for a team, on PostgreSQL, serving artifacts.

Starts (and on first use creates) a PostgreSQL cluster in `--dir` listening on 127.0.0.1 only,
then `mlflow server` with that database as the backend store and `--dir`/artifacts as the
artifact store, served through the tracking server (`--serve-artifacts`), so clients need only
`MLFLOW_TRACKING_URI=http://HOST:PORT`. Stopping the server (Ctrl-C, SIGTERM) stops PostgreSQL.

PostgreSQL comes from the system (Debian: `apt-get install postgresql`); as root it runs as the
`postgres` user, because PostgreSQL refuses to run as root. For a shared host, put it behind
your network's access control or a proxy with authentication: the database trusts loopback
connections and the tracking server has no login of its own.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

DATABASE = "mlflow"
USER = "mlflow"


class ServerError(RuntimeError):
    """PostgreSQL or the tracking server cannot be started."""


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl, createdb): on PATH or Debian's folder."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise ServerError(
            f"PostgreSQL's {name} is not installed; on Debian: apt-get install postgresql"
        )
    return found


def _as_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, its programs run as the postgres user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _run(cmd: list[str]) -> str:
    done = subprocess.run(_as_owner(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise ServerError(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def start_postgres(folder: Path, port: int) -> Path:
    """Create the cluster (once) and start it on 127.0.0.1:`port`; returns its data folder."""
    data = folder / "postgres"
    if os.geteuid() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "postgres")
        reach = subprocess.run(_as_owner(["test", "-w", str(folder)]), capture_output=True)
        if reach.returncode != 0:
            raise ServerError(
                f"{folder}: the postgres user cannot reach it (a parent folder is private); "
                "choose a --dir under a folder others may enter, e.g. /srv or /var/lib"
            )
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
        _run([postgres_bin("initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8"])
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    _run(
        [
            postgres_bin("pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(data / "log"),
            "-w",
            "start",
        ]
    )
    try:
        _run([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE])
    except ServerError as exc:
        if "already exists" not in str(exc):
            raise
    return data


def stop_postgres(data: Path) -> None:
    _run([postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])


def serve(folder: Path, host: str, port: int, db_port: int) -> int:
    folder = folder.resolve()
    data = start_postgres(folder, db_port)
    artifacts = folder / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    store = f"postgresql+psycopg2://{USER}@127.0.0.1:{db_port}/{DATABASE}"
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow) if mlflow.is_file() else "mlflow",
        "server",
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        str(artifacts),
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    print(f"PostgreSQL {store}; artifacts in {artifacts}", flush=True)
    print(f"tracking server: export MLFLOW_TRACKING_URI=http://{host}:{port}", flush=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(cmd, env=env)
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.terminate()
        code = server.wait()
    finally:
        stop_postgres(data)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(".mlflow-server"), help="db + artifacts")
    parser.add_argument("--host", default="127.0.0.1", help="the tracking server's address")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--db-port", type=int, default=5433, help="PostgreSQL, on 127.0.0.1")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"tracking server on {args.host}: reachable from the network", file=sys.stderr)
    try:
        return serve(args.dir, args.host, args.port, args.db_port)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
