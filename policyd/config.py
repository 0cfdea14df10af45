"""Configuration of smtpdcheck-policyd: one table drives flags, file and docs.

Every option is declared once in :data:`OPTIONS`.  The command line, the
TOML configuration file (keys are the long flags with ``_`` for ``-``), the
commented example file, the README's configuration reference and what a
reload may change are all derived from it, so they cannot drift apart.  Validation happens here, at start-up or reload, with
messages that name the offending key and file: a typo must never reach
the request path.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Final, Literal, get_type_hints

from smtpdcheck import belief, defaults, refresh, values
from smtpdcheck.probe import GREETING_TIMEOUT_S, PROBE_REFRESH_FLOOR_S, QUIT_GRACE_S
from smtpdcheck.resolver import DNS_FETCHES_PER_USE, MIN_DNS_REFRESH_FLOOR_S, parse_nameserver

from . import validators as v
from .clients import check_group, check_network
from .validators import ConfigError as ConfigError, ConflictingOptions as ConflictingOptions, Number as Number
from .watchdog import MAX_TICK_S

DEFAULT_PORT: Final = 10036  # written once: the units, snippets and documents say it too (tests check)
DEFAULT_LISTEN: Final = f"inet:127.0.0.1:{DEFAULT_PORT}"
DEFAULT_DEFER_TEXT: Final = "this is a backup MX and primary MX {mx} is up; please deliver there"


# The choices of the options that take one of a few words; the validators
# and the documentation read them from here (typing.get_args).
Mode = Literal["enforce", "warn"]
FailureAction = Literal["DUNNO", "DEFER_IF_PERMIT"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogTarget = Literal["stderr", "syslog"]


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    socket_mode: int = 0o660
    socket_group: str = ""
    allow_clients: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    timeout: float = defaults.PROBE_TIMEOUT_S
    greeting_timeout: float = GREETING_TIMEOUT_S
    dns_timeout: float = defaults.DNS_TIMEOUT_S
    deadline: float = defaults.DEADLINE_S
    smtp_port: int = defaults.SMTP_PORT
    nameserver: tuple[str, ...] = ()
    mode: Mode = "enforce"
    defer_text: str = DEFAULT_DEFER_TEXT
    failure_action: FailureAction = "DUNNO"
    cache_up_ttl: float = defaults.UP_TTL_S
    cache_down_ttl: float = defaults.DOWN_TTL_S
    dns_max_ttl: float = defaults.DNS_MAX_TTL_S
    dns_negative_ttl: float = defaults.DNS_NEGATIVE_TTL_S
    dns_failure_ttl: float = defaults.DNS_FAILURE_TTL_S
    refresh_window: float = defaults.REFRESH_WINDOW_S
    dns_stale_max: float = defaults.DNS_STALE_MAX_S
    cache_size: int = defaults.CACHE_SIZE
    max_probes: int = defaults.MAX_PROBES
    max_dns_queries: int = defaults.MAX_DNS_QUERIES
    max_connections: int = defaults.MAX_CONNECTIONS
    request_timeout: float = defaults.REQUEST_TIMEOUT_S
    idle_timeout: float = defaults.IDLE_TIMEOUT_S
    log_level: LogLevel = "info"
    log_target: LogTarget = "stderr"
    metrics: str = ""

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        return [parse_nameserver(n) for n in self.nameserver]

    def defer_message(self, mx: str, domain: str) -> str:
        return self.defer_text.format(mx=mx, domain=domain)

    def reloaded(self, new: Config) -> tuple[Config, tuple[str, ...]]:
        """What a reload to ``new`` runs with, and the changes that must wait.

        Options that need a restart keep their running values: the parts
        built from them (sockets, resolver, caches, limits) cannot change
        under a running process, and a configuration that took such an
        option only halfway (say the checker's budget, not the resolver's)
        would be one nobody wrote.  The names returned are the restart-only
        options whose new value is being held back.
        """
        waiting = tuple(name for name in RESTART_ONLY if getattr(new, name) != getattr(self, name))
        return replace(new, **{name: getattr(self, name) for name in RESTART_ONLY}), waiting


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # the Config field; the flag is --name-with-dashes
    convert: Callable[[object], object]
    help: str
    metavar: str = "VALUE"
    repeatable: bool = False
    # A SIGHUP reload keeps the running value: what is built from it
    # (sockets, the resolver, cache sizes, limits) lives as long as the process.
    restart: bool = field(default=False, kw_only=True)
    # The default as the documents say it, when the value alone would
    # mislead ("(none)" for nameserver, which means /etc/resolv.conf).
    default_doc: str | None = field(default=None, kw_only=True)
    # The TOML types a file may give; None: the type of the Config field.
    file_types: tuple[type, ...] | None = field(default=None, kw_only=True)
    # The flag when the file key's plural reads wrong on a command line (--allow-client).
    cli: str = field(default="", kw_only=True)
    # Another default under --stdio (spawn(8)), where each smtpd has a process of its own.
    stdio_default: object = field(default=None, kw_only=True)

    @property
    def flag(self) -> str:
        return self.cli or "--" + self.name.replace("_", "-")

    @property
    def allowed(self) -> str | None:
        """The allowed values in words (a range, the choices), from the validator itself."""
        allowed = getattr(self.convert, "allowed", None)
        return allowed if isinstance(allowed, str) else None


OPTIONS: Final[tuple[Option, ...]] = (
    Option("listen", v.check_listen, "where to accept Postfix's connections: inet:IP:PORT, inet:[IPv6]:PORT or unix:/path (repeatable)", "ENDPOINT", True, restart=True),
    Option("socket_mode", v.mode_bits, "file mode of unix sockets the daemon makes, in octal: 0660 on the command line; 0o660 or \"0660\" in the file (a bare TOML integer such as 660 is decimal, and refused)", "MODE", restart=True, file_types=(int, str)),
    Option("socket_group", check_group, "group of unix sockets the daemon makes (postfix: with mode 0660 only Postfix's smtpd, and root, may connect); the daemon must run as root or be a member of it; empty = the daemon's own", "GROUP", restart=True, default_doc="(the daemon's)"),
    Option("allow_clients", check_network, "client network (CIDR) or address allowed to connect to inet endpoints (repeatable); others are closed unanswered; needed to listen on an address other than loopback; empty = any client of loopback endpoints", "NETWORK", True, restart=True, cli="--allow-client"),
    Option("stop", v.stop_value, "this host's names and addresses besides the request's server_address (repeatable); names are resolved at start-up and on every reload", "NAME|IP", True),
    Option("timeout", v.positive_seconds, "how long a request waits for a probe: for a probe slot (--max-probes), the connect and the greeting's first line; a primary still silent then is reported down for now (later for one known to greet slower), and the probe goes on waiting up to --greeting-timeout", "SECONDS"),
    Option("greeting_timeout", v.positive_seconds, f"how long a probe waits for a primary's greeting at all (RFC 5321 asks for 5 minutes; primaries that delay it on purpose wait 5 to 30 s); a 220 after --timeout marks the primary up for the requests that follow; at least --timeout. After the first line the probe reads the rest of the greeting, says QUIT and reads the reply, for up to {QUIT_GRACE_S:g} s more, holding its --max-probes slot", "SECONDS"),
    Option("dns_timeout", v.positive_seconds, "budget for one DNS lookup", "SECONDS", restart=True),
    Option("deadline", v.positive_seconds, "every request is answered within this time; keep it below Postfix's policy timeout", "SECONDS"),
    Option("smtp_port", v.port, "port probed on the MX hosts", "PORT"),
    Option("nameserver", v.nameserver, "DNS server to ask, IP[:PORT] (repeatable)", "IP[:PORT]", True, restart=True, default_doc="the nameservers of /etc/resolv.conf"),
    Option("mode", v.choice(Mode), "enforce: answer DEFER_IF_PERMIT; warn: answer WARN with the same text wherever enforce would defer, a failure action of DEFER_IF_PERMIT included (Postfix logs and accepts: nothing is deferred)", "MODE"),
    Option("defer_text", v.defer_text, "reply text when deferring; {mx} is the live MX, {domain} the recipient domain", "TEMPLATE"),
    Option("failure_action", v.choice(FailureAction), "answer when DNS fails, the deadline passes or anything breaks (DUNNO: fail-open); in --mode warn, DEFER_IF_PERMIT is answered as WARN with the same text", "ACTION"),
    Option("cache_up_ttl", v.up_ttl, f"how long an MX address that greeted with 220 is believed up; one in use is probed again this often, and past expiry its 'up' is believed only while that probe is young ({defaults.times(belief.GREETING_FACTOR)} the last greeting time plus {belief.CONFIRM_MARGIN_S:g} s, at most --greeting-timeout), then the RCPT gets DUNNO (reason unconfirmed) until the probe ends; 0 = not cached: every RCPT waits for a probe", "SECONDS"),
    Option("cache_down_ttl", v.seconds, "how long an MX address that failed is believed down", "SECONDS"),
    Option("dns_max_ttl", v.seconds, "cap on how long a DNS answer is reused (its own TTL otherwise)", "SECONDS", restart=True),
    Option("dns_negative_ttl", v.seconds, "cap on how long NXDOMAIN / no-records answers are reused", "SECONDS", restart=True),
    Option("dns_failure_ttl", v.seconds, "how long a failed lookup (SERVFAIL, timeout) is reused before asking again", "SECONDS", restart=True),
    Option("refresh_window", v.seconds, f"cached MX lists, addresses and probe results used within this window are refreshed in the background before they expire, and served while a refresh runs (up to --greeting-timeout / --dns-timeout past expiry; an 'up' only as --cache-up-ttl says); each use of a DNS answer pays for at most {DNS_FETCHES_PER_USE} such fetches, no two within --dns-timeout ({MIN_DNS_REFRESH_FLOOR_S:g} s at the least), and failed lookups are not refreshed; probe results are refreshed once per TTL (no two within {PROBE_REFRESH_FLOOR_S:g} s) for the whole window; 0 = off: an expired entry makes the RCPT wait", "SECONDS", restart=True, stdio_default=defaults.SPAWN_REFRESH_WINDOW_S),
    Option("dns_stale_max", v.seconds, f"when a DNS refresh fails, keep answering with the last good answer for up to this long past its expiry, retrying every --dns-failure-ttl ({refresh.MIN_RETRY_AFTER_S:g} s at the least) while uses pay for retries; 0 = no longer than while a refresh runs (--dns-timeout past expiry)", "SECONDS", restart=True),
    Option("cache_size", v.count, "entries per cache (probe results, MX lists, host addresses)", "N", restart=True),
    Option("max_probes", v.count, "SMTP probes connecting at once, process-wide; background refreshes hold at most half of them (at least 1), the rest is kept for probes a request waits for", "N", restart=True),
    Option("max_dns_queries", v.count, "DNS queries in flight at once, process-wide; background refreshes hold at most half of them (at least 1), the rest is kept for lookups a request waits for", "N", restart=True),
    Option("max_connections", v.count, "Postfix connections served at once; more wait in the listen queue", "N", restart=True),
    Option("request_timeout", v.positive_seconds, "a request that has started must arrive completely, and each reply be taken by Postfix, within this time (checked like --idle-timeout, up to one watchdog tick late)", "SECONDS"),
    Option("idle_timeout", v.seconds, f"close a connection idle this long, or up to one watchdog tick later (a tenth of the shorter of this and --request-timeout, at most {MAX_TICK_S:g} s); 0 = never; Postfix closes idle ones itself", "SECONDS"),
    Option("log_level", v.choice(LogLevel), "log level; decisions are logged at info", "LEVEL"),
    Option("log_target", v.choice(LogTarget), "where logs go: stderr (journald-friendly) or syslog (facility mail)", "TARGET"),
    Option("metrics", v.metrics_endpoint, "serve Prometheus metrics at inet:IP:PORT (empty = off)", "ENDPOINT", restart=True),
)

_BY_NAME: Final = {o.name: o for o in OPTIONS}
RESTART_ONLY: Final[tuple[str, ...]] = tuple(o.name for o in OPTIONS if o.restart)
assert set(_BY_NAME) == {f.name for f in fields(Config)}


def default_text(option: Option) -> str:
    if option.default_doc is not None:
        return option.default_doc
    text = _value_text(option, getattr(Config(), option.name))
    if option.stdio_default is not None:
        text += f" ({_value_text(option, option.stdio_default)} with --stdio)"
    return text


def _value_text(option: Option, value: object) -> str:
    if option.name == "socket_mode":
        return f"{value:04o}"
    if isinstance(value, tuple):
        return ", ".join(value) if value else "(none)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if value != "" else "(off)"


def help_suffix(option: Option) -> str:
    """What ``--help`` adds to an option's help: what it allows, and its default, once each."""
    allowed = f"{option.allowed}; " if option.allowed else ""
    return f"{allowed}default: {default_text(option)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every option; defaults stay None so the file can fill in."""
    for option in OPTIONS:
        kwargs: dict[str, object] = {
            "dest": option.name,
            "metavar": option.metavar,
            "default": None,
            "help": f"{option.help} ({help_suffix(option)})",
        }
        if option.repeatable:
            kwargs["action"] = "append"
        parser.add_argument(option.flag, **kwargs)  # type: ignore[arg-type]


_TOML_TYPES: Final = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                      (list, "an array"), (dict, "a table"))


def _toml_type(value: object) -> str:
    return next((name for kind, name in _TOML_TYPES if isinstance(value, kind)), "a date or time")


def _file_types(option: Option) -> tuple[type, ...]:
    """The TOML types a file may give for ``option`` (for a list: for each item)."""
    if option.file_types is not None:
        return option.file_types
    hint = get_type_hints(Config)[option.name]
    if hint is float:
        return (int, float)
    if hint is int:
        return (int,)
    return (str,)  # str, a Literal of words, or a tuple of str


def _expected(types: tuple[type, ...]) -> str:
    if set(types) == {int, float}:
        return "a number"
    return " or ".join(name for kind, name in _TOML_TYPES if kind in types)


def _check_file_type(option: Option, value: object, *, item: bool = False) -> None:
    """Refuse a file value of the wrong TOML type before converting it.

    The converters also read flags, which are always text, so they accept
    ``"3"`` for a number and turn anything into a string; in a file that
    is a mistake to report, not to repair (``timeout = "3"``, ``stop = [1]``).
    """
    types = _file_types(option)
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return
    expected = _expected(types)
    if item:
        raise ConfigError(f"each item must be {expected}, not {_toml_type(value)}: {value!r}")
    raise ConfigError(f"must be {expected}, not {_toml_type(value)}: {value!r}")


def _convert(option: Option, raw: object, where: str, *, from_file: bool = False) -> object:
    try:
        if option.repeatable:
            items = raw if isinstance(raw, (list, tuple)) else None
            if items is None:
                raise ConfigError("must be a list")
            if from_file:
                for item in items:
                    _check_file_type(option, item, item=True)
            return tuple(option.convert(item) for item in items)
        if isinstance(raw, (list, dict)):
            raise ConfigError("must be a single value, not a list or table")
        if from_file:
            _check_file_type(option, raw)
        return option.convert(raw)
    except ValueError as exc:  # ConfigError, or the ValueError of a check from elsewhere
        raise ConfigError(f"{where}: {exc}") from None


def _check_whole(config: Config, where: str) -> Config:
    if not config.listen:
        raise ConfigError(f"{where}: listen: at least one endpoint is needed")
    if config.deadline <= 0:
        raise ConfigError(f"{where}: deadline must be more than 0")
    _check_waits(config, where)
    return config


def _check_waits(config: Config, where: str) -> None:
    """Refuse budgets that cannot work together.

    A request whose MX list is cached waits for one address lookup and one
    probe: if those cannot both end before the deadline, every such
    request would be cut short and answered with the failure action, so
    the probe budget would be a number nobody gets.  A probe that may wait
    for a greeting less long than a request waits for it is a typo.
    """
    waits = config.timeout + config.dns_timeout
    if waits >= config.deadline:
        raise ConflictingOptions(
            f"{where}: --timeout {config.timeout:g} plus --dns-timeout {config.dns_timeout:g} ({waits:g}s) "
            f"must be less than --deadline {config.deadline:g}: a lookup and a probe must fit in a request's deadline"
        )
    if config.greeting_timeout < config.timeout:
        raise ConflictingOptions(
            f"{where}: --greeting-timeout {config.greeting_timeout:g} must be at least --timeout {config.timeout:g}"
        )


def load_file(path: Path, base: Config | None = None) -> Config:
    """Read a TOML file over ``base``; unknown keys and bad values are refused."""
    try:
        text = path.read_bytes().decode("utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _check_mode_spelling(text, data, str(path))
    return apply_mapping(base or Config(), data, str(path))


# A top-level ``socket_mode = ...`` line (the key bare or quoted) and its value's first word.
_MODE_LINE: Final = re.compile(r"""^[ \t]*(?:socket_mode|"socket_mode"|'socket_mode')[ \t]*=[ \t]*([^\s#]+)""", re.MULTILINE)


def _check_mode_spelling(text: str, data: Mapping[str, object], where: str) -> None:
    """Refuse ``socket_mode = 440``: a bare TOML integer is decimal (440 is mode 0670).

    tomllib hands over the number, not how it was written, so the literal
    is read back from the file's text; only ``0o...`` is taken as a mode.
    Text (``"0440"``) is octal and needs no such check.
    """
    value = data.get("socket_mode")
    if not isinstance(value, int) or isinstance(value, bool):
        return
    match = _MODE_LINE.search(text)
    literal = match[1] if match is not None else str(value)
    if literal.startswith("0o"):
        return
    digits = literal.lstrip("+").replace("_", "")
    if digits and set(digits) <= set("01234567") and len(digits) <= 4:
        hint = f'write 0o{digits.lstrip("0") or "0"} or "{digits.zfill(4)}"'
    else:
        hint = 'write the mode in octal, such as 0o660 or "0660"'
    raise ConfigError(f"{where}: socket_mode: {literal} is a decimal number in TOML, not a file mode; {hint}")


def apply_mapping(base: Config, data: Mapping[str, object], where: str) -> Config:
    changes: dict[str, object] = {}
    for key, raw in data.items():
        option = _BY_NAME.get(key)
        if option is None:
            hint = " (use _ not -)" if key.replace("-", "_") in _BY_NAME else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        changes[key] = _convert(option, raw, f"{where}: {key}", from_file=True)
    return _check_whole(replace(base, **changes), where)  # type: ignore[arg-type]


def from_args(args: argparse.Namespace, base: Config) -> Config:
    """Apply the flags that were given over ``base`` (file or defaults)."""
    changes: dict[str, object] = {}
    for option in OPTIONS:
        raw = getattr(args, option.name, None)
        if raw is not None:
            changes[option.name] = _convert(option, raw, option.flag)
    return _check_whole(replace(base, **changes), "command line")  # type: ignore[arg-type]


def stdio_defaults() -> Config:
    """The built-in defaults under ``--stdio``: those of the daemon, but where an option says otherwise."""
    return replace(Config(), **{o.name: o.stdio_default for o in OPTIONS if o.stdio_default is not None})  # type: ignore[arg-type]


def build(args: argparse.Namespace, config_path: Path | None, *, stdio: bool = False) -> Config:
    """The configuration: the built-in defaults (``--stdio``'s own where they differ), the file, then the flags."""
    defaults = stdio_defaults() if stdio else Config()
    base = load_file(config_path, defaults) if config_path is not None else defaults
    return from_args(args, base)


def reference_markdown() -> str:
    """The configuration reference table, as in README.md."""
    lines = ["| flag | file key | default | allowed | SIGHUP | meaning |", "|---|---|---|---|---|---|"]
    for option in OPTIONS:
        default = default_text(option).replace("|", "\\|")
        reload = "restart" if option.restart else "applies"
        allowed = option.allowed or ""
        lines.append(
            f"| `{option.flag} {option.metavar}` | `{option.name}` | `{default}` | {allowed} | {reload} | {option.help} |"
        )
    return "\n".join(lines)


_EXAMPLE_HEADER: Final = """\
# smtpdcheck-policyd configuration (TOML).
#
# Every key is the long command-line flag with '_' for '-'; flags given on
# the command line override this file.  Unknown keys, wrong types and
# impossible values stop start-up (or a SIGHUP reload, which then keeps the
# running configuration) with a message naming the key.  A reload applies
# every option except those marked "Needs a restart": they keep their
# running value, and the reload logs which of them changed.
#
# Every value below is the built-in default: uncomment and change what you need.
# (This file is generated: python -m policyd.config --example-toml)
"""


def _toml_value(option: Option) -> str:
    """The default as TOML would write it, so uncommenting it changes nothing."""
    value = getattr(Config(), option.name)
    if option.name == "socket_mode":
        return f"0o{value:o}"
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def example_toml() -> str:
    """The commented example configuration, as in etc/smtpdcheck-policyd.toml."""
    parts = [_EXAMPLE_HEADER]
    for option in OPTIONS:
        comment = textwrap.fill(option.help, width=78, initial_indent="# ", subsequent_indent="# ",
                                break_long_words=False, break_on_hyphens=False)
        if option.allowed:
            comment += f"\n# Allowed: {option.allowed}."
        if option.stdio_default is not None:
            comment += f"\n# With --stdio the default is {_value_text(option, option.stdio_default)}."
        if option.restart:
            comment += "\n# Needs a restart: a reload keeps the running value."
        parts.append(f"\n{comment}\n#{option.name} = {_toml_value(option)}\n")
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the generated documents, to regenerate the committed copies."""
    parser = argparse.ArgumentParser(prog="python -m policyd.config", description=main.__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--example-toml", action="store_true", help="the example file, etc/smtpdcheck-policyd.toml")
    what.add_argument("--reference-markdown", action="store_true", help="the README's configuration reference table")
    args = parser.parse_args(argv)
    sys.stdout.write(example_toml() if args.example_toml else reference_markdown() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
