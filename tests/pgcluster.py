"""A private PostgreSQL cluster for the tests: Debian's server binaries, a temp folder, loopback.

`initdb` a fresh cluster under the test's temp folder, start it on a free port (TCP on
127.0.0.1 only, its socket in the same folder), make a role with a password and a database,
and stop it at the end. PostgreSQL refuses to run as root (CI runs as root): then the cluster
belongs to the `postgres` user that Debian's package creates and its commands run through
`runuser`. The node connects as a client would: by URL, its password from a libpq pass file.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from helpers import free_port

ROLE = "m3dicom"


def server_bin() -> Path:
    """Debian's newest server binaries (/usr/lib/postgresql/N/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("no PostgreSQL server: install the Debian package postgresql (make install does)")
    return found[-1].parent


class Cluster:
    def __init__(self):
        # its own folder in /tmp: the postgres user cannot reach into pytest's folders (0700, root's)
        self.base = Path(tempfile.mkdtemp(prefix="m3dicom-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.passfile = self.base / "pgpass"
        self.bin = server_bin()
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120, **kw)

    def start(self) -> "Cluster":
        if self._as_root:
            shutil.chown(self.base, "postgres", "postgres")
        self.base.chmod(0o700)
        pwfile = self.base / "initial-password"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", ROLE, "--pwfile", str(pwfile), "-A", "scram-sha-256",
                  "-E", "UTF8", "--locale", "C.UTF-8", "--no-sync")
        pwfile.unlink()
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.base} "
                   "-c max_connections=200 -c shared_buffers=128MB -c log_min_messages=warning")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.base / "server.log"), "-w",
                  "-t", "60", "start")
        self.passfile.write_text(f"127.0.0.1:{self.port}:*:{ROLE}:{self.password}\n")
        self.passfile.chmod(0o600)
        self.create_database(ROLE)
        return self

    def create_database(self, name: str) -> str:
        """A new empty database; its URL (no password: it is in the pass file)."""
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, name],
                       check=True, capture_output=True, timeout=60, env=env)
        return self.url(name)

    def url(self, database: str = ROLE) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs besides the URL: libpq reads the password from this file."""
        return {"PGPASSFILE": str(self.passfile)}

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
