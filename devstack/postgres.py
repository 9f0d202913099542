"""A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``) from Debian's packages."""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from devstack.processes import StackError, port_accepts, tail

SUPERUSER = "tuo"
DATABASE = "tuo"
# initdb and postgres refuse to run as root; when we are root, run them as this user.
SERVICE_USER_WHEN_ROOT = "postgres"


def find_bin_dir() -> Path:
    """The newest installed PostgreSQL server's bin directory."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise StackError(
        "PostgreSQL server is not installed (no initdb); run scripts/setup.sh, "
        "which installs Debian's postgresql package"
    )


def service_user() -> str | None:
    """The user PostgreSQL runs as: ourselves, or ``postgres`` when we are root."""
    return SERVICE_USER_WHEN_ROOT if os.geteuid() == 0 else None


def reachable_by_service_user(directory: Path) -> bool:
    """Can the service user create files in ``directory`` (or its nearest existing parent)?"""
    user = service_user()
    if user is None:
        return True
    existing = directory
    while not existing.exists():
        existing = existing.parent
    probe = subprocess.run(["test", "-x", str(existing)], user=user, capture_output=True, check=False)
    return probe.returncode == 0


@dataclass(frozen=True)
class PostgresServer:
    home: Path  # holds data/ and server.log
    port: int
    password: str

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        user = service_user()
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            check=False,
            user=user,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise StackError(
                f"{Path(args[0]).name} failed:\n{result.stdout}{result.stderr}\n"
                f"server log:\n{tail(self.log_file)}"
            )
        return result

    def _own(self, path: Path) -> None:
        if service_user() is not None:
            entry = pwd.getpwnam(SERVICE_USER_WHEN_ROOT)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def is_running(self) -> bool:
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        status = self._run([str(find_bin_dir() / "pg_ctl"), "status", "-D", str(self.data_dir)], check=False)
        return status.returncode == 0

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        bin_dir = find_bin_dir()
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)
        self._own(self.home)
        pwfile = self.home / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._own(pwfile)
        try:
            self._run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "--pwfile",
                    str(pwfile),
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, timeout: float = 60.0) -> None:
        self.init()
        if not self.is_running():
            if not self.log_file.exists():
                self.log_file.touch()
                self._own(self.log_file)
            # Room for every component's pool (TUO_DATABASE_POOL_SIZE, 30 by default) when each
            # runs as its own process, and for the tests' processes beside them.
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='' -c fsync=on"
                " -c max_connections=300"
            )
            self._run(
                [
                    str(find_bin_dir() / "pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-o",
                    options,
                ]
            )
        deadline = time.monotonic() + timeout
        while not port_accepts(self.port):
            if time.monotonic() > deadline:
                raise StackError(f"PostgreSQL is not accepting connections; see {self.log_file}")
            time.sleep(0.1)
        self._ensure_database()

    def _ensure_database(self) -> None:
        asyncio.run(self._create_database_once())

    async def _create_database_once(self) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password, database="postgres"
        )
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await conn.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await conn.close()

    def stop(self) -> None:
        if not self.is_running():
            return
        self._run([str(find_bin_dir() / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data_dir)])
