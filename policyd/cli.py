"""``smtpdcheck-policyd``: the Postfix policy server's command line and main loop."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

import trio

from smtpdcheck import release
from smtpdcheck.compat import STRICT_EXCEPTION_GROUPS
from smtpdcheck.core import Core, CoreSettings, open_core
from smtpdcheck.resolver import RESOLV_CONF, DNSConfigError
from smtpdcheck.servers import parse_address
from smtpdcheck.stophost import StopHostError
from smtpdcheck.stoprule import StopSet

from . import config as cfg
from . import systemd
from .clients import exposed_endpoint
from .exposition import MetricsUnavailable, make_registry, serve_metrics
from .listeners import ListenError, endpoint_of, open_listeners, unix_paths
from .logsetup import close_logging, current_sink, setup_logging
from .server import PolicyServer, handle_connection, start_watchdog
from .responder import Responder, core_settings

log = logging.getLogger("smtpdcheck.policyd")

SHUTDOWN_GRACE_S = 5.0

DESCRIPTION = """\
Postfix policy server for backup MX hosts.  On each RCPT it looks up the
recipient domain's MX hosts, finds this host among them (the request's
server_address plus --stop), probes the more-preferred ones at once, and
answers DEFER_IF_PERMIT naming a live one, or DUNNO.  Any failure answers
the failure action (DUNNO: fail-open).  When in doubt it accepts: a primary
seen up is probed again every --cache-up-ttl while its domains get mail, and
an "up" that its probe does not confirm in time answers DUNNO at once.
"""

# The lines of etc/postfix-snippets/main.cf without its comments, which
# say why each is there; tests/test_wiring.py keeps the two equal and every
# other example (README, the manual page, the other snippets) in this order.
MAIN_CF_EXAMPLE = f"""\
relay_domains = hash:/etc/postfix/relay_domains
relay_recipient_maps = hash:/etc/postfix/relay_recipients
smtpd_relay_restrictions =
    permit_mynetworks,
    permit_sasl_authenticated,
    reject_unauth_destination
smtpd_restriction_classes = smtpdcheck_backup
smtpdcheck_backup =
    check_policy_service {{ {cfg.DEFAULT_LISTEN}, timeout=10s, try_limit=1, default_action=DUNNO }}
smtpd_recipient_restrictions =
    permit_mynetworks,
    permit_sasl_authenticated,
    reject_unlisted_recipient,
    check_recipient_access hash:/etc/postfix/relay_domains
"""
# The table both relay_domains and check_recipient_access read: a domain's
# value selects the check (see the snippet's comments).
RELAY_DOMAINS_EXAMPLE = "example.com     smtpdcheck_backup"

EPILOG = (
    "Postfix wiring (main.cf):\n"
    + textwrap.indent(MAIN_CF_EXAMPLE, "  ")
    + "  and in /etc/postfix/relay_domains (then: postmap /etc/postfix/relay_domains):\n"
    + f"    {RELAY_DOMAINS_EXAMPLE}\n"
    + "  (the relay check and the permit_* exemptions come before the policy check, which\n"
    "  runs only for relay domains; see the commented snippets in the package's examples\n"
    "  or etc/postfix-snippets/)\n\n"
) + textwrap.fill(
    "signals: SIGHUP re-reads the configuration file; these options keep their running values "
    f"until a restart ({', '.join(cfg.RESTART_ONLY)}).  SIGTERM and SIGINT stop accepting, let "
    "requests in progress finish for a few seconds, and exit 0.  A signal that arrives during "
    "start-up is held until the daemon serves, then acted on.",
    width=76,
) + "\n"


@dataclass(frozen=True, slots=True)
class SystemFiles:
    """The system files read when the command line names none.

    One place for them, so the documents name the same paths the code
    reads, and tests can give files of their own instead of the real /etc.
    """

    config: Path = Path("/etc/smtpdcheck/policyd.toml")
    resolv_conf: Path = Path(RESOLV_CONF)

    def config_path(self, given: str | None) -> Path | None:
        """The configuration file to read: the one given, else the default one if it exists.

        ``--config ''`` means none, as when the default file does not exist.
        The existence is looked at again on every reload, as Postfix's
        tools read main.cf where it is.
        """
        if given is None:
            return self.config if self.config.exists() else None
        return Path(given) if given else None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def build_parser(files: SystemFiles = SystemFiles()) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smtpdcheck-policyd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {release.version()}")
    parser.add_argument(
        "--config", metavar="PATH",
        help=f"TOML configuration file; flags override it (default: {files.config} if it exists; '' = none)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--stdio", action="store_true",
        help="serve one Postfix connection on stdin/stdout (Postfix spawn(8)); logs never go to stderr",
    )
    mode.add_argument(
        "--check", metavar="ADDRESS",
        help="decide one RCPT for ADDRESS with this configuration, print the reply and exit "
        "(1 = would defer, 0 = would not, 2 = could not decide: DNS failure, deadline, error)",
    )
    parser.add_argument(
        "--server-address", metavar="IP",
        help="with --check only: the IP address Postfix was reached on (the request's server_address)",
    )
    cfg.add_arguments(parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with the checks that concern more than one flag."""
    args = parser.parse_args(argv)
    if args.server_address is not None:
        if args.check is None:
            parser.error("--server-address is only for --check (the daemon reads it from each request)")
        if parse_address(args.server_address) is None:
            parser.error(f"--server-address: not an IP address: {args.server_address!r}")
    return args


def load(args: argparse.Namespace, files: SystemFiles) -> cfg.Config:
    return cfg.build(args, files.config_path(args.config), stdio=args.stdio)


def settings_of(config: cfg.Config, files: SystemFiles) -> CoreSettings:
    return replace(core_settings(config), resolv_conf=str(files.resolv_conf))


async def _resolve_stop(config: cfg.Config, responder: Responder) -> StopSet:
    return await responder.core.resolve_stop(config.stop, system_fallback=not config.nameserver)


async def run_daemon(config: cfg.Config, args: argparse.Namespace, files: SystemFiles) -> int:
    """Serve until SIGTERM or SIGINT; 2 after a ``fatal:`` line.

    The signal receiver is installed first, before anything that can take
    time (a ``--stop`` name's lookup, binding): a signal that arrives during
    start-up is held and acted on once the daemon serves, instead of
    killing it with the default action of SIGHUP.
    """
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        try:
            inherited = systemd.inherited_sockets()
            async with open_core(settings_of(config, files)) as core:
                # Caught in here: raised through the core's nursery, they would come out in a group.
                try:
                    await _listen_and_serve(config, core, inherited, signals, args, files)
                except (ListenError, MetricsUnavailable) as exc:
                    log.critical("%s", exc)
                    return 2
        except (StopHostError, DNSConfigError, ListenError) as exc:
            log.critical("%s", exc)
            return 2
    return 0


async def _listen_and_serve(
    config: cfg.Config, core: Core, inherited: list[socket.socket], signals: AsyncIterator[int],
    args: argparse.Namespace, files: SystemFiles,
) -> None:
    """Listen, serve, and on every way out close the listeners and remove the socket files this run made."""
    responder = Responder(config, core, sink=current_sink())
    if inherited:
        listeners = systemd.listeners_from(inherited)
        try:
            _check_exposed([endpoint_of(listener) for listener in listeners], config)
        except ListenError:
            for listener in listeners:
                listener.socket.close()
            raise
    else:
        _check_exposed(config.listen, config)
        listeners = await open_listeners(config.listen, socket_mode=config.socket_mode, socket_group=config.socket_group)
    made = [] if inherited else unix_paths(config.listen)
    try:
        await _serve(config, responder, listeners, inherited, signals, args, files)
    finally:
        for listener in listeners:
            listener.socket.close()
        for path in made:
            try:
                os.unlink(path)
            except OSError:
                pass


async def _serve(
    config: cfg.Config, responder: Responder, listeners: list[trio.SocketListener], inherited: list[socket.socket],
    signals: AsyncIterator[int], args: argparse.Namespace, files: SystemFiles,
) -> None:
    """Open the metrics listener, serve, and return when a signal says stop."""
    if config.metrics:
        registry = make_registry(responder)
        metric_listeners = await open_listeners((config.metrics,), socket_mode=0o600)
    async with trio.open_nursery() as nursery:
        if responder.sink is not None:
            nursery.start_soon(responder.sink.run)
        if config.metrics:
            await nursery.start(serve_metrics, metric_listeners, registry)
            log.info("metrics on %s", ", ".join(endpoint_of(l) for l in metric_listeners))
        server = PolicyServer(listeners, responder, max_connections=config.max_connections)
        await nursery.start(server.serve)
        how = " (socket activation)" if inherited else ""
        log.info("listening on %s%s", ", ".join(endpoint_of(l) for l in listeners), how)
        systemd.notify("READY=1")
        await _serve_signals(responder, server, signals, args, files)
        nursery.cancel_scope.cancel()


async def _serve_signals(
    responder: Responder, server: PolicyServer, signals: AsyncIterator[int], args: argparse.Namespace, files: SystemFiles
) -> None:
    """SIGHUP reloads; SIGTERM and SIGINT drain and return (those held during start-up first)."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            await _reload(responder, args, files)
            continue
        log.info("stopping on %s", signal.Signals(signum).name)
        systemd.notify("STOPPING=1")
        await server.shutdown(SHUTDOWN_GRACE_S)
        # A probe cut off in the middle of a greeting is what postscreen
        # logs as a HANGUP: those that have their verdict end their session.
        ending = responder.core.prober.flights.lingering
        if ending:
            log.info("stopping: %d probe(s) ending their SMTP session with QUIT", ending)
            await responder.core.let_probes_finish()
        return


def _check_exposed(endpoints: Sequence[str], config: cfg.Config) -> None:
    """Refuse to answer the network at large: an endpoint off loopback needs --allow-client."""
    exposed = None if config.allow_clients else exposed_endpoint(endpoints)
    if exposed is not None:
        raise ListenError(
            errno.EACCES,
            f"{exposed}: other hosts may reach this address; name the clients allowed to ask with "
            "--allow-client (allow_clients in the file)",
        )


async def run_stdio(config: cfg.Config, files: SystemFiles) -> int:
    """One connection on stdin/stdout, as Postfix's spawn(8) runs us."""
    stream = trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)), trio.lowlevel.FdStream(os.dup(0)))
    try:
        async with open_core(settings_of(config, files)) as core, trio.open_nursery() as nursery:
            responder = Responder(config, core, sink=current_sink())
            if responder.sink is not None:
                nursery.start_soon(responder.sink.run)
            watchdog = start_watchdog(nursery, responder)
            await handle_connection(stream, responder, watchdog, " on stdin")
            nursery.cancel_scope.cancel()
    except (StopHostError, DNSConfigError) as exc:
        log.critical("%s", exc)
        return 2
    return 0


async def run_check(config: cfg.Config, address: str, server_address: str, files: SystemFiles) -> int:
    """Explain one decision: the nameservers asked, the MX list, each probe, and the reply."""
    try:
        async with open_core(settings_of(config, files)) as core:
            resolver = core.resolver
            source = f"from {resolver.resolv_conf}" if resolver.resolv_conf else "from --nameserver"
            print(f"nameservers {', '.join(resolver.nameservers)} ({source})", flush=True)
            explanation = await Responder(config, core).explain(address, server_address)
            print(explanation.text, end="", flush=True)
            await core.let_probes_finish()
    except (StopHostError, DNSConfigError) as exc:
        print(f"smtpdcheck-policyd: {exc}", file=sys.stderr)
        return 2
    if explanation.failure is not None:
        print(f"smtpdcheck-policyd: --check {address}: {explanation.failure}", file=sys.stderr)
        return 2
    return 1 if explanation.defers else 0


async def _reload(responder: Responder, args: argparse.Namespace, files: SystemFiles) -> None:
    try:
        new, waiting = responder.config.reloaded(load(args, files))
        stop = await _resolve_stop(new, responder)
    except (cfg.ConfigError, StopHostError) as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return
    if waiting:
        log.warning("reload: %s changed; takes effect after a restart", ", ".join(waiting))
    setup_logging(new.log_level, new.log_target)
    responder.reconfigure(new, stop)
    log.info("configuration reloaded")


def main(argv: Sequence[str] | None = None, files: SystemFiles = SystemFiles()) -> int:
    try:
        return _main(argv, files)
    finally:
        close_logging()  # buffered lines out, on every way out (signals end the loop first)


def _main(argv: Sequence[str] | None, files: SystemFiles) -> int:
    parser = build_parser(files)
    args = parse_args(parser, argv)
    try:
        config = load(args, files)
    except cfg.ConfigError as exc:
        print(f"smtpdcheck-policyd: {exc}", file=sys.stderr)
        return 2
    if args.stdio:
        # spawn(8) wires stderr to the Postfix socket: a log line there
        # would be read as a reply.  Syslog if possible, else nothing.
        target = "syslog" if config.log_target == "syslog" or os.path.exists("/dev/log") else "none"
        setup_logging(config.log_level, target)
        try:
            return trio.run(run_stdio, config, files, strict_exception_groups=STRICT_EXCEPTION_GROUPS)
        except Exception:  # a traceback on stderr would land in Postfix's socket
            log.critical("stdio mode failed", exc_info=True)
            return 2
    if args.check is not None:
        setup_logging("warning" if config.log_level == "info" else config.log_level, "stderr")
        return trio.run(run_check, config, args.check, args.server_address or "", files, strict_exception_groups=STRICT_EXCEPTION_GROUPS)
    setup_logging(config.log_level, config.log_target)
    try:
        return trio.run(run_daemon, config, args, files, strict_exception_groups=STRICT_EXCEPTION_GROUPS)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
