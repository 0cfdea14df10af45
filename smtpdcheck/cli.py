"""The ``smtpdcheck`` command, drop-in compatible with Mail Avenger's.

Exit status is the interface scripts rely on: 1 and the server's name on
stdout when one is available, 0 and nothing when none is, 2 and one line on
stderr on bad usage or a system error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Final, NoReturn, TextIO, TypeVar

import trio

from . import defaults, release, values
from .check import CheckResult
from .compat import STRICT_EXCEPTION_GROUPS
from .core import Core, CoreSettings, open_core
from .policy import Kind, Policy
from .resolver import DNSConfigError, parse_nameserver
from .servers import Server, ServerSyntaxError, parse_servers
from .stophost import StopHostError

_T = TypeVar("_T")

EXIT_NONE: Final = 0
EXIT_AVAILABLE: Final = 1
EXIT_ERROR: Final = 2

DESCRIPTION = """\
Check whether SMTP servers are available.  Meant for secondary mail
servers, which have no reason to accept mail while a primary is up.

Each argument is a server name, IPv4 address or [IPv6] address, optionally
prefixed by a numeric MX priority and a colon (prio:server), the format of
an MX list.  A server is available when one of its addresses accepts a TCP
connection on the SMTP port and greets with a 220 reply.  All servers that
the --stop rule allows, and all addresses of each, are probed at once; the
first available one ends the run.
"""

EPILOG = """\
stop rule:
  Servers are considered in the order given.  The first server that is this
  host (its name is given with --stop, or one of its addresses is a --stop
  address) and every server after it are not checked.  If that server has a
  prio, no server with the same prio is checked either, wherever it stands.
  A --stop name that does not resolve is an error (exit 2); a server name
  that does not resolve is simply not available.

exit status:
  1  a server is available; its name, as written, is printed on stdout
     (the earliest in the list if several are known available at once)
  0  no server is available; nothing is printed
  2  bad usage or a system error; one line on stderr

examples:
  smtpdcheck --stop s2.domain.com 10:s1.domain.com 10:s2.domain.com 20:s3.domain.com
      always exits 0: s2 (this host) has the same priority as s1.
  smtpdcheck --stop s2.domain.com 10:s1.domain.com 20:s2.domain.com 20:s3.domain.com
      prints s1.domain.com and exits 1 when s1 is up.
  server=`smtpdcheck --stop $MYIP $RECIP_MXES`
      the Mail Avenger idiom: defer when $server is non-empty.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: {message}\n")


def _arg(check: Callable[[object], _T]) -> Callable[[str], _T]:
    """A shared validator as an argparse ``type``: its message becomes the error."""

    def convert(text: str) -> _T:
        try:
            return check(text)
        except values.BadValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


_non_negative = _arg(values.seconds)
_port = _arg(values.port)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smtpdcheck",
        usage="%(prog)s [--stop {ip-addr|name}] [--timeout seconds] [options] [prio:]server [[prio:]server ...]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {release.version()}")
    parser.add_argument("servers", nargs="*", metavar="[prio:]server", help="servers to check, in order")
    parser.add_argument(
        "--stop", action="append", default=[], metavar="{ip-addr|name}",
        help="this host; stop before checking it (see stop rule); may be repeated",
    )
    parser.add_argument(
        "--timeout", type=_non_negative, default=defaults.MAIL_AVENGER_TIMEOUT_S, metavar="seconds",
        help=f"time allowed for each server: lookup, connect and greeting (default {defaults.MAIL_AVENGER_TIMEOUT_S:g}; 0 = no limit)",
    )
    parser.add_argument("--smtp-port", type=_port, default=defaults.SMTP_PORT, metavar="N", help=f"SMTP port to probe (default {defaults.SMTP_PORT})")
    parser.add_argument(
        "--nameserver", action="append", default=[], metavar="IP[:PORT]",
        help="DNS server to ask (repeatable; default: the system resolver configuration)",
    )
    parser.add_argument(
        "--sequential", action="store_true",
        help="probe one server after another, in list order, as Mail Avenger did",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="report each server's outcome on stderr")
    parser.add_argument(
        "--mx", metavar="DOMAIN",
        help="instead of a server list, look up DOMAIN's MX hosts and explain the decision the policy "
        "server's algorithm makes for it: the MX list, what was probed, each outcome, the verdict "
        "(exit 1 = a more-preferred MX is up, 2 = DNS failure).  Unlike the daemon, only --stop says "
        "which MX is this host (there is no server_address), and this command's --timeout applies",
    )
    return parser


def format_report(result: CheckResult, out: TextIO) -> None:
    for report in result.reports:
        server = report.server
        label = f"{server.prio}:{server.name}" if server.prio is not None else server.name
        addrs = ",".join(str(a) for a in report.addresses) or "-"
        # A server cut off by the timeout has no probe result to time: its
        # own check's time is what the reader wants.  One not checked (this
        # host, or after it) took none.
        spent = report.elapsed if report.eligible else 0.0
        ms = max([spent, *(p.elapsed for p in report.probes)]) * 1000
        cache = " (cached)" if report.cached and report.probes else ""
        print(f"smtpdcheck: {label} [{addrs}] {report.summary()}{cache} {ms:.1f} ms", file=out)


def core_settings(args: argparse.Namespace) -> CoreSettings:
    # The per-server timeout bounds lookup plus probe together, as the man
    # page says; lookups get half of it so a hung nameserver leaves time to
    # probe the servers that did resolve.
    dns_timeout = min(defaults.COMMAND_DNS_TIMEOUT_S, args.timeout / 2) if args.timeout > 0 else defaults.COMMAND_DNS_TIMEOUT_S
    return CoreSettings(
        nameservers=[parse_nameserver(n) for n in args.nameserver],
        dns_timeout=dns_timeout,
        probe_timeout=args.timeout,
        check_timeout=args.timeout,
        smtp_port=args.smtp_port,
        stop=args.stop,
    )


async def _run(args: argparse.Namespace, servers: list[Server]) -> int:
    try:
        async with open_core(core_settings(args)) as core:
            if args.mx is not None:
                code = await _explain_mx(args.mx, core, args.sequential)
            else:
                result = await core.checker.check(servers, core.stop, sequential=args.sequential)
                if result.winner is not None:
                    print(result.winner.name, flush=True)
                if args.verbose:
                    format_report(result, sys.stderr)
                code = EXIT_AVAILABLE if result.winner is not None else EXIT_NONE
            sys.stdout.flush()
            await core.let_probes_finish()
    except StopHostError as exc:
        print(f"smtpdcheck: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return code


async def _explain_mx(recipient: str, core: Core, sequential: bool) -> int:
    """``--mx``: the policy's decision for a domain, step by step.

    The same :class:`~smtpdcheck.policy.Policy` the daemon runs, with this
    command's timeouts, no deadline beyond them and no ``server_address``:
    only ``--stop`` says which MX is this host.
    """
    policy = Policy(core.lookups, core.checker, core.stop, sequential=sequential)
    decision = await policy.decide_recipient(recipient if "@" in recipient else "@" + recipient)
    kind = decision.verdict.kind
    if kind in (Kind.BAD_DOMAIN, Kind.NO_DOMAIN):
        reason = decision.verdict.reason if kind is Kind.BAD_DOMAIN else "no domain to look up"
        print(f"smtpdcheck: --mx {recipient!r}: {reason}", file=sys.stderr)
        return EXIT_ERROR
    for line in decision.explain():
        print(line)
    if kind.failed:
        print(f"smtpdcheck: --mx {decision.domain}: {decision.verdict.reason}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_AVAILABLE if decision.verdict.defers else EXIT_NONE


def _unwrapped(args: argparse.Namespace, servers: list[Server]) -> int:
    """Run, turning a one-exception group back into that exception."""
    try:
        return trio.run(_run, args, servers, strict_exception_groups=STRICT_EXCEPTION_GROUPS)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        raise leaf from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.servers and args.mx is None:
        parser.error("no servers given")
    if args.servers and args.mx is not None:
        parser.error("--mx takes no server list")
    try:
        servers = parse_servers(args.servers)
        return _unwrapped(args, servers)
    except (ServerSyntaxError, DNSConfigError) as exc:
        print(f"smtpdcheck: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"smtpdcheck: system error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
