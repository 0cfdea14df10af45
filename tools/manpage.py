"""The manual pages smtpdcheck(1) and smtpdcheck-policyd(8), generated (a development tool).

The options are read from the same places ``--help`` reads them: the
daemon's table (:data:`policyd.config.OPTIONS`, which also drives the TOML
file and the README's reference) and the argparse parsers of both commands
for the flags outside that table.  Usage text, the stop rule, exit status
and examples of ``smtpdcheck`` come from its ``--help`` description and
epilog.  What only a manual page says (decision rules, files, signals) is
written here, in the layout of Postfix's own pages.

The generated pages are committed under ``man/`` so a build needs no
Python; ``tests/test_manpages.py`` fails when they are stale.  Regenerate
with ``python -m tools.manpage man``.
"""


from __future__ import annotations

import email.utils
import errno
import io
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from policyd import cli as daemon_cli
from policyd.config import DEFAULT_LISTEN, DEFAULT_PORT, OPTIONS, Config, default_text
from policyd.decisionlog import BUFFER_LIMIT, decision_line, decision_middle
from policyd.listeners import unix_listen_error
from policyd.protocol import MAX_ATTRIBUTES, MAX_LINE_BYTES, MAX_REQUEST_BYTES
from smtpdcheck import cli as check_cli
from smtpdcheck import defaults, release
from smtpdcheck.check import CheckResult, ServerReport
from smtpdcheck.belief import CONFIRM_MARGIN_S, GREETING_FACTOR
from smtpdcheck.policy import Action, Cache
from smtpdcheck.probe import PROBE_REFRESH_FLOOR_S, QUIT_GRACE_S, Outcome, ProbeResult
from smtpdcheck.resolver import DNS_FETCHES_PER_USE, MAX_ADDRESSES_PER_HOST, MAX_MX_HOSTS, MIN_DNS_REFRESH_FLOOR_S
from smtpdcheck.servers import parse_address, parse_servers

from .roff import (
    bold, display, epilog_sections, examples, exit_status, italic, item, lit, name_section, paragraph,
    paragraphs, parser_options, section, sentence, text, usage_line,
)

#: Where this release's date is kept; the pages are generated in the source tree.
CHANGELOG: Final = Path(__file__).resolve().parent.parent / "debian" / "changelog"
#: The service unit whose sandbox SECURITY lists (read when generating, like the changelog).
SERVICE_UNIT: Final = Path(__file__).resolve().parent.parent / "etc" / "systemd" / "smtpdcheck-policyd.service"
CONFIG_PATH: Final = str(daemon_cli.SystemFiles().config)


# -- the page header: name, section, this release and its date ----------------


def release_date(changelog: Path = CHANGELOG, version: str | None = None) -> str:
    """The date of this release (pyproject's version): its entry in debian/changelog.

    A page carries the date of the release it describes, not the day it was
    generated, so regenerating gives the same bytes on any day.  The date is
    not written a second time here: Debian keeps each release's date in its
    changelog entry already, and dpkg-buildpackage dates the package's files
    from the same line (SOURCE_DATE_EPOCH).  An entry must exist for the
    version being released; its Debian revision, if any, is ignored.
    """
    version = version or release.version()
    text = changelog.read_text()
    head = re.match(r"\S+ \(([^)]+)\)", text)
    trailer = re.search(r"^ -- .*?>  (.+)$", text, re.MULTILINE)
    if head is None or trailer is None:
        raise ValueError(f"{changelog}: no entry to take the release date from")
    if re.split(r"[-~+]", head[1])[0] != version:
        raise ValueError(f"{changelog}: the latest entry is {head[1]}, the version is {version}: add an entry for it")
    return email.utils.parsedate_to_datetime(trailer[1]).date().isoformat()


def header(name: str, number: int, volume: str) -> list[str]:
    title = lit(name.upper())
    return [
        f'.TH {title} {number} "{release_date()}" "smtpdcheck {release.version()}" "{volume}"',
        ".ad",
        ".fi",
    ]



def smtpdcheck_page() -> str:
    parser = check_cli.build_parser()
    epilog = epilog_sections(check_cli.EPILOG)
    description = check_cli.DESCRIPTION
    summary, _, rest = description.partition(".")
    out = header("smtpdcheck", 1, "User Commands")
    out += name_section("smtpdcheck", "check SMTP servers")
    out += section("SYNOPSIS", filled=False)
    out += [usage_line(parser)]
    out += section("DESCRIPTION")
    out += paragraphs(description)
    out += [
        ".PP",
        *paragraph(
            "If a server is available, smtpdcheck prints its name on standard output and exits with "
            "status 1; if none is, it prints nothing and exits with status 0.  This is the interface "
            "of Mail Avenger's smtpdcheck, on which scripts rely."
        ),
    ]
    out += section("STOP RULE")
    out += paragraphs("\n".join(l.strip() for l in epilog["stop rule"]))
    out += section("OPTIONS")
    out += parser_options(parser)
    out += section("EXIT STATUS")
    out += exit_status(epilog["exit status"])
    out += section("DIAGNOSTICS")
    out += paragraph(
        "Standard output carries only the name of the available server (with --mx: the explanation).  "
        "Everything else goes to standard error, each line starting with \"smtpdcheck: \".  With -v, one "
        "line per server "
        "as written (with its prio), its addresses, what became of it (available, each probe's "
        "address, outcome and detail, lookup failed, this host, not checked) and the time its "
        "check took:"
    )
    out += display([verbose_example()])
    out += [".PP"]
    out += paragraph(
        "On bad usage or a system error exactly one line says what is wrong, and the exit status is 2; "
        "with --mx, a DNS failure is reported the same way."
    )
    out += section("EXAMPLES")
    out += paragraph("The examples of Mail Avenger's page; in the first two, this host is s2.domain.com:")
    out += examples(epilog["examples"])
    out += [".PP"]
    out += paragraph("To see why the policy server would defer mail for a domain:")
    out += display(["smtpdcheck --mx example.com --stop 192.0.2.25 -v"])
    out += section("HISTORY")
    out += paragraphs(
        "smtpdcheck first appeared in Mail Avenger (David Mazieres).  This implementation keeps its "
        "arguments, output and exit status, and does what that page listed under BUGS: all servers "
        "and all addresses of each are probed at once, results are cached within a run, and hosts "
        "with several addresses are handled cleanly."
    )
    out += section("SEE ALSO", filled=False)
    out += [
        "smtpdcheck-policyd(8), the same check as a Postfix policy server",
        "postconf(5), check_policy_service, to make Postfix ask that server",
        "avenger(1), Mail Avenger's SMTP server",
    ]
    return "\n".join(out) + "\n"


def verbose_example() -> str:
    """A ``-v`` line, written by the command's own formatter."""
    [server] = parse_servers(["10:mx1.example.com"])
    address = parse_address("192.0.2.1")
    assert address is not None
    probe = ProbeResult(Outcome.DECLINED, "192.0.2.1", defaults.SMTP_PORT, "421 4.3.2 Service shutting down", elapsed=0.0123)
    report = ServerReport(server, (address,), eligible=True, probes=[probe], cached=False)
    out = io.StringIO()
    check_cli.format_report(CheckResult(None, [report], 0.0123), out)
    return out.getvalue().rstrip("\n")


# -- smtpdcheck-policyd(8) ----------------------------------------------------

#: A decision line, written by the daemon's own formatter.
DECISION_EXAMPLE: Final = decision_line(
    "", "user@example.com", decision_middle(
        "example.com", Action.DEFER_IF_PERMIT.value, "primary mx1.example.com live", Cache.HIT.value,
        mx="10:mx1.example.com,20:backup.example.net", up="192.0.2.1",
    ), 0.0004, 3.2,
)
#: A state-change line, as the prober logs it (tests/test_manpages.py checks it against the prober).
STATE_CHANGE_EXAMPLE: Final = "mx1.example.com [192.0.2.1] up -> down (timeout)"
#: The warning after lines were dropped (tests/test_manpages.py checks it against the log sink).
DROPPED_EXAMPLE: Final = "warning: 1234 log lines dropped: the log target did not keep up"
#: Probe outcomes that change an address's state; "not probed" and "error" say nothing about the server.
STATE_OUTCOMES: Final = tuple(o.value for o in Outcome if o not in (Outcome.OVERLOADED, Outcome.ERROR))


def _diagnostics() -> list[str]:
    out = section("DIAGNOSTICS")
    out += paragraph(
        "Logs go to standard error (journald, with the unit) or with --log-target syslog to syslog, "
        "facility mail.  Lines about trouble start with warning:, error: or fatal: (fatal: the daemon "
        "stops), so a grep for those words finds them.  Every value that comes from a request or from "
        "DNS is escaped (\\xNN), so no recipient can forge a log line."
    )
    out += item("Decision lines", paragraph(
        "One line per RCPT decided, at level info (--log-level warning drops them and keeps every "
        "state change below):"
    ))
    out += display([DECISION_EXAMPLE])
    out += [".sp"]
    out += paragraph(
        "The fields: Postfix's queue id (NOQUEUE before the first accepted recipient); rcpt=<recipient> as "
        "Postfix sent it; domain= the recipient domain looked up (- when there is none); action= the "
        f"answer ({', '.join(a.value for a in Action)}); reason= why, quoted (primary ... live, all N "
        "more-preferred MXes down, no more-preferred MX, domain does not exist, null MX, dns failure: "
        f"SERVFAIL, deadline of Ns exceeded, ...); cache= where its inputs came from ({', '.join(c.value for c in Cache)}; "
        "stale: from caches, one of them past its expiry and being refreshed); ms= the time it took to answer, "
        "in milliseconds.  What Postfix's own log line for the 450 does not say is here too: mx= the MX "
        "list considered, preference:host, most preferred first (absent when DNS gave none); up= the address of "
        "the live MX whose greeting a DEFER or WARN rests on; and, after ms=, age= how old that greeting "
        "was when the answer was given."
    )
    out += item("State changes", paragraph(
        "When a probe finds an MX address in another state than its cached result said, one warning line "
        f"names the MX host, the address (with :port when --smtp-port is not {defaults.SMTP_PORT}), the old and the new "
        f"state, and the probe's outcome ({', '.join(STATE_OUTCOMES)}); it may say more after that:"
    ))
    out += display([STATE_CHANGE_EXAMPLE])
    out += item("Limits and refusals", paragraph(
        "Also at warning, each at most once a minute with how many were not logged: a probe not made "
        "because --max-probes were all busy (probe limit reached (--max-probes N): ... not probed, counted "
        "as down), a connection left waiting because --max-connections were open (connection limit "
        "reached ...), and a connection closed unanswered because its client is not in --allow-client "
        "(refused a connection from ADDRESS to ENDPOINT ...).  A DNS refresh that fails and leaves the "
        "last good answer being served is a warning too, once per name (the line saying it answers "
        "again is at info)."
    ))
    out += item("Dropped lines", paragraph(
        "When the log target does not take lines (a stalled journald, a full pipe), lines wait in a "
        f"{BUFFER_LIMIT >> 20} MiB buffer, beyond it they are dropped and counted (smtpdcheck_log_lines_dropped_total), "
        "and once writing resumes one warning says how many:"
    ))
    out += display([DROPPED_EXAMPLE])
    out += item("Start-up errors", paragraph(
        "A configuration, --stop name, nameserver or listening socket that cannot be used is one line "
        "on standard error and exit status 2, for example:"
    ))
    missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    out += display([f"fatal: {unix_listen_error('/var/spool/postfix/smtpdcheck/policy', missing)}"])
    out += item("Exit status", paragraph(
        "0 after SIGTERM or SIGINT, 2 after a fatal: line (see EXIT STATUS; --check also exits 1 when "
        "it would defer, and 2 when it could not decide)."
    ))
    return out


def _sandbox() -> list[str]:
    """The hardening settings of the service unit, as written there."""
    settings: list[str] = []
    in_service = False
    for line in SERVICE_UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            in_service = line == "[Service]"
        elif in_service and "=" in line and not line.startswith("#"):
            key = line.partition("=")[0]
            if key not in ("Type", "ExecStart", "ExecReload", "Restart", "RestartSec"):
                settings.append(line)
    return settings


def _primaries() -> list[str]:
    """What a primary's administrator sees of this host's probes, and how to keep it out of their defences."""
    config = Config()
    out = section("WHAT A PRIMARY SEES")
    out += paragraph(
        f"Each address of each more-preferred MX of a domain is probed once per --cache-up-ttl "
        f"({config.cache_up_ttl:g} s) while it is up, and once per --cache-down-ttl while it is down, "
        f"for as long as the domain gets mail through this host and --refresh-window "
        f"({config.refresh_window:g} s) after.  A probe is a complete SMTP session: it connects, waits "
        f"for the whole greeting (up to --greeting-timeout, {config.greeting_timeout:g} s, for the first "
        f"line, and {QUIT_GRACE_S:g} s more for the last), says QUIT, reads the reply and closes.  "
        "Nothing is sent before the greeting's last line.  One probe leaves these lines in the "
        "primary's log:"
    )
    for server, lines in (
        ("Postfix smtpd", "connect from and disconnect from ... quit=1 commands=1."),
        ("Postfix postscreen", "CONNECT from and DISCONNECT; the first probe waits out the greet wait and passes "
         "the greeting test, which postscreen remembers.  With the deep protocol tests off, later probes "
         "pass to smtpd: CONNECT, PASS OLD and smtpd's two lines."),
        ("exim", "nothing with Debian's log selector; with +smtp_connection, SMTP connection from and "
         "... closed by QUIT; +smtp_no_mail adds no MAIL in SMTP connection from ... C=QUIT."),
        ("OpenSMTPD", "smtp connected and smtp disconnected reason=quit."),
    ):
        out += item(server, paragraph(lines))
    out += paragraph(
        "No mode of fail2ban's stock postfix filter matches these lines.  A backup MX delivers its queue "
        "to the primary, so its address is still worth exempting there: postscreen_access_list with a "
        "cidr table line such as 192.0.2.25/32 permit (postscreen's tests are then skipped), and the "
        "fail2ban jail's ignoreip.  exim's +smtp_no_mail logs every session without a message, and "
        "fail2ban's exim filter matches that line: leave it off, or exempt the backup with ignoreip."
    )
    return out


def _security() -> list[str]:
    out = section("SECURITY")
    out += item("Who can query it", paragraph(
        f"Anyone who can connect to its endpoints; the protocol has no authentication, and a query makes "
        "the daemon look a domain up and connect to port 25 of the addresses its MX hosts name.  The "
        f"default, {DEFAULT_LISTEN}, is reachable by every user and process on this host.  An inet "
        "endpoint on any other address (0.0.0.0 and :: included) is refused at start-up unless "
        "--allow-client names the clients that may ask; with --allow-client given, every inet endpoint "
        "closes a connection from any other address as soon as it is accepted, before reading a byte, "
        f"counts it (smtpdcheck_clients_refused_total) and logs at most one warning a minute about such "
        "connections, with how many it did not log.  "
        "To let only Postfix ask, use a unix socket whose group is postfix and mode 0660: the socket unit "
        "smtpdcheck-policyd-unix.socket makes one, and --socket-group postfix gives one the daemon makes "
        "to that group.  --metrics serves its counters to anyone who can connect, without "
        "authentication; it is off by default."
    ))
    out += item("Socket modes", paragraph(
        f"A unix socket the daemon makes is bound under umask 0177, then given to --socket-group if set, "
        f"then given --socket-mode (default {Config().socket_mode:04o}), so it is never reachable more "
        "widely than configured, even for a moment.  Giving it to a group needs a daemon running as root "
        "or as a member of that group; a group that does not exist stops start-up.  An existing path that "
        "is not a socket, or a socket another server answers on, is never replaced.  Sockets handed over "
        "by systemd keep the owner and mode their unit gives them."
    ))
    out += item("What it connects to", paragraph(
        "The nameservers of --nameserver or /etc/resolv.conf, for MX and address lookups; and the "
        "addresses of the MX hosts of recipient domains on --smtp-port, where it reads the greeting and "
        "says QUIT: it never sends mail.  Recipient domains choose their MX hosts, so a sender can make "
        "the daemon connect to any address on that port, internal ones included; --max-probes, "
        "--max-dns-queries and the caches bound how often.  It connects nowhere else."
    ))
    out += item("systemd sandbox", [
        *paragraph(
            "The service unit runs the daemon as a dynamic user, without privileges or capabilities, on a "
            "read-only file system, with these settings (see systemd.exec(5)):"
        ),
        *display(_sandbox()),
    ])
    out += item("Requests", paragraph(
        f"A request is bounded ({MAX_LINE_BYTES >> 10} KiB per line, {MAX_REQUEST_BYTES >> 10} KiB and "
        f"{MAX_ATTRIBUTES} attributes in all); a malformed one closes "
        "its connection.  With --stdio, spawn(8) runs one process per connection as the user= of "
        "master.cf (not root, not the mail owner), which then needs no socket at all."
    ))
    return out



DECISION_RULES: Final = (
    (
        "Requests",
        "Only request=smtpd_access_policy with protocol_state=RCPT is decided; anything else, "
        "including VRFY, is answered DUNNO.",
    ),
    (
        "Recipient domain",
        "The part after the last '@', lower-cased, without a trailing dot, IDNA-encoded for SMTPUTF8 "
        "recipients.  No domain, an address literal or a domain that is not a valid host name: DUNNO.",
    ),
    (
        "MX lookup",
        "NXDOMAIN and a null MX (RFC 7505) answer DUNNO.  SERVFAIL, a timeout or a garbled answer "
        "answer the failure action.  MX records are sorted by preference; without MX records the "
        f"domain itself is the implicit MX at preference 0 (RFC 5321 section 5.1).  At most {MAX_MX_HOSTS} MX "
        f"hosts and {MAX_ADDRESSES_PER_HOST} addresses per host are considered.",
    ),
    (
        "This host",
        "The request's server_address plus every --stop name and address (names are resolved at "
        "start-up and on every reload).  An MX host is this host when its name is a --stop name or one of its addresses "
        "is a stop address.",
    ),
    (
        "Stop rule",
        "As in smtpdcheck(1) and in Postfix's own SMTP client: the first MX that is this host, "
        "every MX after it and every MX with the same preference are not probed; what remains are "
        "the strictly more-preferred ones.  If this host is not in the list, every MX is probed.",
    ),
    (
        "Probes",
        "Every remaining MX and each of its addresses at once.  An address is up when it accepts a "
        "TCP connection on --smtp-port and the first line of its greeting has code 220.  Results "
        "are cached per address (--cache-up-ttl, --cache-down-ttl) and shared by concurrent "
        "requests.  A more-preferred MX up: DEFER_IF_PERMIT with --defer-text (WARN in warn mode), "
        "so Postfix answers 450 4.7.1.  All of them down, or none more preferred: DUNNO.  An "
        f"\"up\" past its --cache-up-ttl whose confirming probe has not answered within {defaults.times(GREETING_FACTOR)} the "
        f"address's last greeting time plus {CONFIRM_MARGIN_S:g} s (at most --timeout) is unconfirmed: the address "
        "counts as not up and the answer is DUNNO at once (reason \"primary ... unconfirmed\"), "
        "never cached; the probe's result is cached when it ends.",
    ),
    (
        "Deadline",
        "Whatever is still running after --deadline is abandoned and the failure action (DUNNO "
        "unless configured otherwise) is answered; so is any internal error.  A malformed request "
        "closes its connection, and Postfix applies its default_action.",
    ),
    (
        "Keeping answers fresh",
        "MX lists, addresses and probe results used within --refresh-window are refreshed in the "
        "background as long before they expire as their last answer took, so an RCPT for a domain "
        "seen within the window does not wait on the network, as long as its entries stay in the "
        "caches (--cache-size) and every refresh answers in time.  While a refresh runs past expiry "
        "the old value is served, "
        "at most --timeout (probes) or --dns-timeout (DNS) past its TTL, an \"up\" only while it "
        "is not unconfirmed (see Probes); the decision line then "
        "says cache=stale.  A DNS refresh that fails keeps the last good answer up to "
        "--dns-stale-max past its expiry.  Background work is paid for by traffic: each use of a "
        f"DNS answer pays for at most {DNS_FETCHES_PER_USE} background fetches of it (refreshes or retries), whatever "
        f"its TTL, and none comes within --dns-timeout ({MIN_DNS_REFRESH_FLOOR_S:g} s at the least) of the one before; a "
        "lookup that failed is asked again only when a request needs it.  Probe results are "
        f"refreshed once per TTL (no two within {PROBE_REFRESH_FLOOR_S:g} s) until the window ends.  Background work "
        "holds at most half of --max-dns-queries and --max-probes; the rest is kept for requests.  "
        "--refresh-window 0 turns this off.  A primary that "
        "stops greeting is answered DUNNO at most --cache-up-ttl plus that grace after its last "
        f"greeting ({defaults.UP_TTL_S + CONFIRM_MARGIN_S:g} s with the defaults for a primary that greets at once); one that greets "
        "again is seen within about --cache-down-ttl.",
    ),
)


def _table_options() -> list[str]:
    out: list[str] = []
    for option in OPTIONS:
        label = f"{bold(option.flag)} {italic(option.metavar)}"
        default = f"{bold(default_text(option))}" if option.name != "defer_text" else f'"{text(default_text(option))}"'
        allowed = f"allowed: {text(option.allowed)}; " if option.allowed else ""
        out.extend(item(label, [*paragraph(sentence(option.help)), ".br", f"File key {bold(option.name)}, {allowed}default {default}."]))
    return out


def policyd_page() -> str:
    parser = daemon_cli.build_parser()
    epilog = epilog_sections(daemon_cli.EPILOG)
    table_names = {option.name for option in OPTIONS}
    prog = bold("smtpdcheck-policyd")
    config = f"[{bold('--config')} {italic('PATH')}]"
    options = f"[{italic('options')}]"
    out = header("smtpdcheck-policyd", 8, "System Manager's Manual")
    out += name_section("smtpdcheck-policyd", "Postfix policy server for backup MX hosts")
    out += section("SYNOPSIS", filled=False)
    out += [
        f"{prog} {config} {options}",
        f"{prog} {bold('--stdio')} {config} {options}",
        f"{prog} {bold('--check')} {italic('ADDRESS')} [{bold('--server-address')} {italic('IP')}] {config} {options}",
    ]
    out += section("DESCRIPTION")
    out += paragraphs(daemon_cli.DESCRIPTION)
    out += [".PP"]
    out += paragraph(
        f"It runs as a standalone daemon (by default on {DEFAULT_LISTEN}, or on sockets handed over by "
        "systemd socket activation) that all smtpd processes share, so probe results and DNS answers "
        "are cached for all of them; or, with --stdio, as one process per smtpd connection run by "
        "Postfix's spawn(8).  Postfix is told to ask it in main.cf:"
    )
    out += display(daemon_cli.MAIN_CF_EXAMPLE.splitlines())
    out += [".PP"]
    out += paragraph(
        "The policy check must come after the relay check, and permit_* exemptions before it: a "
        "later permit cannot undo DEFER_IF_PERMIT.  try_limit=1 and default_action=DUNNO keep mail "
        "flowing if the daemon is down; timeout must exceed --deadline."
    )
    out += [".PP"]
    out += paragraph(
        "The check is the restriction class smtpdcheck_backup, and only recipients of relay domains reach "
        "it: the relay domains are a table, /etc/postfix/relay_domains (postmap it after each change), "
        f"whose value for each domain is the class ({daemon_cli.RELAY_DOMAINS_EXAMPLE}).  relay_domains "
        "only asks whether a domain is in the table; check_recipient_access on the same table applies "
        "the value.  One table cannot drift apart as a list and a second table would, and a list cannot "
        "be looked up by check_recipient_access.  Recipients of local (mydestination) and virtual domains "
        "never reach the daemon: a more-preferred MX of such a domain that is this site's own filtering "
        "front end, delivering here, would be found up and its deliveries deferred.  A relay domain with "
        "such a front end gets DUNNO in the table instead of smtpdcheck_backup, or the front end's "
        "addresses go into mynetworks, permitted before the check.  Subdomains match both lookups alike "
        "while parent_domain_matches_subdomains lists relay_domains and smtpd_access_maps (the default); "
        "change both or neither."
    )
    out += section("DECISION RULES")
    for title, body in DECISION_RULES:
        out += item(text(title), paragraph(body))
    out += section("OPTIONS")
    out += parser_options(parser, skip=table_names)
    out += _table_options()
    out += section("CONFIGURATION FILE")
    out += paragraphs(
        f"The daemon and --check read {CONFIG_PATH} when it exists and no --config is given, as "
        "Postfix's commands read main.cf; --config PATH reads another file instead, and --config '' "
        "none.  The file is TOML.  Every key is a long option with '_' for '-', "
        "repeatable options take a list, and options on the command line override the file.  "
        "Unknown keys, wrong types and impossible values stop start-up (a reload keeps the running "
        "configuration) with a message naming the key and file.  A file mode (socket_mode) is written "
        "0o660 or \"0660\": a bare TOML integer such as 660 is decimal, and refused.  The package "
        f"installs {CONFIG_PATH} with every key commented out at its default."
    )
    out += section("SIGNALS")
    out += paragraphs("\n".join(l.strip() for l in epilog["signals"]))
    out += section("EXIT STATUS")
    out += [
        ".IP 0",
        *paragraph("The daemon stopped on SIGTERM or SIGINT; with --check, the mail would not be deferred."),
        ".IP 1",
        *paragraph("With --check: the mail would be deferred (a more-preferred MX is up)."),
        ".IP 2",
        *paragraph(
            "Bad usage or configuration, a --stop name that does not resolve, a listening socket "
            "that cannot be opened or given to --socket-group, or an inet endpoint off loopback without "
            "--allow-client; with --check, the decision could not be made (DNS failure, "
            "deadline, error)."
        ),
    ]
    out += _diagnostics()
    out += _primaries()
    out += _security()
    out += section("FILES", filled=False)
    out += [
        f"{CONFIG_PATH}, the configuration, read when it exists and no --config is given",
        "/etc/resolv.conf, the nameservers asked when no --nameserver is given",
        "/usr/lib/systemd/system/smtpdcheck-policyd.service, the service",
        f"/usr/lib/systemd/system/smtpdcheck-policyd.socket, socket activation on 127.0.0.1:{DEFAULT_PORT}",
        "/usr/share/doc/smtpdcheck/examples/, Postfix main.cf and master.cf snippets, and",
        "    smtpdcheck-policyd-unix.socket, socket activation in the queue directory",
    ]
    out += section("EXAMPLES")
    out += paragraph("Explain the decision for one recipient, as if Postfix had been reached on 192.0.2.25:")
    out += display([f"smtpdcheck-policyd --config {CONFIG_PATH} --check user@example.com --server-address 192.0.2.25"])
    out += [".PP"]
    out += paragraph("Run by Postfix's spawn(8), in master.cf:")
    out += display([
        "smtpdcheck  unix  -       n       n       -       0       spawn",
        f"  user=nobody argv=/usr/bin/smtpdcheck-policyd --stdio --config {CONFIG_PATH}",
    ])
    out += [".PP"]
    out += paragraph("Roll out in shadow mode first (Postfix logs what would have been deferred and accepts):")
    out += display(["smtpdcheck-policyd --config /etc/smtpdcheck/policyd.toml --mode warn"])
    out += section("SEE ALSO", filled=False)
    out += [
        "smtpdcheck(1), the same check as a command",
        "postconf(5), check_policy_service, smtpd_recipient_restrictions",
        "spawn(8), Postfix external command spawner",
        "systemd.socket(5), socket activation",
        "systemd.exec(5), the sandbox settings",
        "SMTPD_POLICY_README, Postfix policy delegation",
    ]
    return "\n".join(out) + "\n"


PAGES: Final = {"smtpdcheck.1": smtpdcheck_page, "smtpdcheck-policyd.8": policyd_page}


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m tools.manpage DIRECTORY", file=sys.stderr)
        return 2
    directory = Path(args[0])
    directory.mkdir(parents=True, exist_ok=True)
    for name, render in PAGES.items():
        (directory / name).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
