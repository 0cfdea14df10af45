"""Making a unit's listening socket as systemd makes it, for tests without systemd.

The end-to-end tests run where systemd is not PID 1, yet what they must
prove is that the socket a ``.socket`` unit describes (its directory, owner,
group and modes) is one a real Postfix smtpd can reach.  This does what
systemd's socket.c does for a ``ListenStream=/path`` unit, as root: create
the missing parent directories with ``DirectoryMode=`` (owned by root, PID
1's umask 0022), bind with the umask that leaves ``SocketMode=``, then chown
the socket to ``SocketUser=``/``SocketGroup=``.  The values are read from the
unit file itself, so the test follows whatever the shipped unit says.
"""

from __future__ import annotations

import configparser
import contextlib
import grp
import os
import pwd
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UnixSocketUnit:
    listen: str
    directory_mode: int
    socket_user: str
    socket_group: str
    socket_mode: int
    service: str

    @classmethod
    def read(cls, path: Path) -> UnixSocketUnit:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(path.read_text())
        unit = parser["Socket"]
        return cls(
            listen=unit["ListenStream"],
            directory_mode=int(unit.get("DirectoryMode", "0755"), 8),
            socket_user=unit.get("SocketUser", "root"),
            socket_group=unit.get("SocketGroup", "root"),
            socket_mode=int(unit.get("SocketMode", "0666"), 8),
            service=unit.get("Service", path.stem + ".service"),
        )

    def listen_under(self, prefix: str, root: Path) -> tuple[socket.socket, Path]:
        """Listen as systemd would, with ``prefix`` of ``ListenStream=`` moved to ``root``."""
        assert self.listen.startswith(prefix + "/"), (self.listen, prefix)
        path = root / self.listen[len(prefix) + 1:]
        missing = [p for p in reversed(path.parents) if not p.exists()]
        old = os.umask(0o022)  # PID 1's
        try:
            for directory in missing:
                directory.mkdir(mode=self.directory_mode)
                os.chown(directory, 0, 0)
        finally:
            os.umask(old)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(~self.socket_mode & 0o777)
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(256)
        os.chown(path, pwd.getpwnam(self.socket_user).pw_uid, grp.getgrnam(self.socket_group).gr_gid)
        return sock, path
